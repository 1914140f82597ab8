# Sourced by the GPU queue scripts (gpu_run6-8.sh): a queue of
# resumable runs (`--resume`: each run checkpoints every epoch and goes on from
# there), K at a time under CUDA MPS, none started later than 90 s before
# BUDGET_S seconds after the start. `finish` waits, then writes results.tgz
# and state.tgz.* (each unfinished run's latest checkpoint) into $OUT: a fresh
# machine given `runs/` back continues the queue; finished runs are skipped.
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
finish() {
  wait $(jobs -p | tail -n +2)
  # Results, and the state to continue elsewhere: each unfinished run's latest checkpoint.
  tar czf "$OUT/results.tgz" runs/logs runs/*/*.json runs/c10fast/teacher_21k_seed*.weights.h5
  state=$(for d in runs/*/*.run; do j=${d%.run}.json; done_ $j && continue
    [ -f $d/checkpoints/latest ] && echo $d/checkpoints/$(cat $d/checkpoints/latest) $d/checkpoints/latest; done)
  [ -n "$state" ] && tar czf - $state runs/*/*.parts.json | split -b 15m - "$OUT/state.tgz."
  ls -la $OUT; du -sh runs/*/*.run 2>/dev/null | tail -20
}
