"""The example scripts of examples/, run in-process in --smoke mode (random
data, one or two tiny epochs) and checked on the values they report."""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    """Imports examples/<name>.py once per process, as module `name` (the
    scripts' absl flags are global: the CIFAR-10 example's cannot be defined
    twice; cifar10_fast_optimization imports it under the same name)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _saved(tmp_path, result):
    stem = tmp_path / f"{result['method']}_seed{result['seed']}"
    assert (tmp_path / f"{stem.name}.weights.h5").is_file()
    with open(f"{stem}.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    return saved


def test_mnist_hinton_teacher_then_kd_and_omitted_class(tmp_path):
    mnist = _load("mnist_hinton")
    teacher = mnist.run("teacher", epochs=5, seed=1, out_dir=str(tmp_path), smoke=True,
                        max_norm=0.5)
    _saved(tmp_path, teacher)
    # the max-norm constraint binds (Glorot columns start near 0.9) and holds
    trained = mnist.teacher_mlp(max_norm=0.5)
    trained.load_weights(str(tmp_path / "teacher_seed1.weights.h5"))
    for name in ("hidden1", "hidden2"):
        columns = np.linalg.norm(trained.get_layer(name).kernel.numpy(), axis=0)
        assert columns.max() <= 0.5 + 1e-5 and columns.min() > 0.0
    assert np.linalg.norm(mnist.teacher_mlp().get_layer("hidden1").kernel.numpy(), axis=0).max() > 0.5
    assert teacher["method"] == "teacher" and teacher["seed"] == 1
    assert teacher["epochs"] == 2 and teacher["epochs_run"] == 2  # --smoke caps the epochs
    assert teacher["hidden_units"] == [1200, 1200]
    assert teacher["test_size"] == 64 and 0 <= teacher["test_errors"] <= 64
    assert teacher["test_accuracy"] == pytest.approx(1 - teacher["test_errors"] / 64)
    model = mnist.teacher_mlp()
    assert [l.name for l in model.layers if "dropout" in l.name] == [
        "input_dropout", "dropout1", "dropout2"]
    assert mnist.student_mlp().count_params() == 784 * 800 + 800 + 800 * 800 + 800 + 8010

    weights = str(tmp_path / "teacher_seed1.weights.h5")
    kd = mnist.run("kd", epochs=1, seed=1, teacher_weights=weights, out_dir=str(tmp_path),
                   smoke=True)
    _saved(tmp_path, kd)
    assert kd["method"] == "kd" and kd["epochs"] == kd["epochs_run"] == 1
    assert kd["hidden_units"] == [800, 800] and kd["teacher_hidden_units"] == [1200, 1200]
    assert kd["temperature"] == 20.0
    # the loaded teacher is the one just trained
    assert kd["teacher_test_errors"] == teacher["test_errors"]
    assert "kd_loss" in kd["history"] and all(v >= 0 for v in kd["history"]["kd_loss"])
    assert 0 <= kd["test_errors"] <= 64

    omitted = mnist.run("omitted_class", epochs=1, seed=1, teacher_weights=weights,
                        omitted_digit=3, bias_shift=50.0, out_dir=str(tmp_path), smoke=True)
    _saved(tmp_path, omitted)
    assert omitted["train_size"] < 256 and omitted["omitted_test_count"] > 0
    assert 0.0 <= omitted["omitted_accuracy_before"] <= 1.0
    # a huge bias on class 3 makes every test 3 a 3
    assert omitted["omitted_accuracy_after"] == 1.0
    assert omitted["test_errors_after"] == 64 - omitted["omitted_test_count"]


def test_mnist_real_data_loads_when_present():
    mnist = _load("mnist_hinton")
    data_dir = os.path.join(EXAMPLES, "..", "..", "shared", "data")
    if not os.path.isfile(os.path.join(data_dir, "mnist.npz")):
        pytest.skip("../shared/data/mnist.npz is absent")
    (x_train, y_train), (x_test, y_test) = mnist.load_mnist(data_dir)
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == "float32" and 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert sorted(set(y_test.tolist())) == list(range(10))


def test_cifar10_fast_optimization_fsp(tmp_path):
    fast = _load("cifar10_fast_optimization")
    # ResNet-8 for speed (the default depth, 26, is the same code)
    result = fast.run("fsp", depth=8, seed=2, out_dir=str(tmp_path), smoke=True, tag="_t64k")
    stem = tmp_path / "fsp_t64k_seed2"
    assert (tmp_path / f"{stem.name}.weights.h5").is_file()
    assert json.loads(open(f"{stem}.json").read()) == json.loads(json.dumps(result))
    assert result["method"] == "fsp" and result["depth"] == 8 and result["tag"] == "_t64k"
    assert result["stage_epochs"] == {"0": "fsp", "1": "task"}  # 21k + 21k, one epoch each here
    assert result["epochs"] == result["epochs_run"] == 2 and result["completed"]
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["history"]["fsp_loss"][0] > 0.0

    baseline = fast.run("teacher_21k", depth=8, out_dir=str(tmp_path), smoke=True)
    _saved(tmp_path, baseline)
    assert baseline["method"] == "teacher_21k" and baseline["stage_epochs"] == {}
    assert baseline["epochs"] == baseline["epochs_run"] == 1 and baseline["completed"]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tfds-fed example: its data path is tf.data; the models and "
                           "recipes it runs are covered on JAX by the CIFAR-10 examples")
def test_cifar100_network_minimization_fsp(tmp_path):
    c100 = _load("cifar100_network_minimization")
    result = c100.run("fsp", seed=0, out_dir=str(tmp_path), smoke=True)
    _saved(tmp_path, result)
    assert result["method"] == "fsp" and result["num_classes"] == 100
    assert (result["teacher_depth"], result["student_depth"]) == (32, 14)
    # smoke scale 2/64000: stage 1 (21k) -> 1 epoch, stage 2 (64k) -> 2 epochs
    assert result["stage_epochs"] == {"0": "fsp", "1": "task"}
    assert result["epochs"] == result["epochs_run"] == 3 and result["completed"]
    assert 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tfds-fed example: its data path is tf.data; the models and "
                           "recipes it runs are covered on JAX by the CIFAR-10 examples")
def test_cifar100_through_mocked_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    c100 = _load("cifar100_network_minimization")
    with tfds.testing.mock_data(num_examples=24):
        # 64000 * 1e-5 -> 1 iteration: 1 epoch of 1 step.
        result = c100.run("student_alone", student_depth=8, scale=1e-5, batch_size=24,
                          out_dir=str(tmp_path))
    _saved(tmp_path, result)
    assert result["steps_per_epoch"] == 1 and result["epochs_run"] == 1
    assert result["num_classes"] == 100 and 0.0 <= result["test_accuracy"] <= 1.0


def test_scripts_flags_parse_in_one_process():
    """All examples import side by side (absl flags are global), and each
    script parses its own flags when run (absl's --only_check_args exits 0
    after parsing, before main)."""
    for name in ("cifar10_network_minimization", "mnist_hinton", "cifar10_fast_optimization",
                 "cifar100_network_minimization"):
        _load(name)

    def parse(script, *args):
        return subprocess.run(
            [sys.executable, os.path.join(EXAMPLES, script), "--only_check_args", *args],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": os.path.dirname(EXAMPLES)})

    ok = [("mnist_hinton.py", "--method=omitted_class", "--omitted_digit=7", "--bias_shift=2"),
          ("cifar10_fast_optimization.py", "--method=teacher_21k", "--depth=8"),
          ("cifar100_network_minimization.py", "--method=dense_fsp", "--stage1_iterations=32000")]
    for args in ok:
        out = parse(*args)
        assert out.returncode == 0, (args, out.stderr[-2000:])
    bad = [("mnist_hinton.py", "--method=fsp"),  # not a method of this script
           ("cifar10_fast_optimization.py", "--method=student_alone")]
    for args in bad:
        out = parse(*args)
        assert out.returncode != 0 and "method" in out.stderr, args


def test_cifar10_network_minimization_student_alone(tmp_path):
    c10 = _load("cifar10_network_minimization")
    result = c10.run("student_alone", seed=1, out_dir=str(tmp_path), smoke=True, student_depth=8)
    _saved(tmp_path, result)
    assert result["method"] == "student_alone" and result["seed"] == 1
    assert result["completed"] and 0.0 <= result["test_accuracy"] <= 1.0
    assert "genuine_subset_accuracy" not in result  # random data in smoke mode


def test_cifar10_run_cut_by_the_deadline_resumes_where_it_stopped(tmp_path):
    c10 = _load("cifar10_network_minimization")
    args = dict(method="fsp", teacher_depth=8, student_depth=8, seed=4, out_dir=str(tmp_path),
                smoke=True, resume=True)
    first = c10.run(max_minutes=1e-9, **args)  # stops after the first epoch (stage fsp)
    assert first["epochs"] == 3 and first["epochs_run"] == 1 and not first["completed"]
    assert first["stage_epochs"] == {"0": "fsp", "1": "task"}
    assert len(first["history"]["loss"]) == 1 and "task_loss" not in first["history"]

    # An epoch that ran after the checkpoint and was lost (a NaN loss writes
    # no checkpoint; a killed part neither): the resumed history drops it.
    parts = tmp_path / "fsp_seed4.parts.json"
    saved = json.loads(parts.read_text())
    assert len(saved["epoch_logs"]) == 1
    saved["epoch_logs"].append({"loss": float("nan"), "fsp_loss": float("nan")})
    parts.write_text(json.dumps(saved))

    second = c10.run(**args)  # the same command again: only epochs 2-3, in stage task
    _saved(tmp_path, second)
    assert second["epochs_run"] == 3 and second["completed"] and second["history_complete"]
    assert second["history"]["fsp_loss"][0] == first["history"]["fsp_loss"][0]
    assert len(second["history"]["loss"]) == 3 and len(second["history"]["task_loss"]) == 2
    assert all(v == v for v in second["history"]["loss"])  # no NaN from the dropped epoch
    assert second["diverged_at_epoch"] is None
    assert second["train_seconds"] >= first["train_seconds"]

    third = c10.run(**args)  # nothing left to train: scored and written again, unchanged
    assert third["history"] == second["history"] and third["test_accuracy"] == second["test_accuracy"]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tfds-fed example: its data path is tf.data; the models and "
                           "recipes it runs are covered on JAX by the CIFAR-10 examples")
def test_cub200_transfer_finetune_then_fsp(tmp_path):
    cub = _load("cub200_transfer")
    source = tmp_path / "source.weights.h5"
    from keras_fsp.papers import cifar_resnet

    src = cifar_resnet(8, num_classes=100, input_shape=(16, 16, 3), name="resnet8")
    src.save_weights(str(source))
    teacher = cub.run("teacher_finetune", teacher_depth=8, image_size=16, source_weights=str(source),
                      batch_size=16, out_dir=str(tmp_path), smoke=True)
    _saved(tmp_path, teacher)
    assert teacher["source_weights"] == str(source) and teacher["completed"]
    student = cub.run("fsp", teacher_depth=8, student_depth=8, image_size=16, batch_size=16,
                      teacher_weights=str(tmp_path / "teacher_finetune_seed0.weights.h5"),
                      out_dir=str(tmp_path), smoke=True)
    assert student["stage_epochs"] == {"0": "fsp", "1": "task"}
    assert 0.0 <= student["test_accuracy"] <= 1.0


def test_run_stops_after_an_epoch_with_a_nan_loss_and_writes_no_checkpoint(tmp_path):
    """A diverged run stops at the end of its first NaN epoch (not at the end
    of the schedule), says so, and writes no checkpoint of that epoch."""
    import numpy as np

    from keras_fsp.apps import runs
    from keras_fsp.papers import recipes
    from keras_fsp.papers import cifar_resnet

    _load("cifar10_network_minimization")
    common = sys.modules["common"]  # examples/common.py, as the examples import it
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 10, 32)
    x_bad = x.copy()
    x_bad[3, 0, 0, 0] = np.nan  # one bad pixel poisons the batch norm statistics
    net = cifar_resnet(8, input_shape=(8, 8, 3))
    recipe = recipes.student_alone(net, steps_per_epoch=2, iterations=6)
    assert recipe.epochs == 3
    result = common.fit_and_report(recipe, net, (x_bad, y), (x, y), str(tmp_path), "student_alone",
                                   0, {}, batch_size=16, resume=True)
    # On TensorFlow the first epoch's loss is NaN; XLA's max(NaN, 0) = 0 in
    # the ReLUs hides it on JAX until the weights turn NaN in the second.
    epoch = result["diverged_at_epoch"]
    assert epoch in (1, 2) and result["epochs_run"] == epoch < recipe.epochs
    assert not result["completed"] and np.isnan(result["history"]["loss"][epoch - 1])
    assert np.all(np.isfinite(result["history"]["loss"][: epoch - 1]))
    # No checkpoint at all: on JAX epoch 1's loss is finite but its batch-norm
    # statistics are NaN already, and the checkpoint guard checks the weights too.
    assert runs.ResumableRun(tmp_path / "student_alone_seed0.run").latest() is None
