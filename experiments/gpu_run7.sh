#!/usr/bin/env bash
# GPU run 7: gpu_run6's queue continued on a fresh machine from the state it
# returned (`runs/` carried), in a shorter call (BUDGET_S=390), 8 at a time:
# the runs that can finish first, then the mixed_bfloat16 half-schedule runs.
# FSP student of teacher B seed 0 diverged (NaN in its first epoch) in run 6:
# seed 3 takes its place.
set -u
export BUDGET_S=${BUDGET_S:-390} K=${K:-8}
. experiments/gpu_queue.sh
R="--out_dir runs/c10 $C --teacher_weights $B"
H="--scale 0.5 --dtype_policy mixed_bfloat16 --out_dir runs/bf16 $C --teacher_weights $B"
chain 1
for s in 1 2; do job fast_fsp_t64k_s$s runs/c10fast/fsp_t64k_seed$s.json \
  python3 $F --method fsp --tag _t64k --seed $s --teacher_weights $B --out_dir runs/c10fast $C; done
for s in 0 1; do job kd_s$s runs/c10/kd_seed$s.json python3 $E --method kd --seed $s $R; done
job bf16_alone_s0 runs/bf16/student_alone_bf16_seed0.json \
  python3 $E --method student_alone --tag _bf16 --seed 0 $H
job bf16_fsp_s0 runs/bf16/fsp_bf16_seed0.json python3 $E --method fsp --tag _bf16 --seed 0 $H
job fast_t64k_s1 runs/c10fast/teacher_64k_seed1.json python3 $F --method teacher_64k --seed 1 --out_dir runs/c10fast $C
job fast_fsp_t64k_s3 runs/c10fast/fsp_t64k_seed3.json \
  python3 $F --method fsp --tag _t64k --seed 3 --teacher_weights $B --out_dir runs/c10fast $C
finish
