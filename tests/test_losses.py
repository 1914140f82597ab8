import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import FSPLoss, HintLoss, SoftTargetLoss
from tests import reference

RNG = np.random.default_rng(0)


def test_fsp_loss_by_hand():
    # One example, one 1x2 pair: ||[1, 2] - [0, 0]||^2 = 5, weight 3 -> 15.
    g_t = [np.array([[[1.0, 2.0]]], "float32")]
    g_s = [np.zeros((1, 1, 2), "float32")]
    assert float(FSPLoss(weights=[3.0])(g_t, g_s)) == pytest.approx(15.0)


def test_fsp_loss_matches_numpy_with_weights():
    g_t = [RNG.normal(size=(4, 3, 5)).astype("float32"), RNG.normal(size=(4, 5, 2)).astype("float32")]
    g_s = [RNG.normal(size=(4, 3, 5)).astype("float32"), RNG.normal(size=(4, 5, 2)).astype("float32")]
    loss = FSPLoss(weights=[0.5, 2.0])
    assert float(loss(g_t, g_s)) == pytest.approx(reference.fsp_loss(g_t, g_s, [0.5, 2.0]), rel=1e-5)
    per_example = ops.convert_to_numpy(loss.call(g_t, g_s))
    assert per_example.shape == (4,)


def test_fsp_loss_weight_count_mismatch():
    g = [np.zeros((1, 2, 2), "float32")] * 2
    with pytest.raises(ValueError, match="2 FSP matrix pairs"):
        FSPLoss(weights=[1.0])(g, g)


def test_hint_loss_by_hand_and_numpy():
    assert float(HintLoss()(np.full((1, 1, 1, 2), 3.0), np.full((1, 1, 1, 2), 1.0))) == pytest.approx(4.0)
    a, b = RNG.normal(size=(3, 4, 4, 6)), RNG.normal(size=(3, 4, 4, 6))
    assert float(HintLoss()(a, b)) == pytest.approx(reference.hint_loss(a, b), rel=1e-5)
    assert float(HintLoss(normalize=True)(a, b)) == pytest.approx(
        reference.hint_loss(a, b) / (4 * 4 * 6), rel=1e-5
    )


def test_soft_target_loss_by_hand():
    # Teacher one-hot-ish, T = 1: -log q_student(class 0) with uniform student.
    t = np.array([[100.0, 0.0]], "float32")
    s = np.zeros((1, 2), "float32")
    assert float(SoftTargetLoss(temperature=1.0)(t, s)) == pytest.approx(np.log(2.0), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_soft_target_loss_matches_numpy_with_t_squared(temperature):
    t, s = RNG.normal(size=(5, 10)) * 3, RNG.normal(size=(5, 10)) * 3
    value = float(SoftTargetLoss(temperature=temperature)(t, s))
    assert value == pytest.approx(reference.soft_target_loss(t, s, temperature), rel=1e-5)


def test_soft_target_gradient_scale_is_kept_by_t_squared():
    # d/dz_s of T^2 * KL(p_T || q_T) = T (q - p): for large T it tends to
    # (z_s - z_t) / N, independent of T, as Hinton et al. state.
    t = RNG.normal(size=(1, 10))
    s = RNG.normal(size=(1, 10))
    grads = []
    for temperature in (50.0, 100.0):
        p, q = reference.softmax(t / temperature), reference.softmax(s / temperature)
        grads.append(temperature * (q - p))
    np.testing.assert_allclose(grads[0], grads[1], rtol=0.05, atol=1e-4)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        SoftTargetLoss(temperature=0)


@pytest.mark.parametrize(
    "loss", [FSPLoss(weights=[1.0, 2.0]), HintLoss(normalize=True), SoftTargetLoss(temperature=3.0)]
)
def test_get_config_round_trip(loss):
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(clone) is type(loss)
    assert clone.get_config() == loss.get_config()
