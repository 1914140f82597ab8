#!/usr/bin/env bash
# GPU run 6: a queue of resumable runs (every run checkpoints each epoch and
# `--resume` goes on from there), K at a time under CUDA MPS, until BUDGET_S
# seconds after the start. The same command again (on the warm machine, or on
# a fresh one given `runs/` back from state.tgz) continues the queue: finished
# runs are skipped, cut ones resume. In priority order:
#  1. FitNets seeds 1-2 and dense FSP seeds 1-2 on teacher B (the seed-0 ResNet-26);
#  2. fast optimization: ResNet-26 trained 21k iterations (seeds 0-2), then an
#     FSP ResNet-26 student of each (21k + 21k), and FSP students of teacher B;
#     the third 64k ResNet-26 (seed 1);
#  3. KD seeds 0-2 and FitNets seed 0 on teacher B; FSP as published on teacher B;
#  4. mixed_bfloat16 at half the schedule (student alone, FSP) for the precision effect.
set -u
. experiments/gpu_queue.sh
R="--out_dir runs/c10 $C --teacher_weights $B"
for s in 1 2; do job fitnet_s$s runs/c10/fitnet_seed$s.json python3 $E --method fitnet --seed $s $R; done
for s in 1 2; do job dense_s$s runs/c10/dense_fsp_seed$s.json python3 $E --method dense_fsp --seed $s $R; done
for s in 0 1 2; do chain $s; done
for s in 0 1 2; do job fast_fsp_t64k_s$s runs/c10fast/fsp_t64k_seed$s.json \
  python3 $F --method fsp --tag _t64k --seed $s --teacher_weights $B --out_dir runs/c10fast $C; done
job fast_t64k_s1 runs/c10fast/teacher_64k_seed1.json python3 $F --method teacher_64k --seed 1 --out_dir runs/c10fast $C
for s in 0 1 2; do job kd_s$s runs/c10/kd_seed$s.json python3 $E --method kd --seed $s $R; done
job fitnet_s0 runs/c10/fitnet_seed0.json python3 $E --method fitnet --seed 0 $R
for s in 0 1 2; do job fsp_pub_s$s runs/c10/fsp_published_seed$s.json \
  python3 $E --method fsp --tag _published --norestore_kernel_norms --seed $s $R; done
H="--scale 0.5 --dtype_policy mixed_bfloat16 --out_dir runs/bf16 $C --teacher_weights $B"
for s in 0 1; do job bf16_alone_s$s runs/bf16/student_alone_bf16_seed$s.json \
  python3 $E --method student_alone --tag _bf16 --seed $s $H; done
job bf16_fsp_s0 runs/bf16/fsp_bf16_seed0.json python3 $E --method fsp --tag _bf16 --seed 0 $H
finish
