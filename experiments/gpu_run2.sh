#!/usr/bin/env bash
# GPU run 2: the network-minimization teacher (ResNet-26, 64k iterations, seed 0),
# the fast-optimization teachers of seeds 1-2, the MNIST teachers (150 epochs),
# then MNIST distillation (T = 20, lr 0.01) and the omitted-class run.
set -u
. experiments/gpu_common.sh
LIM=${LIM:-8.0}
python3 $E --method teacher --seed 0 --data_dir .data --out_dir runs/c10 --max_minutes $LIM > $L/c10_teacher_s0.log 2>&1 &
for s in 1 2; do python3 $F --method teacher_64k --seed $s --data_dir .data --out_dir runs/c10fast --max_minutes $LIM > $L/fast_t64_s$s.log 2>&1 & done
for s in 0 1 2; do (
  python3 $M --method teacher --epochs 150 --seed $s --data_dir .data --out_dir runs/mnist &&
  for m in kd omitted_class; do python3 $M --method $m --lr 0.01 --seed $s --teacher_weights runs/mnist/teacher_seed$s.weights.h5 --data_dir .data --out_dir runs/mnist; done
  ) > $L/mnist_s$s.log 2>&1 &
done
sleep 20; nvidia-smi | tail -15 > $L/nvidia_smi.txt
wait %2 %3 %4 %5 %6 %7
tar czf "$OUT/c10.tgz" runs/logs runs/*/*.json runs/c10*/*.h5
ls -la runs/*
