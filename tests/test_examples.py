"""The example scripts of examples/, run in-process in --smoke mode (random
data, one or two tiny epochs) through keras_fsp's training loop, and checked
on the values they report and the files they write.

In the TensorFlow suite: the scripts are backend-independent, and the
library they train through (recipes, the loop, checkpoints) is tested on
both backends by its own tests."""

import json
import os
import subprocess
import sys
import types

import keras
import numpy as np
import pytest

from keras_fsp.apps.config import import_code

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="the example scripts run in the TensorFlow suite")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
COMMON = dict(dataset=None, seed=0, batch_size=128, scale=1.0, max_minutes=None, smoke=True)


def _load(name):
    """Imports examples/<name>.py once per process (absl flags are global)."""
    return import_code(os.path.join(EXAMPLES, name + ".py"), "examples")


def _flags(run_dir, **kwargs):
    return types.SimpleNamespace(**{**COMMON, "run_dir": str(run_dir), **kwargs})


def _saved(run_dir, result, weights="student"):
    assert (run_dir / f"{weights}.weights.h5").is_file()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    return saved


def _mnist_flags(run_dir, **kwargs):
    defaults = dict(method="kd", epochs=None, temperature=20.0, kd_weight=0.9, lr=None,
                    teacher_weights=None, omitted_digit=3, bias_shift=3.5, max_norm=3.5,
                    student_jitter=False)
    return _flags(run_dir, **{**defaults, **kwargs})


def test_mnist_hinton_teacher_then_kd_and_omitted_class(tmp_path):
    mnist = _load("mnist_hinton")
    teacher = mnist.run(_mnist_flags(tmp_path / "teacher", method="teacher", seed=1, max_norm=0.5))
    _saved(tmp_path / "teacher", teacher, "teacher")
    # the max-norm constraint binds (Glorot columns start near 0.9) and holds
    trained = mnist.teacher_mlp(max_norm=0.5)
    trained.load_weights(str(tmp_path / "teacher" / "teacher.weights.h5"))
    for name in ("hidden1", "hidden2"):
        columns = np.linalg.norm(np.asarray(trained.get_layer(name).kernel), axis=0)
        assert columns.max() <= 0.5 + 1e-5 and columns.min() > 0.0
    assert np.linalg.norm(np.asarray(mnist.teacher_mlp().get_layer("hidden1").kernel), axis=0).max() > 0.5
    assert teacher["method"] == "teacher" and teacher["seed"] == 1
    assert teacher["epochs_total"] == teacher["epochs_done"] == 2 and teacher["complete"]  # --smoke caps
    assert teacher["lr"] == 0.1 and teacher["test_examples"] == 64
    assert teacher["test_accuracy"] == pytest.approx(1 - teacher["test_errors"] / 64)
    assert [l.name for l in mnist.teacher_mlp().layers if "dropout" in l.name] == [
        "input_dropout", "dropout1", "dropout2"]
    assert mnist.student_mlp().count_params() == 784 * 800 + 800 + 800 * 800 + 800 + 8010

    weights = str(tmp_path / "teacher" / "teacher.weights.h5")
    kd = mnist.run(_mnist_flags(tmp_path / "kd", seed=1, teacher_weights=weights, max_norm=0.5))
    _saved(tmp_path / "kd", kd)
    assert kd["method"] == "kd" and kd["lr"] == 0.01 and kd["temperature"] == 20.0
    # the loaded teacher is the one just trained
    assert kd["teacher_test_errors"] == teacher["test_errors"]
    assert all(v >= 0 for v in kd["history"]["kd_loss"])

    omitted = mnist.run(_mnist_flags(tmp_path / "omit", method="omitted_class", seed=1,
                                     teacher_weights=weights, max_norm=0.5, bias_shift=50.0))
    _saved(tmp_path / "omit", omitted)
    assert omitted["train_size"] < 256 and omitted["omitted_test_count"] > 0
    assert 0.0 <= omitted["omitted_accuracy_before"] <= 1.0
    # a huge bias on class 3 makes every test 3 a 3
    assert omitted["omitted_accuracy_after"] == 1.0
    assert omitted["test_errors_after"] == 64 - omitted["omitted_test_count"]


def test_mnist_real_data_loads_when_present():
    mnist = _load("mnist_hinton")
    path = os.path.join(EXAMPLES, "..", "..", "shared", "data", "mnist.npz")
    if not os.path.isfile(path):
        pytest.skip("../shared/data/mnist.npz is absent")
    (x_train, y_train), (x_test, y_test) = mnist.load_mnist(f"npz:{path}")
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == "float32" and 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert sorted(set(y_test.tolist())) == list(range(10))


def test_transfer_split_keeps_the_tasks_apart():
    transfer = _load("cifar10_transfer")
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 10, 2000), rng.integers(0, 10, 500)
    x_train, x_test = y_train[:, None] * 10 + np.arange(2)[None], y_test[:, None] * 10 + np.arange(2)[None]
    source, source_test, small, test = transfer.split(x_train, y_train, x_test, y_test, per_class=20)
    assert len(small[0]) == 80 and np.bincount(small[1]).tolist() == [20, 20, 20, 20]
    assert len(source[0]) == int(np.isin(y_train, range(6)).sum())
    # labels renumbered within each task, images kept with them
    np.testing.assert_array_equal(np.asarray(transfer.SOURCE_CLASSES)[source[1]], source[0][:, 0] // 10)
    np.testing.assert_array_equal(np.asarray(transfer.TARGET_CLASSES)[small[1]], small[0][:, 0] // 10)
    np.testing.assert_array_equal(np.asarray(transfer.TARGET_CLASSES)[test[1]], test[0][:, 0] // 10)
    assert set(source_test[1]) <= set(range(6)) and set(test[1]) <= set(range(4))


@pytest.mark.parametrize("method", ["fsp", "fitnet", "at", "teacher_finetuned"])
def test_transfer_methods_train_from_a_source_task_teacher(tmp_path, method):
    transfer = _load("cifar10_transfer")
    from keras_fsp.papers import cifar_resnet

    teacher = cifar_resnet(8, num_classes=6, name="resnet8")
    teacher.save_weights(str(tmp_path / "teacher.weights.h5"))
    f = _flags(tmp_path / method, method=method, teacher_weights=str(tmp_path / "teacher.weights.h5"),
               per_class=500, teacher_depth=8, student_depth=8, batch_size=16)
    result = transfer.run(f)
    _saved(tmp_path / method, result)
    assert result["complete"] and 0.0 <= result["test_accuracy"] <= 1.0
    assert result["source_classes"] == [0, 1, 2, 3, 4, 5] and result["target_classes"] == [6, 7, 8, 9]
    first = {"fsp": "fsp", "fitnet": "hint", "at": "at", "teacher_finetuned": None}[method]
    assert result["stages"].get("0") == first


@pytest.mark.parametrize("method", ["none", "fsp", "dense-fsp-kd", "dkd"])
def test_network_minimization(tmp_path, method):
    example = _load("network_minimization")
    f = _flags(tmp_path, method=method, teacher_depth=8, student_depth=8, teacher_weights=None,
               stage1_iterations=None, dtype_policy="float32", seed=2)
    result = example.run(f)
    _saved(tmp_path, result)
    assert result["complete"] and result["method"] == method and result["seed"] == 2
    if method != "none":
        assert result["teacher_test_accuracy"] is not None
        assert "kernel_norm_ratio_median" in result["history"]


def test_fast_optimization_fsp_cut_by_the_deadline_resumes(tmp_path):
    fast = _load("cifar10_fast_optimization")
    f = _flags(tmp_path, method="fsp", depth=8, teacher_weights=None, seed=4)
    f.max_minutes = 1e-9  # stops after the first epoch (stage fsp)
    first = fast.run(f)
    assert first["epochs_done"] == 1 and first["epochs_total"] == 2 and not first["complete"]
    assert first["stages"] == {"0": "fsp", "1": "task"} and first["stopped_by_deadline"]
    f.max_minutes = None
    second = fast.run(f)  # the same command again: the task epoch only
    _saved(tmp_path, second)
    assert second["initial_epoch"] == 1 and second["complete"] and second["epochs_done"] == 2
    assert second["history"]["fsp_loss"][0] == first["history"]["fsp_loss"][0]
    assert second["history"]["stage"] == ["fsp", "task"]
    assert second["train_seconds"] >= first["train_seconds"]


def test_cub200_transfer_finetune_then_fsp(tmp_path):
    cub = _load("cub200_transfer")
    from keras_fsp.papers import cifar_resnet

    source = tmp_path / "source.weights.h5"
    cifar_resnet(8, num_classes=100, input_shape=(16, 16, 3), name="resnet8").save_weights(str(source))
    defaults = dict(teacher_depth=8, student_depth=8, image_size=16, batch_size=16,
                    source_classes=100, tfds_data_dir=None, source_weights=None, teacher_weights=None)
    teacher = cub.run(_flags(tmp_path / "teacher", method="teacher_finetune",
                             **{**defaults, "source_weights": str(source)}))
    _saved(tmp_path / "teacher", teacher, "teacher")
    assert teacher["source_weights"] == str(source) and teacher["complete"]
    student = cub.run(_flags(tmp_path / "fsp", method="fsp", **{
        **defaults, "teacher_weights": str(tmp_path / "teacher" / "teacher.weights.h5")}))
    assert student["stages"] == {"0": "fsp", "1": "task"} and 0.0 <= student["test_accuracy"] <= 1.0


def test_scripts_parse_their_flags():
    """All examples import side by side (absl flags are global), and each
    script parses its own flags (absl's --only_check_args exits after parsing)."""
    for name in ("network_minimization", "mnist_hinton", "cifar10_fast_optimization",
                 "cifar10_transfer", "cub200_transfer"):
        _load(name)

    def parse(script, *args):
        return subprocess.run(
            [sys.executable, os.path.join(EXAMPLES, script), "--only_check_args", *args],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": os.path.dirname(EXAMPLES)})

    ok = [("mnist_hinton.py", "--method=omitted_class", "--omitted_digit=7", "--bias_shift=2"),
          ("cifar10_fast_optimization.py", "--method=teacher_21k", "--depth=8"),
          ("network_minimization.py", "--method=dense-fsp", "--stage1_iterations=32000"),
          ("cifar10_transfer.py", "--method=at", "--per_class=100")]
    for args in ok:
        out = parse(*args)
        assert out.returncode == 0, (args, out.stderr[-2000:])
    bad = [("mnist_hinton.py", "--method=fsp"), ("cifar10_transfer.py", "--method=kd")]
    for args in bad:
        out = parse(*args)
        assert out.returncode != 0 and "method" in out.stderr, args
