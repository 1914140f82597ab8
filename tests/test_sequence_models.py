"""FSP, hints and attention transfer over sequences `(batch, steps,
channels)`: the maths against numpy references."""

import numpy as np
import pytest
from keras import ops

from keras_fsp import terms
from tests import reference

RNG = np.random.default_rng(0)


def _np(x):
    return ops.convert_to_numpy(x)


# ------------------------------------------------------------------ maths


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("lengths", [(6, 6), (12, 4), (4, 8)])
def test_fsp_matrix_of_sequences_equals_numpy_reference(mode, lengths):
    f1, f2 = RNG.normal(size=(3, lengths[0], 4)), RNG.normal(size=(3, lengths[1], 5))
    g = _np(terms.fsp_matrix(f1.astype("float32"), f2.astype("float32"), pooling=mode))
    assert g.shape == (3, 4, 5)
    np.testing.assert_allclose(g, reference.fsp(f1, f2, mode), rtol=1e-4, atol=1e-5)


def test_sequence_lengths_that_do_not_divide_are_an_error_saying_what_to_do():
    with pytest.raises(ValueError, match=r"\(2, 6, 3\) and \(2, 4, 3\).*integer multiple.*"
                                         r"Tap layers whose sizes divide"):
        terms.fsp_matrix(np.ones((2, 6, 3)), np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="one rank"):
        terms.fsp_matrix(np.ones((2, 4, 3)), np.ones((2, 2, 2, 3)))


def test_attention_map_of_sequences_pools_groups_of_steps():
    f = RNG.normal(size=(3, 8, 5)).astype("float32")
    np.testing.assert_allclose(_np(terms.attention_map(f)), reference.attention_map(f), rtol=1e-5)
    q = _np(terms.attention_map(f, size=(2,)))
    np.testing.assert_allclose(q, reference.attention_map(f, length=2), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
