"""The offline Quickstart demo (`python -m keras_fsp.apps.demo`), run at a tiny
scale: one training run shared by the tests of this module."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from keras_fsp.apps import demo  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_TEST = 500


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    if keras.backend.backend() != "tensorflow":
        # It runs on JAX too (less the SavedModel), but takes ~100 s there.
        pytest.skip("the demo's training run is tested on TensorFlow")
    out = tmp_path_factory.mktemp("fsp_demo")
    results = demo.run(out, epochs_scale=0.05, seed=0, verbose=0, return_models=True)
    return out, results


def _accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def test_results_values(demo_run):
    _, r = demo_run
    acc = r["accuracy"]
    assert set(acc) == {"teacher", "student_alone", "fsp_student"}
    for name, value in acc.items():
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (name, value)
    # Two teacher epochs already learn the digits (chance is 0.1).
    assert acc["teacher"] > 0.5
    assert r["epochs"] == {"teacher": 2, "task": 1, "fsp_stage": 1}
    assert r["data"] == {"train": 1297, "test": N_TEST}
    assert r["fsp_pairs"]["teacher"] == [
        ["stem", "stage1"], ["stage1", "stage2"], ["stage2", "stage3"]
    ]
    assert r["fsp_pairs"]["student"] == r["fsp_pairs"]["teacher"]

    h = r["history"]
    assert len(h["teacher_val_accuracy"]) == 2
    assert len(h["student_alone_val_accuracy"]) == 1
    assert len(h["fsp_student_val_accuracy"]) == 1 + 1  # FSP stage, then task
    assert len(h["fsp_student_fsp_loss"]) == 1
    # The test accuracies are the last epoch's validation accuracies.
    assert acc["teacher"] == pytest.approx(h["teacher_val_accuracy"][-1], abs=1e-6)
    assert acc["student_alone"] == pytest.approx(h["student_alone_val_accuracy"][-1], abs=1e-6)
    assert acc["fsp_student"] == pytest.approx(h["fsp_student_val_accuracy"][-1], abs=1e-6)
    assert r["target_accuracy"] == acc["student_alone"]

    # Epochs to reach the target, recomputed from the task-stage histories.
    reach = r["task_epochs_to_reach_target"]
    assert reach["student_alone"] == 1  # its one epoch is its final accuracy
    fsp_task = h["fsp_student_val_accuracy"][1:]
    expected = 1 if round(fsp_task[0] * N_TEST) >= round(acc["student_alone"] * N_TEST) else None
    assert reach["fsp_student"] == expected


def test_fsp_stage_moves_student_towards_teacher(demo_run):
    _, r = demo_run
    d = r["fsp_distance_to_teacher"]
    assert all(len(v) == 3 for v in d.values())
    # One epoch of the FSP stage reduces the FSP loss (several-fold on the digits).
    assert sum(d["fsp_student_after_stage_1"]) < 0.8 * sum(d["student_before"])
    assert r["history"]["fsp_student_fsp_loss"][0] > 0


def test_results_files(demo_run):
    out, r = demo_run
    saved = json.loads((out / "results.json").read_text())
    expected = {k: v for k, v in r.items() if k != "models_"}
    assert saved == json.loads(json.dumps(expected))
    md = (out / "results.md").read_text()
    for name, key in [("teacher", "teacher"), ("student alone", "student_alone"),
                      ("FSP student", "fsp_student")]:
        assert f"{r['accuracy'][key]:.4f}" in md
        assert f"| {name} (" in md
    text, _ = demo.format_table(r)
    assert any(line.startswith("student alone (ResNet-8)") and "1 of 1" in line for line in text)


@pytest.mark.parametrize("name", ["fsp_matrices.png", "training_curves.png"])
def test_pictures_are_valid_pngs(demo_run, name):
    import matplotlib.image

    out, _ = demo_run
    path = out / name
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 400 and height > 200
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width)
    assert float(np.std(image[..., :3])) > 0.01  # something is drawn


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="SavedModel needs TensorFlow")
def test_savedmodel_matches_student(demo_run):
    import tensorflow as tf

    out, r = demo_run
    student = r["models_"]["fsp_student"]
    _, _, x_test, y_test = demo.load_data(seed=0)
    loaded = tf.saved_model.load(str(out / "student_savedmodel"))
    serve = loaded.signatures["serving_default"]
    x = x_test[:8]
    logits = serve(inputs=tf.constant(x))["logits"].numpy()
    expected = student.predict(x, verbose=0)
    assert logits.shape == (8, 10)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    # The export is the distilled student: it scores what the table says.
    all_logits = serve(inputs=tf.constant(x_test))["logits"].numpy()
    assert _accuracy(all_logits, y_test) == pytest.approx(
        r["accuracy"]["fsp_student"], abs=0.5 / N_TEST
    )


def test_keras_export_matches_student(demo_run):
    out, r = demo_run
    student = r["models_"]["fsp_student"]
    _, _, x_test, _ = demo.load_data(seed=0)
    loaded = keras.saving.load_model(out / "student.keras")
    np.testing.assert_allclose(
        loaded.predict(x_test[:8], verbose=0), student.predict(x_test[:8], verbose=0),
        rtol=1e-5, atol=1e-5,
    )


def test_load_data_split():
    x_train, y_train, x_test, y_test = demo.load_data(seed=0)
    assert x_train.shape == (1297, 8, 8, 1) and x_test.shape == (N_TEST, 8, 8, 1)
    assert x_train.dtype == np.float32
    assert 0.0 == x_train.min() and x_train.max() == 1.0
    # Stratified: every class in the test split in proportion (about 50 each).
    counts = np.bincount(y_test, minlength=10)
    assert counts.min() >= 48 and counts.max() <= 52
    again = demo.load_data(seed=0)
    np.testing.assert_array_equal(again[3], y_test)
    assert not np.array_equal(demo.load_data(seed=1)[3], y_test)


def test_epochs_to_reach():
    assert demo.epochs_to_reach([0.5, 0.9, 0.95], 0.9, 500) == 2
    assert demo.epochs_to_reach([0.5, 0.8], 0.9, 500) is None
    # Float round-off of the same count (492/500) still counts as reached.
    assert demo.epochs_to_reach([0.98399997], 0.984000027, 500) == 1
    assert demo.epochs_to_reach([0.982], 0.984, 500) is None


def test_task_epochs_to_reach_skips_the_fsp_stage():
    # FSP stage of 2 epochs (at chance), then the task stage.
    reach = demo.task_epochs_to_reach([0.9, 0.97, 0.98], [0.1, 0.99, 0.98, 0.99], 2, 0.98, 500)
    assert reach == {"student_alone": 3, "fsp_student": 1}
    reach = demo.task_epochs_to_reach([0.98], [0.99, 0.97], 1, 0.98, 500)
    assert reach == {"student_alone": 1, "fsp_student": None}


def test_scaled_epochs():
    assert demo.scaled_epochs(30, 1.0) == 30
    assert demo.scaled_epochs(30, 0.05) == 2
    assert demo.scaled_epochs(10, 0.01) == 1


def test_output_dir_replaces_only_an_earlier_savedmodel(tmp_path):
    old = tmp_path / "student_savedmodel"
    old.mkdir()
    (old / "saved_model.pb").write_bytes(b"x")
    demo._prepare_output_dir(tmp_path)
    assert not old.exists()
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        demo._prepare_output_dir(tmp_path)
    assert (old / "notes.txt").exists()


def test_run_rejects_bad_scale(tmp_path):
    with pytest.raises(ValueError, match="epochs_scale"):
        demo.run(tmp_path, epochs_scale=0)


def test_command_line_flags_reach_run():
    """`python -m keras_fsp.apps.demo` flags, parsed by absl's app.run, in a
    subprocess (the flags are global state): importing the module defines
    none, defining them twice is harmless, and main hands them to run."""
    script = textwrap.dedent(
        """
        import json
        from absl import app, flags
        from keras_fsp.apps import demo

        assert "epochs_scale" not in flags.FLAGS, "importing defined flags"
        calls = []
        demo.run = lambda *a, **k: calls.append([list(a), k])
        demo._define_flags()
        demo._define_flags()
        try:
            app.run(demo.main, argv=["demo", "--output_dir=somewhere",
                                     "--epochs_scale=0.25", "--seed=7"])
        except SystemExit as e:
            assert not e.code, e.code
        print("CALLS", json.dumps(calls))
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("CALLS ")][-1]
    assert json.loads(line[6:]) == [[["somewhere"], {"epochs_scale": 0.25, "seed": 7}]]
