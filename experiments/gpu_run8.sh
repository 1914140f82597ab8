#!/usr/bin/env bash
# GPU run 8 (the session's last device minutes): what the FSP term adds to a
# KD step on the GPU (gpu_throughput.py stage_kd vs stage_kd_fsp, alone on the
# GPU), then KD seed 2 on teacher B, alone.
set -u
export NO_MPS=1 BUDGET_S=${BUDGET_S:-550}
. experiments/gpu_queue.sh
python3 benchmarks/gpu_throughput.py --steps stage_kd,stage_kd_fsp,stage_kd,stage_kd_fsp --fits "" \
  --notorch --json_out $OUT/gpu-h100-kd-fsp.json 2>&1 | grep -vE "cuda_|absl|^W0|^I0" | tee $OUT/gpu-h100-kd-fsp.log
job kd_s2 runs/c10/kd_seed2.json python3 $E --method kd --seed 2 --out_dir runs/c10 $C --teacher_weights $B
finish
