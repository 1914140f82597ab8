#!/usr/bin/env bash
# GPU run 11: run 10's Adam stage-1 runs again from the start (run 10's
# machine was returned with them at epochs 205-209 of 218 and their
# checkpoints were not kept), and an MNIST teacher of run 9's recipe (seed 0)
# with two students distilled from it, at T = 20 and T = 4, whose weights come
# back for analysis (mnist_weights.tar.*).
set -u
export BUDGET_S=${BUDGET_S:-540} K=${K:-12}
. experiments/gpu_queue.sh
R="--out_dir runs/c10 $C --teacher_weights $B"
MT=_mn300
for s in 1 2; do job fsp_adam_s$s runs/c10/fsp_adam_seed$s.json \
  python3 $E --method fsp --tag _adam --stage1_optimizer adam --seed $s $R; done
for s in 0 1 2; do job dense_adam_s$s runs/c10/dense_fsp_adam_seed$s.json \
  python3 $E --method dense_fsp --tag _adam --stage1_optimizer adam --seed $s $R; done
t=runs/mnist/teacher${MT}_seed0
if ! done_ runs/mnist/kd${MT}_T4_seed0.json && slot; then
  ( done_ $t.json || python3 $M --method teacher --tag $MT --epochs 300 --max_norm 3.5 --seed 0 \
      --out_dir runs/mnist $C --max_minutes $(minutes_left) > $L/mnist_teacher_s0.log 2>&1
    if done_ $t.json; then
      python3 $M --method kd --tag $MT --epochs 100 --lr 0.05 --teacher_weights $t.weights.h5 \
        --seed 0 --out_dir runs/mnist $C --max_minutes $(minutes_left) > $L/mnist_kd_s0.log 2>&1 &
      python3 $M --method kd --tag ${MT}_T4 --temperature 4 --epochs 100 --lr 0.05 \
        --teacher_weights $t.weights.h5 --seed 0 --out_dir runs/mnist $C \
        --max_minutes $(minutes_left) > $L/mnist_kd_T4_s0.log 2>&1 &
      wait
    fi ) &
fi
finish
tar cf - runs/mnist/*.weights.h5 2>/dev/null | split -b 15m - $OUT/mnist_weights.tar.; ls -la $OUT
