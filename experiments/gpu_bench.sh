#!/usr/bin/env bash
# GPU benchmark run: benchmarks/gpu_throughput.py alone on the GPU (no MPS,
# nothing else running), results into $OUT and benchmarks/results/.
set -u
NO_MPS=1 . experiments/gpu_common.sh
kill %1 2>/dev/null  # no monitor while timing
name=gpu-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | grep -oE 'h100|h200|a100' | head -1)
python3 benchmarks/gpu_throughput.py --data_dir .data --pairs 26:8,56:20 --max_seconds ${MAXS:-330} \
  --json_out $OUT/$name.json 2>&1 | grep -vE "cuda_|absl|^W0|^I0" | tee $OUT/$name.log
