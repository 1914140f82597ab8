"""The `keras-fsp` command, end to end on tiny runs (in-process `cli.run`)."""

import json
import os
import sys

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")

from keras_fsp.apps import cli, data  # noqa: E402
from keras_fsp.papers import methods  # noqa: E402
from tests.helpers import run_litert  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("the CLI's SavedModel export needs TensorFlow", allow_module_level=True)

# Digits: 1,297 training images; batch 432 -> 3 steps per epoch. Scale
# 1e-4: a teacher trains 64000 * 1e-4 = 6 iterations (2 epochs); the FSP
# recipe 2 iterations of FSP (1 epoch), then 6 of the task (2 epochs).
TINY = ["--dataset=digits", "--teacher_depth=8", "--student_depth=8", "--batch_size=432",
        "--schedule_scale=0.0001", "--verbose=0"]


def _run(*args):
    return cli.run(["keras-fsp", *args])


def _csv(path):
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


def _snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _normalize(x, info):
    return ((x.astype("float32") - info["mean"]) * (1.0 / info["std"])).astype("float32")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("runs") / "train-teacher-digits"
    result = _run("train-teacher", *TINY, f"--model_dir={model_dir}")
    return model_dir, result


def test_train_teacher_writes_config_metrics_logs_checkpoints_and_export(teacher_run):
    import tensorflow as tf

    model_dir, result = teacher_run
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "subcommand": "train-teacher", "dataset": "digits", "teacher_depth": 8,
        "student_depth": 8, "teacher_width": 1, "student_width": 1, "batch_size": 432, "verbose": 0, "schedule_scale": 0.0001,
        "model_dir": str(model_dir), "seed": 0, "epochs": None, "learning_rate_scale": 1.0,
        "weight_decay": 1e-4, "temperature": None, "data_dir": None, "overwrite": False,
        "method": "fsp", "method_options": [], "teacher": None, "model": None, "num_images": 6,
        "max_minutes": None, "tensorboard": False, "formats": ["keras", "saved_model"],
        "checkpoint_seconds": None, "dtype_policy": "float32", "plugins": [],
        "optimizer": "sgd", "cutout": 0,
        "allow_weak_teacher": False, "raw_inputs": True, "student": None, "image_size": [],
        "validation_split": 0.2, "teacher_weights": [], "teacher_precision": None,
        "compilation_cache_dir": os.path.join("~", ".cache", "keras_fsp", "jax"),
        "history": [{"from_epoch": 0, "learning_rate_scale": 1.0}],
    }
    data_stats = config.pop("data")
    assert config == expected
    assert data_stats["num_classes"] == 10 and data_stats["input_shape"] == [8, 8, 1]
    assert len(data_stats["mean"]) == len(data_stats["std"]) == 1 and data_stats["std"][0] > 0
    config["data"] = data_stats

    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["epochs_done"] == metrics["epochs_total"] == 2 and metrics["complete"]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["steps_per_epoch"] == 3
    rows = _csv(model_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["epoch-000001", "epoch-000002", "latest"]
    log = (model_dir / "log.txt").read_text()
    assert "epoch 2/2 " in log and "test accuracy" in log
    assert metrics["files"]["curves"] == str(model_dir / "curves.png")
    assert (model_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The SavedModel takes the raw images and normalises them itself, with
    # the statistics the run's config.json and metrics.json record.
    (_, _), (x_test, y_test), info = data.load_arrays("digits")
    x = _normalize(x_test[:64], info)
    teacher = keras.saving.load_model(model_dir / "teacher.keras")
    logits = np.asarray(teacher.predict(x, verbose=0))
    served = tf.saved_model.load(str(model_dir / "export")).signatures["serving_default"]
    raw = np.asarray(x_test[:64], "float32")
    np.testing.assert_allclose(served(inputs=tf.constant(raw))["logits"].numpy(), logits,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(config["data"]["mean"], info["mean"], rtol=1e-6)
    assert metrics["inputs_normalization"] == {"mean": config["data"]["mean"],
                                               "std": config["data"]["std"]}
    full = np.argmax(teacher.predict(_normalize(x_test, info), verbose=0), axis=1)
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(full == y_test)), abs=1e-6)


def test_distill_stops_at_epochs_then_resumes_at_the_right_epoch(teacher_run, tmp_path):
    teacher_dir, _ = teacher_run
    model_dir = tmp_path / "distill-fsp-digits"
    args = ["distill", "--method=fsp", *TINY, f"--teacher={teacher_dir}", f"--model_dir={model_dir}"]
    first = _run(*args, "--epochs=1")
    assert (first["epochs_done"], first["epochs_total"], first["complete"]) == (1, 3, False)
    assert "keras" not in first["files"] and not (model_dir / "student.keras").exists()  # unfinished
    assert first["stages"] == {"0": "fsp", "1": "task"}
    assert 0.0 <= first["teacher_test_accuracy"] <= 1.0

    # As a run made before --dtype_policy and --compilation_cache_dir existed:
    # it resumes as float32 with the default cache.
    config = json.loads((model_dir / "config.json").read_text())
    del config["dtype_policy"], config["compilation_cache_dir"]
    (model_dir / "config.json").write_text(json.dumps(config))
    second = _run(*args)  # resumes in stage fsp, switches to task at once
    assert second["initial_epoch"] == 1 and second["complete"] and second["epochs_done"] == 3
    rows = _csv(model_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert [r["stage"] for r in rows] == ["fsp", "task", "task"]
    assert rows[0]["fsp_loss"] and rows[0]["accuracy"] == "" and rows[2]["accuracy"]
    assert "resuming from" in (model_dir / "log.txt").read_text()
    assert json.loads((model_dir / "config.json").read_text())["epochs"] is None
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["epoch-000002", "epoch-000003", "latest"]
    assert second["files"] == {"keras": str(model_dir / "student.keras"),
                               "weights": str(model_dir / "student.weights.h5"),
                               "saved_model": str(model_dir / "export"),
                               "curves": str(model_dir / "curves.png")}

    # Changing a setting of a run with checkpoints is refused.
    before = _snapshot(model_dir)
    with pytest.raises(cli.CLIError, match=r"other settings: --seed=1 \(was 0\).*--overwrite"):
        _run(*args, "--seed=1")
    assert _snapshot(model_dir) == before


@pytest.mark.parametrize("flag, refused", [
    ("--dtype_policy=mixed_bfloat16", r"--dtype_policy='float32' \(was 'mixed_bfloat16'\)"),
    # The checkpoints hold the bfloat16 teacher's weights: a resumed run makes
    # the same teacher to load them into.
    ("--teacher_precision=bfloat16", r"--teacher_precision=None \(was 'bfloat16'\)")],
    ids=["dtype_policy", "teacher_precision"])
def test_bfloat16_trains_exports_float32_and_resumes_only_under_its_setting(
        teacher_run, tmp_path, flag, refused):
    teacher_dir, _ = teacher_run
    model_dir = tmp_path / "distill-kd-bf16"
    args = ["distill", "--method=kd", *TINY, f"--teacher={teacher_dir}", f"--model_dir={model_dir}",
            flag]
    first = _run(*args, "--epochs=1")
    assert keras.config.dtype_policy().name == "float32"  # restored after the run
    name, value = flag[2:].split("=")
    assert json.loads((model_dir / "config.json").read_text())[name] == value
    if name == "teacher_precision":  # the teacher checked as it teaches
        assert "teacher.keras in bfloat16: " in (model_dir / "log.txt").read_text()
    with pytest.raises(cli.CLIError, match=refused):
        _run(*args[:-1])
    result = _run(*args)
    assert first["epochs_done"] == 1 and result["complete"] and result["initial_epoch"] == 1
    assert 0.0 <= result["teacher_test_accuracy"] <= 1.0
    student = keras.saving.load_model(result["files"]["keras"], compile=False)
    assert {layer.compute_dtype for layer in student.layers} == {"float32"}
    assert {v.dtype for v in student.weights} == {"float32"}
    (_, _), (x, y), info = data.load_arrays("digits")
    # The reported accuracy is that of the exported (float32) network.
    accuracy = np.mean(np.argmax(student.predict(_normalize(x, info), verbose=0), 1) == y)
    assert accuracy == pytest.approx(result["test_accuracy"], abs=1e-9)


# One method of each kind of recipe through the command line (fsp and none
# are trained by other tests; every method of the table builds and computes
# each stage's loss in tests/test_recipes.py, its terms against numpy in
# tests/test_terms.py): hints then KD, dense FSP's steps, a one-stage feature
# term with labels, flow then KD, a batch-level term, a relational one,
# logits only.
CLI_METHODS = ("fitnet", "dense-fsp", "at", "fsp-kd", "dist", "sp", "kd")


def test_the_methods_trained_here_are_of_the_table():
    assert set(CLI_METHODS) <= set(methods.METHODS)


@pytest.mark.parametrize("method", CLI_METHODS)
def test_every_method_trains_an_epoch(teacher_run, tmp_path, method):
    teacher_dir, _ = teacher_run
    result = _run("distill", f"--method={method}", *TINY, "--epochs=1", "--temperature=2", f"--teacher={teacher_dir}",
                  f"--model_dir={tmp_path / method}")
    assert result["epochs_done"] == 1 and 0.0 <= result["test_accuracy"] <= 1.0
    first_stage = {"dense-fsp": "dense_fsp_1", "fitnet": "hint", "kd": "kd", "at": "at",
                   "dkd": "dkd", "fsp-kd": "fsp", "at-kd": "at_kd"}.get(method, result["stages"]["0"])
    rows = _csv(tmp_path / method / "metrics.csv")
    assert rows[0]["stage"] == first_stage and len(rows) == 1
    assert 0.0 <= result["teacher_test_accuracy"] <= 1.0


def test_npz_dataset_student_alone_then_evaluate_and_export(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    arrays = tmp_path / "tiny.npz"
    np.savez(arrays, x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(40) % 3, x_test=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
             y_test=np.arange(12) % 3, class_names=np.array(["a", "b", "c"]))
    dataset = f"--dataset=npz:{arrays}"
    run_dir = tmp_path / "alone"
    # The student alone (no teacher needed): 64000 * 3e-5 = 2 iterations, 1 epoch of 40 // 16.
    trained = _run("distill", "--method=none", dataset, "--student_depth=8", "--batch_size=16",
                   "--schedule_scale=0.00003", f"--model_dir={run_dir}", "--verbose=0")
    assert (trained["epochs_total"], trained["steps_per_epoch"], trained["complete"]) == (1, 2, True)
    assert trained["teacher_test_accuracy"] is None and trained["stages"] == {}
    assert trained["test_accuracy"] in {k / 12 for k in range(13)}
    assert json.loads((run_dir / "config.json").read_text())["teacher"] is None

    evaluated = _run("evaluate", dataset, f"--model={run_dir}", f"--model_dir={tmp_path / 'eval'}")
    assert evaluated["model"] == str(run_dir / "student.keras")
    assert evaluated["test_accuracy"] == trained["test_accuracy"]
    assert evaluated["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-6)

    exported = _run("export", dataset, f"--model={run_dir}", f"--model_dir={tmp_path / 'export'}")
    assert exported["model"] == str(run_dir / "student.keras")
    model = keras.saving.load_model(tmp_path / "export" / "model.keras")
    assert model.output_shape == (None, 3)
    (_, _), (x_test, _), info = data.load_arrays(f"npz:{arrays}")
    x = _normalize(x_test, info)
    served = tf.saved_model.load(str(tmp_path / "export" / "export"))  # raw uint8 pixels, as floats
    logits = served.signatures["serving_default"](
        inputs=tf.constant(np.asarray(x_test, "float32")))["logits"].numpy()
    np.testing.assert_allclose(logits, np.asarray(model.predict(x, verbose=0)), rtol=1e-5, atol=1e-5)


def test_export_takes_the_runs_dataset_and_writes_every_format(teacher_run, tmp_path):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")

    model_dir, _ = teacher_run
    out = tmp_path / "exported"
    # No --dataset: the run's config.json says digits (the default would be
    # digits too, so an npz run is the real test below).
    result = _run("export", f"--model={model_dir}", f"--model_dir={out}",
                  "--formats=keras,litert,litert_int8,onnx")
    assert sorted(result["files"]) == ["keras", "litert", "litert_int8", "onnx"]
    assert sorted(os.listdir(out)) == sorted(
        [".lock", "config.json", "log.txt", "metrics.json", "model.keras", "model.tflite",
         "model_int8.tflite", "model.onnx"])
    (_, _), (x_test, y_test), info = data.load_arrays("digits")
    x = _normalize(x_test, info)
    expected = np.asarray(keras.saving.load_model(out / "model.keras").predict(x, verbose=0))
    # LiteRT and ONNX take the raw images, as they come (floats here), and
    # give the accuracy the training run reported.
    raw = np.asarray(x_test, "float32")

    def litert(path):
        return run_litert(path, raw)[0]

    np.testing.assert_allclose(litert(out / "model.tflite"), expected, rtol=1e-4, atol=1e-4)
    session = ort.InferenceSession(str(out / "model.onnx"))
    onnx_logits = session.run(None, {session.get_inputs()[0].name: raw})[0]
    np.testing.assert_allclose(onnx_logits, expected, rtol=1e-4, atol=1e-4)
    reported = json.loads((model_dir / "metrics.json").read_text())["test_accuracy"]
    assert np.mean(onnx_logits.argmax(1) == y_test) == pytest.approx(reported, abs=1e-9)
    assert result["inputs"] == "raw" and result["output"] == "logits"
    # int8: close to the float network's decisions, not bit-equal.
    agree = np.mean(litert(out / "model_int8.tflite").argmax(1) == expected.argmax(1))
    assert agree > 0.9, agree
    # --noraw_inputs: the network alone, normalised inputs.
    alone = _run("export", f"--model={model_dir}", f"--model_dir={tmp_path / 'alone'}",
                 "--formats=onnx", "--noraw_inputs")
    session = ort.InferenceSession(alone["files"]["onnx"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], expected,
                               rtol=1e-4, atol=1e-4)

    with pytest.raises(cli.CLIError, match="--formats keras,tflite: choose one or more of"):
        _run("export", f"--model={model_dir}", f"--model_dir={tmp_path / 'x'}",
             "--formats=keras,tflite")


def test_export_of_an_npz_run_needs_no_dataset_flag(tmp_path):
    rng = np.random.default_rng(1)
    arrays = tmp_path / "tiny.npz"
    np.savez(arrays, x_train=rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(32) % 3, x_test=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
             y_test=np.arange(6) % 3)
    run_dir = tmp_path / "alone"
    _run("distill", "--method=none", f"--dataset=npz:{arrays}", "--student_depth=8",
         "--batch_size=16", "--schedule_scale=0.00003", f"--model_dir={run_dir}", "--verbose=0")
    result = _run("export", f"--model={run_dir}", f"--model_dir={tmp_path / 'out'}",
                  "--formats=keras")
    assert result["dataset"] == f"npz:{arrays}" and list(result["files"]) == ["keras"]
    # A .keras file of a run folder: the folder's config says the data set too.
    result = _run("export", f"--model={run_dir / 'student.keras'}",
                  f"--model_dir={tmp_path / 'out3'}", "--formats=keras")
    assert result["dataset"] == f"npz:{arrays}"
    # An explicit --dataset still wins, and is checked against the model.
    with pytest.raises(cli.CLIError, match=r"and has 3 outputs; the dataset has \(8, 8, 1\) images and 10 classes"):
        _run("export", f"--model={run_dir}", f"--model_dir={tmp_path / 'out2'}",
             "--dataset=digits")


def test_cifar10_through_mocked_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        # 64000 * 1e-5 -> 1 iteration: the whole schedule is 1 epoch of 1 step.
        result = _run("train-teacher", "--dataset=cifar10", "--teacher_depth=8", "--batch_size=24",
                      "--schedule_scale=0.00001", f"--model_dir={tmp_path / 'c10'}", "--verbose=0")
    assert result["complete"] and result["epochs_done"] == 1 and result["steps_per_epoch"] == 1
    assert 0.0 <= result["test_accuracy"] <= 1.0
    model = keras.saving.load_model(tmp_path / "c10" / "teacher.keras")
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)


def test_visualize_draws_teacher_and_student(teacher_run, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tf_keras_vis")
    teacher_dir, _ = teacher_run
    result = _run("visualize", "--dataset=digits", f"--teacher={teacher_dir}",
                  f"--model={teacher_dir / 'teacher.keras'}", "--num_images=2",
                  f"--model_dir={tmp_path / 'pictures'}", "--verbose=0")
    assert [os.path.basename(p) for p in result["files"]] == ["attributions.png", "fsp_matrices.png"]
    for path in result["files"]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_nan_loss_stops_with_one_line_and_writes_no_results(teacher_run, tmp_path):
    teacher_dir, _ = teacher_run
    model_dir = tmp_path / "nan"
    with pytest.raises(cli.CLIError) as error:
        _run("distill", "--method=fsp", *TINY, "--learning_rate_scale=1e30", f"--teacher={teacher_dir}", f"--model_dir={model_dir}")
    message = error.value.message
    assert error.value.code == 1 and "\n" not in message
    assert "in stage 'fsp' at epoch 1, batch 2;" in message and "became" in message
    assert "no checkpoint had been written yet" in message and "--learning_rate_scale" in message
    recorded = json.loads((model_dir / "metrics.json").read_text())
    assert recorded["complete"] is False and "fsp_loss became" in recorded["diverged"]
    assert not (model_dir / "export").exists() and not (model_dir / "student.keras").exists()
    assert "error: fsp_loss became" in (model_dir / "log.txt").read_text()


def test_bad_inputs_give_one_line_and_touch_nothing(teacher_run, tmp_path, capsys):
    teacher_dir, _ = teacher_run
    before = _snapshot(teacher_dir)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    distill = ["distill", *TINY, f"--model_dir={tmp_path / 'd'}"]
    cases = {
        "unknown subcommand 'train'; choose one of train-teacher, distill, evaluate, export, visualize":
            ["train"],
        f"unknown method 'fsp2'; choose one of {', '.join(methods.METHODS)}.":
            ["distill", "--method=fsp2"],
        "Unknown command line flag 'learning_rate'":
            ["distill", "--learning_rate=0.1"],
        "--teacher_depth must be 6n+2": ["train-teacher", "--teacher_depth=10"],
        f"npz:{tmp_path}/missing.npz: no such file":
            ["train-teacher", f"--dataset=npz:{tmp_path}/missing.npz"],
        "not a readable .npz file": ["train-teacher", f"--dataset=npz:{garbage}"],
        f"--teacher {tmp_path}/none: no such file or folder; train one with `keras-fsp train-teacher":
            [*distill, f"--teacher={tmp_path}/none"],
        # Weights alone are loaded into the ResNet the flags describe.
        "does not match a ResNet-14 (--teacher_depth, --teacher_width) for digits":
            [*distill, "--teacher_depth=14", f"--teacher={teacher_dir / 'teacher.weights.h5'}"],
        "does not match a ResNet-8 (--teacher_depth, --teacher_width) for npz":
            ["distill", f"--dataset=npz:{_npz(tmp_path, classes=4)}",
             f"--teacher={teacher_dir / 'teacher.weights.h5'}", "--teacher_depth=8",
             f"--model_dir={tmp_path / 'd'}"],
        # Same variables, another shape: the message names one and both shapes.
        "1 layer(s) do not fit; e.g. logits/kernel has shape (64, 4) in the model and (64, 10) "
        "in the file.":
            ["distill", f"--dataset=npz:{_npz(tmp_path, classes=4)}",
             f"--teacher={teacher_dir / 'teacher.weights.h5'}", "--teacher_depth=8",
             f"--model_dir={tmp_path / 'd'}"],
        # A .keras file (a run folder's) is its own architecture.
        "teacher.keras takes (8, 8, 1) images and has 10 outputs; the dataset has (8, 8, 1) "
        "images and 4 classes":
            ["distill", f"--dataset=npz:{_npz(tmp_path, classes=4)}", f"--teacher={teacher_dir}",
             f"--model_dir={tmp_path / 'd'}"],
        # Bad input aimed at an existing run: refused before anything is written.
        "--teacher_depth must be 6n+2 (8, 14, 20, 26, 32, 56, 110, ...); got 9.":
            ["train-teacher", f"--model_dir={teacher_dir}", "--teacher_depth=9"],
        "other settings: --teacher_depth=14 (was 8)":
            ["train-teacher", *TINY, f"--model_dir={teacher_dir}", "--teacher_depth=14"],
        "holds a training run; evaluate writes its config.json and metrics.json":
            ["evaluate", f"--model={teacher_dir}", f"--model_dir={teacher_dir}"],
    }
    for expected, argv in cases.items():
        with pytest.raises(cli.CLIError) as error:
            _run(*argv)
        assert expected in error.value.message, (argv, error.value.message)
        assert "\n" not in error.value.message and error.value.code == 2
    assert not (tmp_path / "d").exists()
    assert _snapshot(teacher_dir) == before

    # main: one line on stderr, exit status 2, no traceback.
    assert cli.main(["keras-fsp", "distill", "--method=nope"]) == 2
    err = capsys.readouterr().err
    assert err == f"keras-fsp: error: unknown method 'nope'; choose one of {', '.join(methods.METHODS)}.\n"
    assert list(methods.METHODS)[:3] == ["none", "kd", "fitnet"]  # the table's order


def _npz(folder, classes):
    path = folder / f"classes{classes}.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((8, 8, 8, 1), dtype=np.float32), y_train=np.arange(8) % classes,
             x_test=rng.random((4, 8, 8, 1), dtype=np.float32), y_test=np.arange(4) % classes)
    return path


def test_help(capsys):
    assert cli.main(["keras-fsp", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in cli.SUBCOMMANDS)
    assert cli.main(["keras-fsp", "train-teacher", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--schedule_scale" in out and "--learning_rate_scale" in out


def test_tensorboard_logs_every_term_and_the_stage(teacher_run, tmp_path):
    pytest.importorskip("tensorboard")
    import tensorflow as tf

    teacher_dir, _ = teacher_run
    model_dir = tmp_path / "tb"
    _run("distill", "--method=fsp", *TINY, "--tensorboard", f"--teacher={teacher_dir}",
         f"--model_dir={model_dir}")
    tags = {}
    for path in (model_dir / "tensorboard" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    assert len(tags["epoch_fsp_loss"]) == 1 and len(tags["epoch_task_loss"]) == 2
    assert tags["epoch_stage_index"] == [0.0, 1.0, 1.0]  # fsp, then task


MY_METHOD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "examples", "my_method.py")


@pytest.fixture
def plugin_registries(monkeypatch):
    """What a plugin registers stays in this test."""
    from keras_fsp.terms import base

    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.delitem(sys.modules, "keras_fsp_plugin_my_method", raising=False)
    return monkeypatch


def test_a_method_in_one_file_runs_from_the_command_line(plugin_registries, teacher_run, tmp_path,
                                                         capsys):
    teacher_dir, _ = teacher_run
    plugin = f"--plugins={MY_METHOD}"
    assert cli.main(["keras-fsp", plugin, "distill", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    # every method of the table, the plugin's last
    assert list(methods.METHODS)[:2] + list(methods.METHODS)[-1:] == ["none", "kd", "logit-mse"]
    assert f"--method: distill: one of {', '.join(methods.METHODS)} (none:" in help_text

    from keras_fsp.training import RunFolder

    written = []
    write_result = RunFolder.write_result
    plugin_registries.setattr(RunFolder, "write_result",
                              lambda self, result: written.append(self.path) or write_result(self, result))
    run_dir = tmp_path / "mine"
    result = _run(plugin, "distill", "--method=logit-mse", *TINY, f"--teacher={teacher_dir}",
                  f"--model_dir={run_dir}")
    assert written == [str(run_dir)]  # metrics.json is written once
    assert result["complete"] and result["method"] == "logit-mse" and result["name"] == "logit-mse"
    rows = _csv(run_dir / "metrics.csv")
    assert [r["stage"] for r in rows] == ["logit_mse"] * len(rows)
    assert all(float(r["logit_mse_loss"]) > 0 for r in rows)
    assert json.loads((run_dir / "config.json").read_text())["plugins"] == [MY_METHOD]

    # keras-fsp reproduce takes it too, and passes the plugin to each run.
    from keras_fsp.apps import reproduce

    argv = ["reproduce", "cifar10-resnet26-to-resnet8", "--methods=kd,logit-mse", "--seeds=0",
            f"--runs_dir={tmp_path / 'table'}", f"--results_dir={tmp_path / 'results'}",
            "--summary_only", "--dataset=digits"]
    summary = _run(plugin, *argv)
    assert list(summary["rows"]) == ["teacher", "kd", "logit-mse"]
    assert summary["rows"]["logit-mse"]["label"] == "logit MSE + labels (a plugin)"
    flags, _ = reproduce._flags(argv)
    flags.seeds, flags.plugins = [0], [MY_METHOD]
    runs = reproduce.TABLES["cifar10-resnet26-to-resnet8"].runs(flags, str(tmp_path / "table"))
    mine = next(r for r in runs if r.method == "logit-mse")
    assert f"--plugins={MY_METHOD}" in mine.argv and "--method" in mine.argv

    with pytest.raises(cli.CLIError, match=r"--plugins .*nowhere.py: no such file"):
        _run("--plugins=nowhere.py", "distill", "--method=kd")


@pytest.mark.parametrize("table, depth", [("cifar10-resnet26x4-to-resnet8", 8),
                                          ("cifar10-resnet26x4-to-resnet20", 20)])
def test_the_strong_teacher_tables_run_a_wide_teacher_under_the_given_policy(tmp_path, table,
                                                                            depth):
    from keras_fsp.apps import reproduce

    argv = ["reproduce", table, "--methods=none,kd", "--seeds=0,1",
            "--dtype_policy=mixed_bfloat16", "--dataset=digits"]
    flags, _ = reproduce._flags(argv)
    flags.seeds = [0, 1]
    runs = reproduce.TABLES[table].runs(flags, str(tmp_path))
    assert [(r.method, r.seed) for r in runs] == [
        ("teacher", 0), ("none", 0), ("none", 1), ("kd", 0), ("kd", 1)]
    # Each command line is one the CLI takes, with the wide teacher's settings.
    configs = {(r.method, r.seed): cli.parse(["keras-fsp", *r.argv[3:]]) for r in runs}
    teacher = configs["teacher", 0]
    assert (teacher.teacher_width, teacher.weight_decay, teacher.dtype_policy) == (
        4, 5e-4, "mixed_bfloat16")
    kd = configs["kd", 1]
    assert (kd.teacher_width, kd.student_depth, kd.teacher, kd.weight_decay) == (
        4, depth, runs[0].run_dir, 1e-4)
    assert configs["none", 1].student_depth == depth
    assert runs[3].needs == runs[0].run_dir and configs["none", 0].teacher is None


def test_verbosity_a_bar_at_1_nothing_at_0_a_line_per_epoch_at_2(teacher_run, tmp_path, capsys):
    teacher_dir, _ = teacher_run
    # 64000 * 2e-4 iterations of 3 steps: 5 epochs.
    common = ["distill", "--method=kd", "--schedule_scale=0.0002",
              *[a for a in TINY if not a.startswith(("--verbose", "--schedule_scale"))],
              f"--teacher={teacher_dir}", f"--model_dir={tmp_path / 'run'}"]
    _run(*common, "--verbose=1", "--epochs=1")
    shown = capsys.readouterr().out
    assert "epoch 1/" in shown and " [kd]" in shown and "3/3" in shown and "step" in shown
    _run(*common, "--verbose=0", "--epochs=2")
    assert capsys.readouterr().out == ""
    _run(*common, "--verbose=2", "--epochs=3")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 1 and all(" [kd] " in line and "kd_loss=" in line for line in lines)
    assert "stage_index" not in (tmp_path / "run" / "log.txt").read_text()
    assert (tmp_path / "run" / "log.txt").read_text().count("epoch 1/") == 1  # each epoch logged


def test_method_options_set_the_recipe_and_are_checked_before_anything_runs(tmp_path):
    config = cli.parse(["keras-fsp", "distill", "--method=dkd",
                        "--method_options=beta=1,warmup_epochs=5"])
    assert config.method_settings == {"beta": 1.0, "warmup_epochs": 5}
    assert config.as_json()["method_options"] == ["beta=1", "warmup_epochs=5"]
    with pytest.raises(cli.CLIError, match=r"--method_options for --method kd: kd has no setting "
                                           r"'beta'; its settings \(with their defaults\): "
                                           r"iterations=64000, temperature=4.0, kd_weight=0.9"):
        cli.parse(["keras-fsp", "distill", "--method=kd", "--method_options=beta=1"])
    with pytest.raises(cli.CLIError, match="give the temperature once"):
        cli.parse(["keras-fsp", "distill", "--method=kd", "--temperature=2",
                   "--method_options=temperature=3"])


def test_reproduce_runs_a_method_with_settings_as_a_row_of_its_own(tmp_path):
    from keras_fsp.apps import reproduce

    argv = ["reproduce", "cifar10-resnet26-to-resnet8", "--methods=dkd,dkd:beta=1:warmup_epochs=5",
            "--seeds=0", "--teacher=t.weights.h5", "--dataset=digits"]
    flags, _ = reproduce._flags(argv)
    flags.seeds = [0]
    runs = reproduce.TABLES["cifar10-resnet26-to-resnet8"].runs(flags, str(tmp_path))
    assert [r.method for r in runs] == ["dkd", "dkd:beta=1:warmup_epochs=5"]
    assert os.path.basename(runs[1].run_dir) == "dkd_beta-1_warmup_epochs-5-seed0"
    configs = [cli.parse(["keras-fsp", *r.argv[3:]]) for r in runs]
    assert [c.method for c in configs] == ["dkd", "dkd"]
    assert [c.method_settings for c in configs] == [{}, {"beta": 1.0, "warmup_epochs": 5}]
    assert reproduce.label(runs[1].method) == "dkd, beta=1, warmup_epochs=5"
    flags.methods = ["dkd:gamma=1"]
    with pytest.raises(ValueError, match="dkd has no setting 'gamma'"):
        reproduce.TABLES["cifar10-resnet26-to-resnet8"].runs(flags, str(tmp_path))
