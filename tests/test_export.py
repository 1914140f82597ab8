import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_fsp
from keras_fsp import FSPDistiller
from tests.helpers import data, small_pair

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="SavedModel export is TensorFlow-only"
)


def _trained_distiller():
    teacher, student = small_pair()
    d = FSPDistiller(teacher, student, stage="kd")
    d.compile(optimizer="sgd")
    x, y = data()
    d.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return d, x


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


def test_keras_format_and_refusals(tmp_path):
    d, x = _trained_distiller()
    path = keras_fsp.export_student(d, str(tmp_path / "student.keras"), format="keras")
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), d.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ending in .keras"):
        keras_fsp.export_student(d, str(tmp_path / "student.h5"), format="keras")
    with pytest.raises(ValueError, match="format must be"):
        keras_fsp.export_student(d, str(tmp_path / "x"), format="onnx")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("earlier work")
    with pytest.raises(FileExistsError, match="not empty"):
        keras_fsp.export_student(d, str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "earlier work"


def test_importing_keras_fsp_does_not_import_tensorflow():
    # The numpy backend ships with Keras and does not need TensorFlow.
    script = (
        "import sys, keras_fsp, keras_fsp.callbacks, keras_fsp.keras_distillation;"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'tensorflow'];"
        "assert not bad, bad; print('ok')"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "KERAS_BACKEND": "numpy", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
