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
START=$(date +%s)
. experiments/gpu_common.sh
END=$(( START + ${BUDGET_S:-535} ))
K=${K:-7}
B=results/teachers/cifar10_resnet26_seed0.weights.h5
C="--data_dir .data --resume"
done_() { grep -qs '"completed": true' "$1"; }
minutes_left() { python3 -c "print(round(($END - __import__('time').time()) / 60 - 0.4, 2))"; }
slot() {  # waits for a free slot; fails when too little time is left to start
  while [ $(( $(jobs -rp | wc -l) - 1 )) -ge $K ]; do sleep 3; done
  python3 -c "import sys; sys.exit(($END - __import__('time').time()) < 90)"
}
job() {  # name result.json command...: runs it unless its result is complete
  local name=$1 json=$2; shift 2
  done_ $json && { echo "done: $name"; return 0; }
  slot || { echo "no time for $name"; return 1; }
  echo "start: $name ($(minutes_left) min)"
  "$@" --max_minutes $(minutes_left) > $L/$name.log 2>&1 &
}
chain() {  # s: a ResNet-26 21k teacher then its FSP student, in one slot
  local s=$1 t=runs/c10fast/teacher_21k_seed$1
  done_ runs/c10fast/fsp_t21k_seed$s.json && { echo "done: chain $s"; return 0; }
  slot || { echo "no time for chain $s"; return 1; }
  echo "start: chain $s"
  ( done_ $t.json || python3 $F --method teacher_21k --seed $s --out_dir runs/c10fast $C \
      --max_minutes $(minutes_left) > $L/fast_t21k_s$s.log 2>&1
    done_ $t.json && python3 $F --method fsp --tag _t21k --seed $s --teacher_weights $t.weights.h5 \
      --out_dir runs/c10fast $C --max_minutes $(minutes_left) > $L/fast_fsp_t21k_s$s.log 2>&1 ) &
}
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
wait $(jobs -p | tail -n +2)
# Results, and the state to continue elsewhere: each unfinished run's latest checkpoint.
tar czf "$OUT/results.tgz" runs/logs runs/*/*.json runs/c10fast/teacher_21k_seed*.weights.h5
state=$(for d in runs/*/*.run; do j=${d%.run}.json; done_ $j && continue
  [ -f $d/checkpoints/latest ] && echo $d/checkpoints/$(cat $d/checkpoints/latest) $d/checkpoints/latest; done)
[ -n "$state" ] && tar czf - $state runs/*/*.parts.json | split -b 15m - "$OUT/state.tgz."
ls -la $OUT; du -sh runs/*/*.run 2>/dev/null | tail -20
