"""The benchmark scripts run, and what they count is right (their timings
need a GPU and are not tested)."""

import gzip
import json
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="DataParallel runs on JAX")
def test_per_replica_batch_norm_leaves_one_all_reduce(tmp_path):
    out = tmp_path / "collectives.json"
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    subprocess.run([sys.executable, os.path.join(BENCHMARKS, "data_parallel.py"),
                    "--collectives_only", "--devices", "2", "--dp_fits=", "--dp_steps",
                    "student_alone", "--per_device_batch", "4", "--json_out", str(out)],
                   check=True, env=env, capture_output=True, cwd=ROOT, timeout=600)
    counts = {r["batch_norm"]: (r["all_reduce_ops"], r["all_reduce_ops_per_channel"])
              for r in json.loads(out.read_text())}
    # ResNet-8: 16 batch norms, statistics forward and their gradients backward.
    assert counts == {"global": (33, 32), "replica": (1, 0)}


def test_trace_summary_splits_busy_and_idle_time(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    try:
        import trace_summary
    finally:
        sys.path.remove(BENCHMARKS)
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    kernels = [(0, 100, "conv"), (150, 50, "conv"), (2200, 300, "ncclDevKernel_AllReduce"),
               (2400, 200, "conv")]  # gaps: 50 us, then 2,000 us; the last overlaps
    events = meta + [{"ph": "X", "pid": 1, "tid": 1, "ts": t, "dur": d, "name": n}
                     for t, d, n in kernels] + [{"ph": "X", "pid": 2, "tid": 1, "ts": 0,
                                                 "dur": 9999, "name": "host"}]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = trace_summary.summary(trace_summary.kernels(str(path), "/device:GPU:0"), steps=2)
    assert got == {"steps": 2, "span_ms_per_step": 1.3, "busy_ms_per_step": 0.275,
                   "idle_ms_per_step": 1.025, "idle_in_gaps_over_1ms_ms_per_step": 1.0,
                   "idle_in_short_gaps_ms_per_step": 0.025, "nccl_ms_per_step": 0.15}
