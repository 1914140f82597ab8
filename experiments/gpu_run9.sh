#!/usr/bin/env bash
# GPU run 9: FSP stage 1 with its gradients clipped to a global norm of 10
# (the FSP loss starts near 9e4 with a gradient norm near 2e4: plain SGD at
# 1e-3 inflates the kernels 20x in its first 25 steps, RESULTS.md), on the
# full schedules: ResNet-26 -> ResNet-8 fsp and dense_fsp, ResNet-26 ->
# ResNet-26 fast optimization from teacher B; fsp with Adam in stage 1 (one
# seed); MNIST with a longer-trained, max-norm teacher and 100-epoch students.
# Resumable: run it again on the same machine (runs/ is kept) to continue.
set -u
export BUDGET_S=${BUDGET_S:-560} K=${K:-12}
. experiments/gpu_queue.sh
R="--out_dir runs/c10 $C --teacher_weights $B"
MT=_mn300  # the MNIST teacher: 300 epochs, max-norm 3.5
mnist_chain() {  # s: an MNIST teacher, then KD and the omitted class from it
  local s=$1 t=runs/mnist/teacher${MT}_seed$1
  done_ runs/mnist/kd${MT}_seed$s.json && done_ runs/mnist/omitted_class${MT}_seed$s.json \
    && { echo "done: mnist $s"; return 0; }
  slot || { echo "no time for mnist $s"; return 1; }
  echo "start: mnist $s"
  ( done_ $t.json || python3 $M --method teacher --tag $MT --epochs 300 --max_norm 3.5 --seed $s \
      --out_dir runs/mnist $C --max_minutes $(minutes_left) > $L/mnist_teacher_s$s.log 2>&1
    if done_ $t.json; then
      for m in kd omitted_class; do
        done_ runs/mnist/$m${MT}_seed$s.json || python3 $M --method $m --tag $MT --epochs 100 --lr 0.05 \
          --teacher_weights $t.weights.h5 --seed $s --out_dir runs/mnist $C \
          --max_minutes $(minutes_left) > $L/mnist_${m}_s$s.log 2>&1 &
      done
      wait
    fi ) &
}
for s in 0 1 2; do job fast_fsp_clip_s$s runs/c10fast/fsp_t64k_clip10_seed$s.json \
  python3 $F --method fsp --tag _t64k_clip10 --stage1_clipnorm 10 --seed $s --teacher_weights $B \
  --out_dir runs/c10fast $C; done
for s in 0 1 2; do job fsp_clip_s$s runs/c10/fsp_clip10_seed$s.json \
  python3 $E --method fsp --tag _clip10 --stage1_clipnorm 10 --seed $s $R; done
for s in 0 1 2; do mnist_chain $s; done
for s in 0 1 2; do job dense_clip_s$s runs/c10/dense_fsp_clip10_seed$s.json \
  python3 $E --method dense_fsp --tag _clip10 --stage1_clipnorm 10 --seed $s $R; done
job fsp_adam_s0 runs/c10/fsp_adam_seed0.json \
  python3 $E --method fsp --tag _adam --stage1_optimizer adam --seed 0 $R
for s in 0 1 2; do job mnist_alone_s$s runs/mnist/student_alone_e100_seed$s.json \
  python3 $M --method student_alone --tag _e100 --epochs 100 --seed $s --out_dir runs/mnist $C; done
finish
