"""The masked forms of the feature maths over tokens (a padding mask keeps
padded positions out): against independent numpy references, unchanged by
what padded positions hold, and equal to the unmasked forms under a mask
of ones."""

import numpy as np
import pytest
from keras import ops

from keras_fsp import positions, terms
from keras_fsp.terms.hint import hint_distance
from tests import reference

RNG = np.random.default_rng(3)
# 3 sequences of 8 tokens: all valid, the first 5 valid, only the first valid.
MASK = (np.arange(8)[None] < np.array([8, 5, 1])[:, None]).astype("int32")


def _np(x):
    return ops.convert_to_numpy(x)


def _features(steps, channels):
    return RNG.normal(size=(3, steps, channels)).astype("float32")


def _scrambled(f, mask):
    """`f` with other values wherever `mask` (brought to its steps) is 0."""
    valid = reference.mask_steps(mask, f.shape[1])[..., None]
    return np.where(valid, f, RNG.normal(size=f.shape) * 100).astype("float32")


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("steps,length", [(8, 8), (8, 4), (8, 2), (4, 2)])
def test_pooling_under_a_mask_averages_the_valid_tokens_of_each_group(mode, steps, length):
    f = _features(steps, 3)
    mask = reference.mask_steps(MASK, steps).astype("float32")  # (a 4-step sequence: pooled mask)
    want, valid = reference.masked_pool_steps(f, MASK, length, mode)
    np.testing.assert_allclose(_np(positions.pool(f, (length,), mode, mask)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_np(positions.pool_mask(mask, (length,))), valid)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("lengths", [(8, 8), (8, 4), (4, 8), (4, 2)])
def test_masked_fsp_matrix_equals_numpy_ignores_padding_and_a_mask_of_ones_changes_nothing(mode, lengths):
    f1, f2 = _features(lengths[0], 4), _features(lengths[1], 5)
    g = _np(terms.fsp_matrix(f1, f2, mode, mask=MASK))
    np.testing.assert_allclose(g, reference.masked_fsp(f1, f2, MASK, mode), rtol=1e-4, atol=1e-5)
    scrambled = _np(terms.fsp_matrix(_scrambled(f1, MASK), _scrambled(f2, MASK), mode, mask=MASK))
    np.testing.assert_allclose(scrambled, g, rtol=1e-5, atol=1e-6)
    assert not np.allclose(_np(terms.fsp_matrix(_scrambled(f1, MASK), f2, mode)),
                           _np(terms.fsp_matrix(f1, f2, mode)))  # (unmasked, padding counts)
    ones = np.ones_like(MASK)
    np.testing.assert_allclose(_np(terms.fsp_matrix(f1, f2, mode, mask=ones)),
                               _np(terms.fsp_matrix(f1, f2, mode)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [8, 4])
def test_masked_attention_maps_spread_over_the_tokens_only(length):
    f = _features(8, 5)
    q = _np(terms.attention_map(f, size=(length,), mask=MASK))
    valid = reference.mask_steps(MASK, length)
    assert np.all(q[~valid] == 0) and np.allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(_np(terms.attention_map(_scrambled(f, MASK), size=(length,), mask=MASK)),
                               q, rtol=1e-5)
    np.testing.assert_allclose(_np(terms.attention_map(f, size=(length,), mask=np.ones_like(MASK))),
                               reference.attention_map(f, length=length), rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_the_masked_hint_distance_sums_or_averages_the_valid_positions(normalize):
    hint, guided = _features(8, 4), _features(8, 4)
    mask = MASK.astype("float32")
    got = _np(hint_distance(hint, guided, normalize, mask)).mean()
    assert got == pytest.approx(reference.masked_hint_loss(hint, guided, MASK, normalize), rel=1e-5)
    assert _np(hint_distance(_scrambled(hint, MASK), guided, normalize, mask)).mean() == pytest.approx(got, rel=1e-5)
    np.testing.assert_allclose(_np(hint_distance(hint, guided, normalize, np.ones((3, 8), "float32"))),
                               _np(hint_distance(hint, guided, normalize)), rtol=1e-5)
