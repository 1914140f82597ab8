"""Copies of a functional or Sequential model with each layer rebuilt by a
given function (nested models included) and the original's weights."""

import keras


def rebuilt_copy(model, rebuild_layer):
    """A copy of `model` whose layers are `rebuild_layer(layer)`, holding
    `model`'s weights (`rebuild_layer` must keep the layers' weights)."""
    copy = keras.models.clone_model(model, clone_function=rebuild_layer, recursive=True)
    copy.set_weights(model.get_weights())
    return copy
