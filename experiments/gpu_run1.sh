#!/usr/bin/env bash
# GPU run 1 (JAX): the CIFAR-10 teachers (64k: network minimization + fast
# optimization; 21k: fast optimization baseline) and the MNIST (Hinton) runs.
# Processes share the GPU; the run ends inside the device tool's 10 minutes.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-out}; mkdir -p "$OUT" runs logs
nvidia-smi --query-gpu=name,memory.total --format=csv | tee logs/gpu.txt
python3 -c "import sys; sys.path.insert(0, '.data'); import datasets; datasets.load_cifar10()"
E=examples/cifar10_network_minimization.py F=examples/cifar10_fast_optimization.py M=examples/mnist_hinton.py
LIM=${LIM:-8.4}
python3 $E --method teacher --seed 0 --data_dir .data --out_dir runs/c10 --max_minutes $LIM > logs/c10_teacher_s0.log 2>&1 &
for s in 1 2; do python3 $F --method teacher_64k --seed $s --data_dir .data --out_dir runs/c10fast --max_minutes $LIM > logs/fast_t64_s$s.log 2>&1 & done
for s in 0 1 2; do python3 $F --method teacher_21k --seed $s --data_dir .data --out_dir runs/c10fast --max_minutes $LIM > logs/fast_t21_s$s.log 2>&1 & done
for s in 0 1 2; do (
  python3 $M --method teacher --seed $s --data_dir .data --out_dir runs/mnist &&
  python3 $M --method kd --seed $s --teacher_weights runs/mnist/teacher_seed$s.weights.h5 --data_dir .data --out_dir runs/mnist &&
  python3 $M --method omitted_class --seed $s --teacher_weights runs/mnist/teacher_seed$s.weights.h5 --data_dir .data --out_dir runs/mnist
  python3 $M --method student_alone --seed $s --data_dir .data --out_dir runs/mnist ) > logs/mnist_s$s.log 2>&1 &
done
( while sleep 60; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done ) > logs/gpu_util.txt 2>&1 &
wait %1 %2 %3 %4 %5 %6 %7 %8 %9
tar czf "$OUT/run1.tgz" runs logs
ls -la runs/*
