import keras
import ml_dtypes
import numpy as np
import pytest
from keras import ops

from keras_fsp import fsp_matrix
from tests import reference


def _maps(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype("float32") for s in shapes]


def test_equal_spatial_size_matches_numpy():
    f1, f2 = _maps((3, 5, 5, 4), (3, 5, 5, 6))
    g = ops.convert_to_numpy(fsp_matrix(f1, f2))
    assert g.shape == (3, 4, 6)
    np.testing.assert_allclose(g, reference.fsp(f1, f2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("first_larger", [True, False])
def test_unequal_spatial_size_pools_the_larger_map(mode, first_larger):
    big, small = (2, 8, 8, 3), (2, 4, 4, 5)
    f1, f2 = _maps(big, small) if first_larger else _maps(small, big)
    g = ops.convert_to_numpy(fsp_matrix(f1, f2, pooling=mode))
    np.testing.assert_allclose(g, reference.fsp(f1, f2, mode), rtol=1e-5, atol=1e-6)
    # Max pooling really is applied: the plain strided subsample differs.
    assert not np.allclose(g, reference.fsp(f1[:, ::2, ::2] if first_larger else f1,
                                            f2 if first_larger else f2[:, ::2, ::2]))


def test_rectangular_integer_ratio():
    f1, f2 = _maps((2, 8, 4, 3), (2, 2, 2, 2))
    g = ops.convert_to_numpy(fsp_matrix(f1, f2))
    np.testing.assert_allclose(g, reference.fsp(f1, f2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    f1, f2 = _maps((2, 32, 32, 16), (2, 16, 16, 32), seed=3)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    f1_low, f2_low = f1.astype(np_dtype), f2.astype(np_dtype)
    g = fsp_matrix(ops.convert_to_tensor(f1_low), ops.convert_to_tensor(f2_low))
    assert keras.backend.standardize_dtype(g.dtype) == "float32"
    expected = reference.fsp(f1_low.astype(np.float64), f2_low.astype(np.float64))
    # Exact float32 accumulation of the rounded inputs; a bf16 accumulation of
    # 256 products would be off by about 1e-2 relative.
    np.testing.assert_allclose(ops.convert_to_numpy(g), expected, rtol=1e-4, atol=1e-5)


def test_non_integer_ratio_names_both_shapes():
    f1, f2 = _maps((1, 6, 6, 2), (1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"\(1, 6, 6, 2\).*\(1, 4, 4, 2\)"):
        fsp_matrix(f1, f2)


def test_larger_in_one_axis_only_is_rejected():
    f1, f2 = _maps((1, 8, 2, 2), (1, 4, 4, 2))
    with pytest.raises(ValueError, match="integer multiple"):
        fsp_matrix(f1, f2)


def test_not_a_feature_map():
    with pytest.raises(ValueError, match="channels-last feature maps"):
        fsp_matrix(np.ones((2, 3)), np.ones((2, 3)))


def test_unknown_pooling():
    f1, f2 = _maps((1, 4, 4, 2), (1, 4, 4, 2))
    with pytest.raises(ValueError, match="pooling"):
        fsp_matrix(f1, f2, pooling="median")


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("shapes", [((2, 8, 8, 3), (2, 4, 4, 5)), ((2, 4, 4, 3), (2, 8, 8, 5)),
                                    ((2, 4, 4, 3), (2, 4, 4, 5)), ((2, 12, 3), (2, 6, 5))])
def test_projections_give_the_matrices_of_the_projected_features(mode, shapes):
    """Projections applied to the matrix where pooling allows it give the
    FSP matrices of the projected features, as defined."""
    from keras_fsp.terms.fsp import fsp_matrices, per_position_linear

    f1, f2 = _maps(*shapes, seed=3)
    projections = {name: per_position_linear(c, shape, f"p_{name}")
                   for name, c, shape in (("a", 7, shapes[0]), ("b", 9, shapes[1]))}
    for name, p in projections.items():  # not the initialiser's small values
        p.kernel.assign(np.random.default_rng(len(name)).normal(size=p.kernel.shape))
    kernels = {n: ops.convert_to_numpy(p.kernel).reshape(p.kernel.shape[-2:])
               for n, p in projections.items()}
    for chosen in ({"a"}, {"b"}, {"a", "b"}):
        used = {n: projections[n] for n in chosen}
        (g,) = fsp_matrices({"a": f1, "b": f2}, [("a", "b")], mode, used)
        want = reference.fsp(f1 @ kernels["a"] if "a" in chosen else f1,
                             f2 @ kernels["b"] if "b" in chosen else f2, mode)
        np.testing.assert_allclose(ops.convert_to_numpy(g), want, rtol=1e-4, atol=1e-4)
