"""Copies of a functional or Sequential model with each layer rebuilt by a
given function (nested models included) and the original's weights."""

import keras

from keras_fsp import compat


def _inputs_like(model):
    """New inputs of `model`'s shapes, dtypes and structure, named as its
    input layers (`clone_model` names an unnamed `keras.Input`'s layer after
    its tensor); None for a Sequential model."""
    if isinstance(model, keras.Sequential):
        return None
    names = {id(layer.output): layer.name for layer in model.layers
             if isinstance(layer, keras.layers.InputLayer)}
    return keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=names.get(id(t), t.name)),
        model.input)


def rebuilt_copy(model, rebuild_layer):
    """A copy of `model` whose layers are `rebuild_layer(layer)`, holding
    `model`'s weights (`rebuild_layer` must keep the layers' weights), its
    layers named as `model`'s."""
    def rebuild(operation):
        if not isinstance(operation, keras.layers.Layer):
            # An op of the graph (`x + y`, ConvNeXt's): no weights, no dtype policy.
            return operation.__class__.from_config(operation.get_config())
        return rebuild_layer(operation)

    copy = keras.models.clone_model(model, input_tensors=_inputs_like(model),
                                    clone_function=rebuild, recursive=True)
    # Cast on the host: each variable of the copy may have another dtype.
    copy.set_weights([w.astype(v.dtype) for w, v in zip(model.get_weights(), copy.weights)])
    return copy


def with_dtype_policies(model, policy_of):
    """A copy of `model` (`rebuilt_copy`) whose each layer is rebuilt from its
    config under the dtype policy `policy_of(layer)`, with `model`'s weights
    cast to its variables' dtypes, and the settings no config saves
    (`compat.keep_unsaved_settings`: a ViT's plain attention).

    Raises:
        ValueError: naming a layer that does not rebuild from its own config.
    """
    def rebuild(layer):
        config = {**layer.get_config(), "dtype": policy_of(layer)}
        # The weights are set next: no initializer needs to run (on JAX a
        # random one compiles for each new shape and dtype).
        config = {k: "zeros" if k.endswith("_initializer") and v is not None else v
                  for k, v in config.items()}
        try:
            copy = layer.__class__.from_config(config)
        except (TypeError, ValueError):
            raise ValueError(f"its layer {layer.name!r} ({type(layer).__name__}) does not "
                             "rebuild from its own config") from None
        return compat.keep_unsaved_settings(layer, copy)

    return rebuilt_copy(model, rebuild)
