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


def test_paper_schedule_timeline_splits_device_host_and_first_epochs():
    sys.path.insert(0, BENCHMARKS)
    try:
        import paper_schedule
    finally:
        sys.path.remove(BENCHMARKS)
    timeline = paper_schedule.Timeline()
    timeline.fit = [10.0, 31.0]
    # (dispatch, logs ready, stage, validated): a first epoch of each stage
    # that compiles, then steady ones; the host gap runs to the next dispatch.
    epochs = [(10.5, 15.5, "fsp", False), (16.0, 17.0, "fsp", False), (17.5, 18.5, "fsp", True),
              (20.0, 24.0, "task", False), (24.5, 25.0, "task", False), (25.5, 26.0, "task", False)]
    for dispatch, logs, stage, validated in epochs:
        timeline.epochs.append({"dispatch": dispatch, "logs": logs, "stage": stage,
                                "validated": validated})
    timeline.timed("NaNGuard", lambda: None)()
    got = timeline.summary()
    assert got["epochs"] == 6 and got["before_first_dispatch_seconds"] == 0.5
    assert got["device_seconds"] == 5 + 1 + 1 + 4 + 0.5 + 0.5
    assert got["host_seconds"] == 0.5 + 0.5 + 1.5 + 0.5 + 0.5 + 5.0  # the last runs to fit's end
    assert got["by_stage"]["fsp"] == {
        "epochs": 3, "device_seconds": 7.0, "host_seconds": 2.5,
        "first_epoch_device_seconds": 5.0, "median_epoch_device_seconds": 1.0,
        "median_host_seconds_between_epochs": 0.5}  # the validated epoch's gap left out
    assert got["by_stage"]["task"]["median_epoch_device_seconds"] == 0.5
    assert got["by_stage"]["task"]["first_epoch_device_seconds"] == 4.0
    assert set(got["callbacks"]) == {"NaNGuard"}


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the stacked seeds are jax.vmap")
def test_stacked_seeds_train_as_separate_runs():
    """`stacked_seeds.py` times seeds trained in one vmapped program; its
    check: two seeds trained stacked end where each trained alone ends."""
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "stacked_seeds.py"), "--check",
                           "--pair", "8:8", "--stacks", "1,2", "--batch_size", "8",
                           "--scan_steps", "2", "--models", "stage_fsp"],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "largest relative difference" in line]
    assert [line.split(":")[0] for line in lines] == ["stage_fsp"]
    for line in lines:  # the weights trained, and the two ways agree
        worst, moved = (float(part.split()[-1]) for part in line.split(":")[1].split(";"))
        assert worst < 1e-4 and moved > 1e-5, line
