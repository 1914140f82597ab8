"""Named taps on functional models: one multi-output view per network, so one
forward pass yields the logits and every tapped feature map, and the automatic
section pairing used by the FSP paper.
"""

import difflib

import keras

LOGITS = "logits"


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
    raise ValueError(
        f"The {role} {model.name!r} has no layer named {name!r}.{hint}"
    )


def _check_functional(model, role):
    inputs = getattr(model, "inputs", None) if isinstance(model, keras.Model) else None
    outputs = getattr(model, "outputs", None) if inputs else None
    if not inputs or not outputs:
        raise ValueError(
            f"The {role} {getattr(model, 'name', model)!r} must be a functional "
            "(or Sequential) Keras model built on an Input, so that its "
            "intermediate layers can be tapped; a subclassed model has no "
            "symbolic layer outputs."
        )
    if len(outputs) != 1:
        raise ValueError(
            f"The {role} {model.name!r} has {len(outputs)} outputs; keras_fsp "
            "expects one output, the logits."
        )


def tap_model(model, layer_names, include_logits=True, role="model"):
    """A view of `model` whose output is a dict of tapped tensors.

    The view shares the model's layers and weights: calling it is one forward
    pass that returns `{"logits": ..., name: feature_map, ...}`. Only the part
    of the graph needed for the requested outputs is computed.

    Args:
        model: a functional or Sequential `keras.Model` with one output.
        layer_names: names of the layers whose outputs to tap.
        include_logits: whether to include the model's output as `"logits"`.
        role: word used in error messages ("teacher", "student").

    Returns:
        a `keras.Model` with dict outputs.

    Example:

    >>> from keras_fsp.models import cifar_resnet
    >>> view = tap_model(cifar_resnet(8), ["stage1", "stage2"])
    >>> sorted(view.output)
    ['logits', 'stage1', 'stage2']
    """
    _check_functional(model, role)
    outputs = {}
    if include_logits:
        outputs[LOGITS] = model.outputs[0]
    for name in layer_names:
        if name in (LOGITS, "augmented_inputs"):
            raise ValueError(f"The tap name {name!r} is reserved by keras_fsp.")
        layer = get_layer(model, name, role)
        outputs[name] = layer.output
    if not outputs:
        raise ValueError("tap_model needs at least one output.")
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=f"{model.name}_taps")


def output_shape(model, name, role="model"):
    """Static output shape of the layer `name` of `model`."""
    return tuple(get_layer(model, name, role).output.shape)


def _feature_layers(model):
    """Layers (graph order) whose single output is a 4-D feature map."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue  # shared layer with several outputs: not a section point
        if len(shape) == 4 and shape[1] is not None:
            layers.append(layer)
    return layers


def _consumers(model, layer):
    members = {id(l) for l in model.layers}
    return sum(
        1 for node in layer._outbound_nodes if id(node.operation) in members
    )


def section_boundaries(model):
    """The trunk points of a ResNet-like model, one more than its sections.

    The model is cut into sections where the spatial size changes. Returns
    `[input of section 1, output of section 1, output of section 2, ...]`:
    the input of section 1 is the first map that feeds a residual shortcut
    (the stem's output), each section's output is the last map at its size.

    Raises:
        ValueError: if the spatial size does not shrink monotonically along
            the graph, so sections cannot be told apart.
    """
    runs = []  # [(spatial size, [layers])]
    for layer in _feature_layers(model):
        size = tuple(layer.output.shape[1:3])
        if runs and runs[-1][0] == size:
            runs[-1][1].append(layer)
        elif any(r[0] == size for r in runs):
            raise ValueError(
                f"Cannot find the sections of {model.name!r} automatically: "
                f"the spatial size {size} comes back after a different one. "
                "Pass the FSP layer pairs explicitly (fsp_pairs=[(a, b), ...])."
            )
        else:
            runs.append((size, [layer]))
    if not runs:
        raise ValueError(
            f"{model.name!r} has no 4-D feature maps: FSP needs convolutional "
            "feature maps (batch, height, width, channels)."
        )
    first = runs[0][1]
    # The stem's output is the first map used twice (conv branch + shortcut).
    start = next((l for l in first[:-1] if _consumers(model, l) > 1), first[0])
    return [start.name] + [layers[-1].name for _, layers in runs]


def section_pairs(model):
    """FSP pairs as in the paper: each section's input with its output.

    For the CIFAR ResNets: `[("stem", "stage1"), ("stage1", "stage2"),
    ("stage2", "stage3")]`.
    """
    points = section_boundaries(model)
    if len(points) < 2:
        raise ValueError(f"{model.name!r} has no section to pair.")
    return list(zip(points[:-1], points[1:]))
