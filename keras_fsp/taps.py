"""Named taps on functional models: one multi-output view per network, so one
forward pass yields the logits and every tapped feature map.

`LOGITS` names a network's output. For a functional model whose last layer
applies a softmax (`keras.applications` models by default), the tapped
logits are the values *before* the softmax: distillation terms need logits,
and the softmax of probabilities is nearly uniform.
"""

import difflib

import keras
from keras import ops

LOGITS = "logits"
# Keys keras_fsp adds to the training-mode outputs of a distiller.
RESERVED = (LOGITS, "augmented_inputs")


def get_layer(model, name, role="model"):
    """Returns `model`'s layer called `name`.

    Raises:
        ValueError: naming the closest layer names of the model when there is
            no such layer.
    """
    for layer in model.layers:
        if layer.name == name:
            return layer
    names = [layer.name for layer in model.layers]
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.4)
    hint = (
        f" Closest layer names: {close}."
        if close
        else f" Its layers are: {names[:30]}{' ...' if len(names) > 30 else ''}."
    )
    raise ValueError(f"The {role} {model.name!r} has no layer named {name!r}.{hint}")


def is_functional(model):
    """Whether `model` is a functional (or Sequential) Keras model built on
    inputs, whose intermediate layers can be tapped."""
    if not isinstance(model, keras.Model):
        return False
    try:
        return bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def check_model(model, role):
    """Raises unless `model` is a Keras model (any kind).

    Raises:
        ValueError: for anything else, e.g. a file path.
    """
    if isinstance(model, keras.Model):
        return
    if isinstance(model, str):
        raise ValueError(
            f"The {role} is the string {model!r}: pass a keras.Model, e.g. "
            f"keras.models.load_model({model!r})."
        )
    raise ValueError(f"The {role} must be a keras.Model; got {type(model).__name__}.")


def check_functional(model, role, why="its intermediate layers are tapped"):
    """Raises unless `model` is functional with a single output.

    Raises:
        ValueError: saying what is wrong and why a functional model is needed.
    """
    check_model(model, role)
    if not is_functional(model):
        raise ValueError(
            f"The {role} {model.name!r} is a subclassed model: {why}, which needs a "
            "functional (or Sequential) Keras model built on an Input. Stages with "
            "logits-only terms ('kd', 'task', 'dkd') accept any model."
        )
    if len(model.outputs) != 1:
        raise ValueError(
            f"The {role} {model.name!r} has {len(model.outputs)} outputs; keras_fsp "
            "expects one output, the logits."
        )


def _softmax_layer(model):
    """The last layer if it applies a softmax over its output, else None."""
    history = getattr(model.outputs[0], "_keras_history", None)
    layer = getattr(history, "operation", None)
    if isinstance(layer, keras.layers.Softmax):
        return layer
    activation = getattr(layer, "activation", None)
    if activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax":
        return layer
    return None


class _DenseLogits(keras.layers.Layer):
    """A softmax Dense layer's pre-activation, sharing its weights."""

    def __init__(self, dense, **kwargs):
        super().__init__(name=f"{dense.name}_logits", **kwargs)
        self._dense = [dense]  # a list: not tracked, the model owns the layer

    def call(self, x):
        dense = self._dense[0]
        z = ops.matmul(x, ops.cast(dense.kernel, x.dtype))
        if dense.use_bias:
            z = z + ops.cast(dense.bias, x.dtype)
        return z


def ends_in_softmax(model):
    """Whether a functional `model`'s output is a softmax (probabilities)."""
    return is_functional(model) and _softmax_layer(model) is not None


def logits_tensor(model):
    """The symbolic logits of a functional model: its output, or, when its
    last layer applies a softmax, the values that go into it.

    Raises:
        ValueError: for a softmax layer whose input cannot be recovered.
    """
    layer = _softmax_layer(model)
    if layer is None:
        return model.outputs[0]
    if isinstance(layer, (keras.layers.Softmax, keras.layers.Activation)):
        return layer.input
    if isinstance(layer, keras.layers.Dense):
        return _DenseLogits(layer)(layer.input)
    raise ValueError(
        f"{model.name!r} ends in a softmax inside layer {layer.name!r} "
        f"({type(layer).__name__}); distillation needs logits: build it with "
        "classifier_activation=None (keras.applications) or without the final "
        "softmax."
    )


def tap_model(model, layer_names, include_logits=True, role="model"):
    """A view of `model` whose output is a dict of tapped tensors.

    The view shares the model's layers and weights: calling it is one forward
    pass that returns `{"logits": ..., name: feature_map, ...}`. Only the part
    of the graph needed for the requested outputs is computed.

    Args:
        model: a functional or Sequential `keras.Model` with one output.
        layer_names: names of the layers whose outputs to tap (`LOGITS` may
            be among them).
        include_logits: whether to include the logits as `"logits"`.
        role: word used in error messages ("teacher", "student").

    Returns:
        a `keras.Model` with dict outputs.

    Example:

    >>> from keras_fsp.papers import cifar_resnet
    >>> view = tap_model(cifar_resnet(8), ["stage1", "stage2"])
    >>> sorted(view.output)
    ['logits', 'stage1', 'stage2']
    """
    check_functional(model, role)
    names = list(layer_names)
    include_logits = include_logits or LOGITS in names
    outputs = {}
    if include_logits:
        outputs[LOGITS] = logits_tensor(model)
    for name in names:
        if name == LOGITS:
            continue
        if name in RESERVED:
            raise ValueError(f"The tap name {name!r} is reserved by keras_fsp.")
        outputs[name] = get_layer(model, name, role).output
    if not outputs:
        raise ValueError("tap_model needs at least one output.")
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=f"{model.name}_taps")


def output_shape(model, name, role="model"):
    """Static output shape of the layer `name` of `model`."""
    return tuple(get_layer(model, name, role).output.shape)


def tap_shape(model, name, role="model"):
    """Static shape of a tap (`LOGITS`: the model's output)."""
    if name == LOGITS:
        return tuple(model.outputs[0].shape) if is_functional(model) else (None, None)
    return output_shape(model, name, role)


class Views:
    """Cache of tap views, not tracked by Keras (the views share the
    networks' layers, which are tracked already)."""

    def __init__(self):
        self._cache = {}

    def run(self, model, names, inputs, training, role):
        """`{tap: tensor}` of one forward pass of `model` on `inputs`.

        A subclassed model can only give its output (`LOGITS`).
        """
        names = tuple(dict.fromkeys(names))
        if not is_functional(model):
            if names != (LOGITS,):
                check_functional(model, role)
            return {LOGITS: model(inputs, training=training)}
        key = (id(model), names)
        if key not in self._cache:
            self._cache[key] = tap_model(model, names, include_logits=False, role=role)
        return self._cache[key](inputs, training=training)
