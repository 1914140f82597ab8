"""ReplicaBatchNormalization and per_replica_batch_norm against a numpy
reference (the data-parallel equivalence runs in test_jax_distribution.py)."""

import os

import keras
import numpy as np
import pytest

from keras_fsp import ReplicaBatchNormalization, per_replica_batch_norm
from keras_fsp.papers import cifar_resnet
from tests import reference

RNG = np.random.default_rng(0)


def _layer(groups, channels=3, momentum=0.9):
    layer = ReplicaBatchNormalization(groups=groups, momentum=momentum)
    layer.build((None, 4, 4, channels))
    layer.gamma.assign(RNG.uniform(0.5, 2.0, channels).astype("float32"))
    layer.beta.assign(RNG.normal(size=channels).astype("float32"))
    layer.moving_mean.assign(RNG.normal(size=channels).astype("float32"))
    layer.moving_variance.assign(RNG.uniform(0.5, 2.0, channels).astype("float32"))
    return layer


def _np(v):
    return keras.ops.convert_to_numpy(v)


@pytest.mark.parametrize("groups", [2, 4])
def test_training_normalises_each_group_with_its_own_statistics(groups):
    layer = _layer(groups)
    # Groups with different means and scales: shared statistics would not
    # normalise each of them.
    x = (RNG.normal(size=(8, 4, 4, 3)) * np.repeat(np.arange(1, 9), 48).reshape(8, 4, 4, 3)
         + np.arange(8).reshape(8, 1, 1, 1)).astype("float32")
    gamma, beta = _np(layer.gamma), _np(layer.beta)
    moving_mean, moving_var = _np(layer.moving_mean), _np(layer.moving_variance)
    expected, mean, var = reference.batch_norm_per_group(x, gamma, beta, groups, layer.epsilon)
    out = _np(layer(x, training=True))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(layer.moving_mean), 0.9 * moving_mean + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(_np(layer.moving_variance), 0.9 * moving_var + 0.1 * var, rtol=1e-5)
    whole, _, _ = reference.batch_norm_per_group(x, gamma, beta, 1, layer.epsilon)
    assert np.abs(out - whole).max() > 0.1  # differs from global statistics


def _same_as_batch_norm(layer, x, training):
    plain = keras.layers.BatchNormalization(momentum=layer.momentum)
    plain.build(x.shape)
    plain.set_weights(layer.get_weights())
    np.testing.assert_allclose(_np(layer(x, training=training)), _np(plain(x, training=training)),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(layer.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("groups, batch, training", [
    (1, 8, True),    # one group: Keras' batch norm
    (2, 8, False),   # inference: the moving statistics
    (4, 6, True),    # a batch the groups do not divide (a partial last batch)
])
def test_falls_back_to_batch_normalization(groups, batch, training):
    x = RNG.normal(size=(batch, 4, 4, 3)).astype("float32") * 3 + 1
    _same_as_batch_norm(_layer(groups), x, training)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="positive integer"):
        ReplicaBatchNormalization(groups=0)
    with pytest.raises(ValueError, match="renorm"):
        ReplicaBatchNormalization(groups=2, renorm=True)
    with pytest.raises(ValueError, match="last axis"):
        ReplicaBatchNormalization(groups=2, axis=1).build((None, 3, 4, 4))


def test_per_replica_copy_keeps_weights_and_inference(tmp_path):
    net = cifar_resnet(8, input_shape=(16, 16, 3))
    copy = per_replica_batch_norm(net, groups=2)
    kinds = [type(l) for l in copy.layers]
    n_bn = sum(isinstance(l, keras.layers.BatchNormalization) for l in net.layers)
    assert n_bn > 0 and kinds.count(ReplicaBatchNormalization) == n_bn
    assert all(l.groups == 2 for l in copy.layers if isinstance(l, ReplicaBatchNormalization))
    x = RNG.normal(size=(4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(_np(copy(x, training=False)), _np(net(x, training=False)),
                               rtol=1e-5, atol=1e-5)
    path = os.path.join(tmp_path, "copy.keras")
    copy.save(path)
    loaded = keras.models.load_model(path)
    assert [type(l) for l in loaded.layers] == kinds
    np.testing.assert_allclose(_np(loaded(x, training=True)), _np(copy(x, training=True)),
                               rtol=1e-4, atol=1e-4)


def test_nested_and_sequential_models_are_copied():
    inner = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization()])
    inputs = keras.Input((8, 8, 3))
    outer = keras.Model(inputs, keras.layers.BatchNormalization()(inner(inputs)))
    copy = per_replica_batch_norm(outer, groups=2)
    found = [l for l in copy._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    assert len(found) == 2 and all(isinstance(l, ReplicaBatchNormalization) for l in found)


def test_subclassed_model_is_refused_with_the_fix():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    with pytest.raises(ValueError, match="ReplicaBatchNormalization\\(groups=2\\)"):
        per_replica_batch_norm(Net(), groups=2)
