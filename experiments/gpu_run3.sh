#!/usr/bin/env bash
# GPU run 3: why FSP as published loses to the student alone, at half the
# papers' schedule (--scale 0.5) on the seed-0 ResNet-26 teacher: the student
# alone, FSP and dense FSP as published, and both with the batch-normalised
# kernels restored to their initial norms before stage 2.
set -u
. experiments/gpu_common.sh
LIM=${LIM:-8.0}
T=results/teachers/cifar10_resnet26_seed0.weights.h5
A="--scale 0.5 --data_dir .data --out_dir runs/ablation --max_minutes $LIM --teacher_weights $T"
for s in 0 1; do
  python3 $E --method student_alone --seed $s $A > $L/abl_alone_s$s.log 2>&1 &
  python3 $E --method fsp --seed $s $A --norestore_kernel_norms > $L/abl_fsp_s$s.log 2>&1 &
  python3 $E --method fsp --seed $s $A --restore_kernel_norms --tag _restore > $L/abl_fsp_restore_s$s.log 2>&1 &
done
python3 $E --method dense_fsp --seed 0 $A --norestore_kernel_norms > $L/abl_dense_s0.log 2>&1 &
python3 $E --method dense_fsp --seed 0 $A --restore_kernel_norms --tag _restore > $L/abl_dense_restore_s0.log 2>&1 &
sleep 5; wait %2 %3 %4 %5 %6 %7 %8 %9
tar czf "$OUT/ablation.tgz" runs/logs runs/ablation/*.json
ls -la runs/ablation
