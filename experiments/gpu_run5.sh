#!/usr/bin/env bash
# GPU run 5: the papers' full schedules on the seed-0 ResNet-26 teacher:
# FSP (kernel norms restored before stage 2, the recipe's default) seeds 0-2
# and dense FSP seed 0; four processes, so each finishes inside 10 minutes.
# FSP_SEEDS="" / DENSE_SEEDS="" run none of that kind (an unset variable keeps the default).
set -u
. experiments/gpu_common.sh
LIM=${LIM:-8.8}
T=results/teachers/cifar10_resnet26_seed0.weights.h5
A="--data_dir .data --out_dir runs/c10 --max_minutes $LIM --teacher_weights $T --restore_kernel_norms"
for s in ${FSP_SEEDS-0 1 2}; do python3 $E --method fsp --seed $s $A > $L/c10_fsp_s$s.log 2>&1 & done
for s in ${DENSE_SEEDS-0}; do python3 $E --method dense_fsp --seed $s $A > $L/c10_dense_s$s.log 2>&1 & done
sleep 5; wait $(jobs -p | tail -n +2)
tar czf "$OUT/full.tgz" runs/logs runs/*/*.json runs/c10/*.h5
ls -la runs/*
