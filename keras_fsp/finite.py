"""Whether a model's weights are finite, computed on the device and read
back at once: reading every weight back took 25 ms per epoch on a GPU (a
transfer and a wait each), one compiled call on JAX takes a few."""

import functools

import keras
import numpy as np


def _all_finite(values):
    return keras.ops.stack([keras.ops.all(keras.ops.isfinite(v)) for v in values])


@functools.cache
def _jitted_all_finite():
    import jax

    return jax.jit(_all_finite)


def finite_flags(values):
    """Whether each array of `values` holds only finite numbers."""
    if not values:
        return np.zeros((0,), bool)
    if keras.backend.backend() == "jax":
        return np.asarray(_jitted_all_finite()(values))
    return keras.ops.convert_to_numpy(_all_finite(values))


def first_non_finite(variables):
    """The path of the first of `variables` holding a NaN or inf, or None."""
    variables = list(variables)
    bad = np.flatnonzero(~finite_flags([v.value for v in variables]))
    return variables[bad[0]].path if len(bad) else None
