import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_fsp
from keras_fsp import FSPDistiller
from tests.helpers import data, run_litert, small_pair

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the exports but .keras are TensorFlow-only"
)


def _trained_distiller():
    teacher, student = small_pair()
    d = FSPDistiller(teacher, student, stage="kd")
    d.compile(optimizer="sgd")
    x, y = data()
    d.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return d, x


@pytest.fixture(scope="module")
def trained():
    """(student, x, its logits), trained once for the module."""
    d, x = _trained_distiller()
    return d.student, x, d.student.predict(x, verbose=0)


def _run_litert(path, x):
    served, dtypes, inp = run_litert(path, x)
    assert inp["name"].endswith("inputs:0") and inp["dtype"] == np.float32
    return served, dtypes


def test_savedmodel_serves_without_keras_fsp(tmp_path):
    d, x = _trained_distiller()
    path = keras_fsp.export_student(d, str(tmp_path / "student"))
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({path!r})
        fn = loaded.signatures["serving_default"]
        logits = fn(inputs=tf.constant(np.load({str(tmp_path / 'x.npy')!r})))["logits"].numpy()
        np.save({str(tmp_path / 'logits.npy')!r}, logits)
        n_vars = len(loaded.variables) if hasattr(loaded, "variables") else -1
        print("VARS", n_vars)
        assert not any(m.startswith("keras_fsp") for m in sys.modules), "keras_fsp was imported"
        """
    )
    env = {**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=str(tmp_path), env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    served = np.load(tmp_path / "logits.npy")
    np.testing.assert_allclose(served, d.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    # Only the student's variables are inside: no teacher.
    n_vars = int(out.stdout.split("VARS")[-1])
    assert n_vars == len(d.student.variables)
    assert n_vars < len(d.teacher.variables)


def test_litert_float_matches_predict_and_int8_is_close(trained, tmp_path):
    pytest.importorskip("ai_edge_litert")
    student, x, logits = trained
    flt = keras_fsp.export_student(student, tmp_path / "student.tflite", format="litert")
    served, dtypes = _run_litert(str(flt), x)
    np.testing.assert_allclose(served, logits, rtol=1e-4, atol=1e-4)
    assert np.int8 not in dtypes

    q = keras_fsp.export_student(student, tmp_path / "int8.tflite", format="litert",
                                 quantize="int8", representative_data=x)
    served, dtypes = _run_litert(str(q), x)
    assert np.int8 in dtypes and os.path.getsize(q) < 0.4 * os.path.getsize(flt)
    # Int8 tolerance: every logit within 5% of the float logits' range (here
    # about 2%), and the same class for at least 90% of the images (here all):
    # random images of an almost untrained student lie near class boundaries.
    assert np.abs(served - logits).max() <= 0.05 * np.ptp(logits)
    assert (served.argmax(1) == logits.argmax(1)).mean() >= 0.9


def test_onnx_matches_predict(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    student, x, logits = trained
    path = keras_fsp.export_student(student, tmp_path / "student.onnx", format="onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (served,) = session.run(None, {"inputs": x})
    np.testing.assert_allclose(served, logits, rtol=1e-4, atol=1e-4)


def test_keras_format_overwrite_and_refusals(trained, tmp_path):
    student, x, logits = trained
    path = keras_fsp.export_student(student, str(tmp_path / "student.keras"), format="keras")
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        keras_fsp.export_student(student, path, format="keras")
    assert keras_fsp.export_student(student, path, format="keras", overwrite=True) == path

    bad = [  # (path, arguments, error, message)
        ("student.h5", {"format": "keras"}, ValueError, "ending in .keras"),
        ("x.onnx", {"format": "torch"}, ValueError, "format must be one of"),
        ("student.keras", {}, ValueError, "writes a directory"),
        ("dir.tflite", {"format": "litert"}, ValueError, "file ending in .tflite"),
        ("q.tflite", {"format": "litert", "quantize": "int8"}, ValueError, "representative_data="),
        ("q.tflite", {"format": "litert", "quantize": "int4"}, ValueError, "quantize must be"),
        ("q.onnx", {"format": "onnx", "quantize": "int8", "representative_data": x},
         ValueError, "for format='litert'"),
        ("q.tflite", {"format": "litert", "representative_data": x}, ValueError, "only used with"),
    ]
    (tmp_path / "dir.tflite").mkdir()
    for name, kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            keras_fsp.export_student(student, str(tmp_path / name), **kwargs)

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("earlier work")
    with pytest.raises(FileExistsError, match="not empty: pass overwrite=True"):
        keras_fsp.export_student(student, str(taken))
    assert (taken / "keep.txt").read_text() == "earlier work"
    keras_fsp.export_student(student, taken, overwrite=True)
    assert (taken / "saved_model.pb").exists() and not (taken / "keep.txt").exists()
    # No temporary folder is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.tflite", "student.keras", "taken"]


def test_importing_keras_fsp_does_not_import_tensorflow():
    # The numpy backend ships with Keras and does not need TensorFlow.
    # ...nor does export_student refusing the TensorFlow formats there.
    script = textwrap.dedent(
        """
        import sys, keras, keras_fsp, keras_fsp.callbacks, keras_fsp.keras_distillation
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        try:
            keras_fsp.export_student(model, "never.tflite", format="litert")
        except RuntimeError as e:
            assert "KERAS_BACKEND=tensorflow" in str(e) and "format='keras'" in str(e), e
        else:
            raise AssertionError("exported LiteRT on the numpy backend")
        bad = [m for m in sys.modules if m.split('.')[0] == 'tensorflow']
        assert not bad, bad; print('ok')
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "KERAS_BACKEND": "numpy", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
