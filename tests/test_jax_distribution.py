"""Keras' distribution API (DataParallel) on JAX, over two host devices."""

import keras
import numpy as np
import pytest

from keras_fsp import FSPDistiller, jax_steps, per_replica_batch_norm
from keras_fsp.inputs import DeviceArrays
from tests.helpers import data, small_pair, weights_of

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="Keras' distribution API runs on JAX"
)


def _fit(stage, weights, groups=None, scan=False):
    """Two epochs of `stage` from `weights`. `groups`: the student's batch
    norms per replica (`per_replica_batch_norm`), else frozen (synchronised
    statistics differ from one device's only by summation order, but a
    trainable batch norm amplifies that). `scan`: `DeviceArrays` and two
    steps per dispatch through `keras_fsp.jax_steps`' compiled scan."""
    teacher, student = small_pair(weight_decay=1e-4)
    teacher.set_weights(weights[0])
    student.set_weights(weights[1])
    if groups:
        student = per_replica_batch_norm(student, groups)
    else:
        for layer in student.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    d = FSPDistiller(teacher, student, stage=stage)
    d.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), steps_per_execution=2 if scan else 1)
    x, y = data(n=32)
    if scan:
        train = DeviceArrays(x, y, batch_size=8, shuffle=False)
        history = d.fit(train, epochs=2, verbose=0).history
    else:
        history = d.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    return history, weights_of(d.student)


def _two_devices():
    import jax

    if len(jax.devices()) < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2 (tests/conftest.py sets it)")
    return jax.devices()[:2]


def _compare_one_and_two_devices(stage, **kwargs):
    devices = _two_devices()
    teacher, student = small_pair(weight_decay=1e-4)
    weights = (teacher.get_weights(), student.get_weights())
    h1, w1 = _fit(stage, weights, **kwargs)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        h2, w2 = _fit(stage, weights, **kwargs)
    finally:
        keras.distribution.set_distribution(None)
    for key in h1:
        assert np.all(np.isfinite(h1[key])), key
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-4, err_msg=key)
    # Equal up to summation order, which trainable batch norms amplify: the
    # runs differ by under 1% of what training changed.
    change = max(np.abs(a - w).max() for a, w in zip(w1, weights[1]))
    difference = max(np.abs(a - b).max() for a, b in zip(w1, w2))
    assert change > 1e-4 and difference < 1e-2 * change, (change, difference)


@pytest.mark.parametrize("stage", ["fsp", "kd"])
def test_data_parallel_matches_one_device(stage):
    _compare_one_and_two_devices(stage)


def test_per_replica_batch_norm_on_two_devices_matches_two_groups_on_one():
    # Trainable batch norms: each device normalises its own half of the
    # batch, exactly what two groups do on one device.
    _compare_one_and_two_devices("kd", groups=2)


def test_scanned_fit_on_two_devices_matches_one_device(monkeypatch):
    monkeypatch.setattr(jax_steps, "ON_CPU", True)
    _compare_one_and_two_devices("kd", groups=2, scan=True)


def test_batches_gathered_inside_the_scan_are_split_over_the_devices():
    import jax

    devices = _two_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        out = jax.jit(lambda x: jax_steps._shard_batch(x) * 2)(np.ones((8, 3), "float32"))
    finally:
        keras.distribution.set_distribution(None)
    assert sorted(s.data.shape for s in out.addressable_shards) == [(4, 3), (4, 3)]
    np.testing.assert_allclose(np.asarray(out), 2.0)
