#!/usr/bin/env bash
# GPU run 10: Adam in FSP stage 1 (fsp seeds 1-2 after run 9's seed 0, and
# dense_fsp seeds 0-2); the fast-optimization 64k network of seed 2 again, to
# its end; an MNIST teacher of run 9's recipe (seed 0) and, from it, KD with
# the transfer set jittered like the teacher's inputs, against the student
# alone with the same jitter. Its MNIST weights come back for analysis.
# Resumable: run it again on the same machine (runs/ is kept) to continue.
set -u
export BUDGET_S=${BUDGET_S:-560} K=${K:-12}
. experiments/gpu_queue.sh
R="--out_dir runs/c10 $C --teacher_weights $B"
MT=_mn300
job fast_t64k_s2 runs/c10fast/teacher_64k_seed2.json \
  python3 $F --method teacher_64k --seed 2 --out_dir runs/c10fast $C
for s in 1 2; do job fsp_adam_s$s runs/c10/fsp_adam_seed$s.json \
  python3 $E --method fsp --tag _adam --stage1_optimizer adam --seed $s $R; done
for s in 0 1 2; do job dense_adam_s$s runs/c10/dense_fsp_adam_seed$s.json \
  python3 $E --method dense_fsp --tag _adam --stage1_optimizer adam --seed $s $R; done
t=runs/mnist/teacher${MT}_seed0
if ! done_ runs/mnist/kd${MT}_jitter_seed0.json && slot; then
  ( done_ $t.json || python3 $M --method teacher --tag $MT --epochs 300 --max_norm 3.5 --seed 0 \
      --out_dir runs/mnist $C --max_minutes $(minutes_left) > $L/mnist_teacher_s0.log 2>&1
    done_ $t.json && python3 $M --method kd --tag ${MT}_jitter --student_jitter --epochs 100 --lr 0.05 \
      --teacher_weights $t.weights.h5 --seed 0 --out_dir runs/mnist $C \
      --max_minutes $(minutes_left) > $L/mnist_kd_jitter_s0.log 2>&1 ) &
fi
job mnist_alone_jitter_s0 runs/mnist/student_alone_e100_jitter_seed0.json \
  python3 $M --method student_alone --tag _e100_jitter --student_jitter --epochs 100 --seed 0 \
  --out_dir runs/mnist $C
finish
tar cf - runs/mnist/*.weights.h5 2>/dev/null | split -b 15m - $OUT/mnist_weights.tar.; ls -la $OUT
