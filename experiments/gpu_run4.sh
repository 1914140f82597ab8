#!/usr/bin/env bash
# GPU run 4: the papers' full schedules on the seed-0 ResNet-26 teacher for FSP
# and dense FSP with the kernel norms restored before stage 2 (the recipes'
# default), seeds 0-2; MNIST teachers (150 epochs) and distillation at lr 0.05.
set -u
. experiments/gpu_common.sh
LIM=${LIM:-8.5}
T=results/teachers/cifar10_resnet26_seed0.weights.h5
A="--data_dir .data --out_dir runs/c10 --max_minutes $LIM --teacher_weights $T --restore_kernel_norms"
for s in 0 1 2; do
  python3 $E --method fsp --seed $s $A > $L/c10_fsp_s$s.log 2>&1 &
  python3 $E --method dense_fsp --seed $s $A > $L/c10_dense_s$s.log 2>&1 &
done
for s in 0 1 2; do (
  python3 $M --method teacher --epochs 150 --seed $s --data_dir .data --out_dir runs/mnist &&
  for m in kd omitted_class; do python3 $M --method $m --lr 0.05 --seed $s --teacher_weights runs/mnist/teacher_seed$s.weights.h5 --data_dir .data --out_dir runs/mnist; done
  ) > $L/mnist_s$s.log 2>&1 &
done
sleep 5; wait %2 %3 %4 %5 %6 %7 %8 %9 %10
tar czf "$OUT/full.tgz" runs/logs runs/*/*.json runs/c10/*.h5
ls -la runs/*
