"""Norms of batch-normalised kernels: measure them, and restore them without
changing what the network computes.

A convolution (or dense layer) whose output goes straight into batch
normalisation computes the same function at any positive scale of its kernel,
but its effective learning rate falls as `lr / ||w||^2` (van Laarhoven 2017;
Hoffer et al. 2018). FSP stage 1 minimises sums of squared differences in the
thousands with plain SGD, and its large gradients multiply these norms several
times over within the first epoch (measured: RESULTS.md). Stage 2 then starts
from a network whose early layers barely move at the task's learning rate.
Rescaling each such kernel back to its initial norm, and the batch-norm
moving statistics with it, keeps the stage-1 function and restores the
learning dynamics of a freshly initialised network.
"""

import keras
import numpy as np
from keras import ops

from keras_fsp import compat, taps


def normalized_kernels(model):
    """The layers of `model` whose kernels feed only batch normalisation.

    Args:
        model: a functional `keras.Model`.

    Returns:
        list of `(layer, batch_norm_layer)`: convolutions and dense layers
        whose every consumer is one `BatchNormalization` layer normalising
        the last axis (so the kernel's scale cancels out).
    """
    found = []
    if not taps.is_functional(model):
        return found  # a subclassed model's graph cannot be read
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            continue
        consumers = {id(c): c for c in compat.consumers(layer)}
        if len(consumers) != 1:
            continue
        (bn,) = consumers.values()
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue
        try:
            rank = len(layer.output.shape)
        except (AttributeError, ValueError):  # a layer called more than once
            continue
        if bn.axis in (-1, rank - 1):
            found.append((layer, bn))
    return found


def kernel_norms(model):
    """`{layer name: Frobenius norm of its kernel}` for `normalized_kernels`."""
    return {
        layer.name: float(np.linalg.norm(ops.convert_to_numpy(layer.kernel)))
        for layer, _ in normalized_kernels(model)
    }


def restore_kernel_norms(model, norms):
    """Rescales each batch-normalised kernel of `model` to the norm in `norms`.

    The kernel (and bias, if any) of each layer named in `norms` is multiplied
    by `c = norms[name] / ||kernel||`; the following batch normalisation's
    moving mean by `c` and moving variance by `c^2`. In training mode the
    network computes exactly the same function; in inference mode the same up
    to batch normalisation's epsilon.

    Args:
        model: a functional `keras.Model`.
        norms: `{layer name: target norm}`, e.g. `kernel_norms(model)` taken
            when the model was initialised.

    Returns:
        `{layer name: c}`, the factor applied to each layer.

    Raises:
        ValueError: if a name in `norms` is not a batch-normalised kernel of
            `model`.

    Example:

    ```python
    initial = kernel_norms(student)
    ...  # FSP stage 1
    restore_kernel_norms(student, initial)  # before the task stage
    ```
    """
    layers = {layer.name: (layer, bn) for layer, bn in normalized_kernels(model)}
    unknown = sorted(set(norms) - set(layers))
    if unknown:
        raise ValueError(
            f"{unknown} are not batch-normalised kernels of {model.name!r}; "
            f"its batch-normalised kernels are {sorted(layers)}."
        )
    factors = {}
    for name, target in norms.items():
        layer, bn = layers[name]
        current = float(np.linalg.norm(ops.convert_to_numpy(layer.kernel)))
        if current == 0.0:
            continue
        c = float(target) / current
        layer.kernel.assign(layer.kernel * c)
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(layer.bias * c)
        bn.moving_mean.assign(bn.moving_mean * c)
        bn.moving_variance.assign(bn.moving_variance * (c * c))
        factors[name] = c
    return factors


class InitialKernelNorms(keras.layers.Layer):
    """The batch-normalised kernel norms of a network as it was created, as
    variables of the model that holds this layer, so that checkpoints keep
    them: a resumed run restores to the same targets
    (`keras_fsp.callbacks.RestoreKernelNorms`)."""

    def __init__(self, model, **kwargs):
        super().__init__(name="initial_kernel_norms", **kwargs)
        self.norms = {
            name: self.add_weight(shape=(), trainable=False, name=name,
                                  initializer=keras.initializers.Constant(norm))
            for name, norm in kernel_norms(model).items()
        }
        self.built = True

    def values(self):
        """`{layer name: norm}` as floats."""
        return {name: float(ops.convert_to_numpy(v)) for name, v in self.norms.items()}
