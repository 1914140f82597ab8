"""MultiWorkerMirroredStrategy: two worker processes on this machine give the
single-device steps.

Two worker processes (`tests/multi_worker_worker.py`), each with its own
`TF_CONFIG`, train the same distiller two SGD-momentum steps of a stage with
FSP, KD and task terms on one global batch of 16, split 8 + 8 between them;
the chief writes the student's weights. The test process runs the same two
steps on one device and compares. Without the division by
`num_replicas_in_sync` in `FSPDistiller.compute_loss` the gradients would be
twice too large and the weights would differ.

TensorFlow's gRPC server listens on every interface (`0.0.0.0:port`, not
configurable), so where unprivileged namespaces work the workers run in a
private network namespace (`unshare -rn`) that only has a loopback device.

    python -m pytest -q tests/test_multi_worker.py
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multi_worker_worker.py")
WORKER_TIMEOUT_S = 150  # the launcher kills the workers then
LAUNCH_TIMEOUT_S = 180  # and the test kills the launcher's process group then

pytestmark = [
    pytest.mark.large,
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason="MultiWorkerMirroredStrategy is tf.distribute (TensorFlow backend)",
    ),
]


def _free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (released just before use)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _private_network():
    """`unshare -rn` prefix with loopback up, or [] where not permitted."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return []
    probe = ["unshare", "-rn", "ip", "link", "set", "lo", "up"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] if ok else []


def _start_workers(out_dir):
    ports = ",".join(map(str, _free_ports(2)))
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.pop("TF_CONFIG", None)
    command = _private_network() + [
        sys.executable, WORKER, "launch", str(out_dir), ports, str(WORKER_TIMEOUT_S),
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _wait(launcher, out_dir):
    """Waits for the launcher (killing its process group at the deadline);
    returns `(exit status, report with every worker's output)`."""
    try:
        out, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
        status = launcher.returncode
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        out, _ = launcher.communicate()
        status = f"killed after {LAUNCH_TIMEOUT_S} s"
    report = [f"launcher: {status}\n{out[-2000:]}"]
    for i in range(2):
        log = out_dir / f"worker{i}.log"
        text = log.read_text() if log.exists() else "(no log)"
        report.append(f"--- worker {i} (stdout and stderr, end):\n{text[-4000:]}")
    return status, "\n".join(report)


def _load(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def test_two_workers_match_one_device(tmp_path):
    import tensorflow as tf

    from tests import multi_worker_worker as worker

    launcher = _start_workers(tmp_path)
    try:
        # The single-device reference, while the workers start.
        initial, expected, history = worker.train(tf.distribute.get_strategy())
    finally:
        status, report = _wait(launcher, tmp_path)
    assert status == 0, "the multi-worker run failed:\n" + report
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["task_id"] == 0 and info["num_replicas_in_sync"] == 2, info

    # Each step's global batch was split between the workers, 8 + 8.
    shares = [json.loads((tmp_path / f"share{i}.json").read_text()) for i in range(2)]
    for step in range(worker.STEPS):
        a, b = shares[0][step], shares[1][step]
        assert len(a) == len(b) == worker.GLOBAL_BATCH // 2, shares
        assert sorted(a + b) == list(range(worker.GLOBAL_BATCH)), shares

    for a, b in zip(initial, _load(tmp_path / "initial.npz")):
        np.testing.assert_array_equal(a, b, err_msg="the runs start differently")
    got = _load(tmp_path / "final.npz")
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(expected, got)):
        np.testing.assert_allclose(
            b, a, rtol=1e-4, atol=1e-5,
            err_msg=f"student weight {i}: two workers differ from one device\n{report}",
        )
    for key in history:
        np.testing.assert_allclose(
            info["history"][key], history[key], rtol=1e-4, err_msg=key
        )
    # The steps did move the student.
    assert sum(not np.allclose(a, b) for a, b in zip(initial, expected)) > 10
