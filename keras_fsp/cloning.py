"""Copies of a functional or Sequential model with each layer rebuilt by a
given function (nested models included) and the original's weights."""

import keras


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
