"""Keras' distribution API (DataParallel) on JAX, over two host devices."""

import keras
import numpy as np
import pytest

from keras_fsp import FSPDistiller
from tests.helpers import data, small_pair, weights_of

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="Keras' distribution API runs on JAX"
)


def _fit(stage, weights, distribution=None):
    teacher, student = small_pair(weight_decay=1e-4)
    for layer in student.layers:  # per-device batch statistics differ by design
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    teacher.set_weights(weights[0])
    student.set_weights(weights[1])
    d = FSPDistiller(teacher, student, stage=stage)
    d.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    x, y = data(n=32)
    history = d.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    return history, weights_of(d.student)


@pytest.mark.parametrize("stage", ["fsp", "kd"])
def test_data_parallel_matches_one_device(stage):
    import jax

    if len(jax.devices()) < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2 (tests/conftest.py sets it)")
    teacher, student = small_pair(weight_decay=1e-4)
    weights = (teacher.get_weights(), student.get_weights())
    h1, w1 = _fit(stage, weights)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()[:2]))
    try:
        h2, w2 = _fit(stage, weights)
    finally:
        keras.distribution.set_distribution(None)
    for key in h1:
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-4, err_msg=key)
    for before, a, b in zip(weights[1], w1, w2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(b, a) for b, a in zip(weights[1], w1))
