import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import FSPDistiller
from keras_fsp.augment import PadCropFlip
from keras_fsp.terms import SoftTargetTerm
from tests import reference
from tests.helpers import data, small_pair


def test_each_image_is_a_crop_of_the_padded_original_possibly_flipped():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 2)).astype("float32")
    out = ops.convert_to_numpy(PadCropFlip(pad=2, seed=1)(x, training=True))
    padded = np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)])
    offsets, flips = set(), 0
    for i in range(len(x)):
        found = [
            (dy, dx, f)
            for dy in range(5) for dx in range(5) for f in (False, True)
            if np.array_equal(out[i], (lambda c: c[:, ::-1] if f else c)(padded[i, dy:dy + 8, dx:dx + 8]))
        ]
        assert found, f"image {i} is not a (flipped) crop"
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) > 10  # per-image offsets, not one per batch
    assert 10 < flips < 54


def test_identity_when_not_training():
    x = np.ones((2, 4, 4, 1), "float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(PadCropFlip()(x, training=False)), x)
    assert PadCropFlip.from_config(PadCropFlip(pad=3, flip=False, seed=5).get_config()).pad == 3


class _Negate(keras.layers.Layer):
    """A deterministic 'augmentation', so the test knows the batch."""

    def call(self, x, training=None):
        return -x if training else x


def test_teacher_sees_the_augmented_batch():
    teacher, student = small_pair()
    d = FSPDistiller(teacher, student, stage="kd", augment=_Negate(),
                     terms=[SoftTargetTerm(temperature=2.0)])
    d.compile(optimizer=keras.optimizers.SGD(0.0))
    x, y = data()
    t_logits = teacher.predict(-x, verbose=0)
    s_logits = ops.convert_to_numpy(student(-x, training=True))
    history = d.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history
    assert history["kd_loss"][0] == pytest.approx(reference.soft_target_loss(t_logits, s_logits, 2.0), rel=1e-4)
    # Prediction is not augmented.
    np.testing.assert_allclose(d.predict(x, verbose=0), student.predict(x, verbose=0), rtol=1e-6)
