#!/usr/bin/env bash
# Data-parallel scaling (Keras DataParallel on JAX) on a machine of 2+ GPUs:
# benchmarks/data_parallel.py at 512 images per GPU, then 128; logs and JSONs into $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi topo -m > $OUT/topo.txt 2>&1
for b in 512 128; do
  python3 benchmarks/data_parallel.py --per_device_batch $b --iters ${ITERS:-100} \
    --dp_steps ${STEPS:-student_alone,stage_kd,stage_fsp,stage_task} \
    --json_out $OUT/data_parallel_b$b.json 2>&1 | grep -vE "cuda_|absl|^W0|^I0" | tee $OUT/data_parallel_b$b.log
done
