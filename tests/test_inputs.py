"""`keras_fsp.inputs.DeviceArrays`: every example once per epoch, reshuffled
each epoch, and `fit` on it equal to `fit` on host arrays."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp.inputs import DeviceArrays
from tests.helpers import data, weights_of


def _epoch(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return (np.concatenate([ops.convert_to_numpy(x) for x in xs]),
            np.concatenate([ops.convert_to_numpy(y) for y in ys]))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    x = np.arange(50, dtype="float32")[:, None] * np.ones((1, 3), "float32")
    y = np.arange(50)
    ds = DeviceArrays(x, y, batch_size=16, seed=3)
    assert len(ds) == 4  # 16 + 16 + 16 + 2
    x1, y1 = _epoch(ds)
    np.testing.assert_array_equal(np.sort(y1), y)
    np.testing.assert_array_equal(x1[:, 0], y1)  # rows stay with their labels
    assert not np.array_equal(y1, y)  # shuffled
    ds.on_epoch_end()
    _, y2 = _epoch(ds)
    np.testing.assert_array_equal(np.sort(y2), y)
    assert not np.array_equal(y1, y2)  # reshuffled


def test_drop_remainder_and_no_shuffle():
    x, y = np.zeros((50, 2), "float32"), np.arange(50)
    ds = DeviceArrays(x, y, batch_size=16, shuffle=False, drop_remainder=True)
    assert len(ds) == 3
    np.testing.assert_array_equal(_epoch(ds)[1], np.arange(48))
    with pytest.raises(IndexError):
        ds[3]


def test_fit_on_device_arrays_equals_fit_on_host_arrays():
    from tests.helpers import small_pair

    x, y = data(n=48)
    runs = []
    for device in (False, True):
        _, student = small_pair(seed=0)
        student.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        if device:
            student.fit(DeviceArrays(x, y, batch_size=16, shuffle=False), shuffle=False,
                        epochs=2, verbose=0)
        else:
            student.fit(x, y, batch_size=16, shuffle=False, epochs=2, verbose=0)
        runs.append(weights_of(student))
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="x has 4 examples but y has 3"):
        DeviceArrays(np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        DeviceArrays(np.zeros((4, 2)), batch_size=0)
    with pytest.raises(ValueError, match="leaves no batch"):
        DeviceArrays(np.zeros((4, 2)), batch_size=8, drop_remainder=True)


def test_an_epochs_order_depends_only_on_seed_and_epoch():
    # What makes a resumed run see the batches of an uninterrupted one.
    x, y = np.zeros((40, 2), "float32"), np.arange(40)
    uninterrupted = DeviceArrays(x, y, batch_size=8, seed=5)
    orders = []
    for _ in range(3):
        orders.append(_epoch(uninterrupted)[1])
        uninterrupted.on_epoch_end()
    resumed = DeviceArrays(x, y, batch_size=8, seed=5, initial_epoch=2)
    np.testing.assert_array_equal(_epoch(resumed)[1], orders[2])
    other_seed = DeviceArrays(x, y, batch_size=8, seed=6)
    assert not np.array_equal(_epoch(other_seed)[1], orders[0])

