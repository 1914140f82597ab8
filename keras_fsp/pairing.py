"""Automatic tap pairing for convolutional networks: where the sections of a
network end, and which teacher and student maps correspond.

A CNN computes in sections that each keep one spatial size (a ResNet's
stages, a MobileNet's groups of inverted residual blocks). The *trunk
points* of a network are the maps that every path from its input to its
output passes through (a residual block's output, not the inside of its
branch). A section ends at the last trunk point of its spatial size.
Padding, dropout, noise and input-preprocessing layers are not section
points: they compute nothing a student should learn.

Teacher and student are paired by the spatial sizes at which their sections
end (both networks see the same inputs, so the sizes line up), which works
across families: ResNet-50 -> MobileNetV2, DenseNet -> EfficientNet, a
CIFAR ResNet-26 -> ResNet-8.
"""

import keras

from keras_fsp import compat, taps

# Layers that are never section points: they reshape, pad, regularise or
# preprocess, but compute no features.
_NOT_COMPUTING = tuple(
    getattr(keras.layers, name)
    for name in (
        "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping2D", "Dropout",
        "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
        "Rescaling", "Normalization", "InputLayer", "Resizing", "CenterCrop",
    )
    if hasattr(keras.layers, name)
)


def _single_output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return None  # a layer called more than once


def trunk_layers(model):
    """The layers of a functional `model` (graph order) whose output every
    path from the inputs to the output passes through."""
    taps.check_functional(model, "model", why="its graph is analysed")
    layers = list(model.layers)
    position = {id(layer): i for i, layer in enumerate(layers)}
    # For each position, the furthest position reached by an edge from before it.
    reach = [0] * len(layers)
    furthest = -1
    passed_over = [False] * len(layers)
    for i, layer in enumerate(layers):
        passed_over[i] = furthest > i
        ends = [position[id(c)] for c in compat.consumers(layer) if id(c) in position]
        if ends:
            reach[i] = max(ends)
            furthest = max(furthest, reach[i])
    return [layer for i, layer in enumerate(layers) if not passed_over[i]]


def section_ends(model):
    """`{(height, width): layer name}`: where each section of `model` ends,
    in graph order (largest spatial size first).

    Raises:
        ValueError: if the model has no 4-D feature maps, or a spatial size
            comes back after a different one (sections cannot be told apart).
    """
    ends = {}
    for layer in trunk_layers(model):
        if isinstance(layer, _NOT_COMPUTING):
            continue
        shape = _single_output_shape(layer)
        if shape is None or len(shape) != 4 or shape[1] is None:
            continue
        size = tuple(shape[1:3])
        if ends and size != list(ends)[-1] and size in ends:
            raise ValueError(
                f"Cannot find the sections of {model.name!r} automatically: the spatial "
                f"size {size} comes back at layer {layer.name!r} after a different one. "
                "Pass the layer pairs explicitly (fsp_pairs=[(first, second), ...])."
            )
        ends[size] = layer.name
    if not ends:
        raise ValueError(
            f"{model.name!r} has no 4-D feature maps on its trunk: FSP and attention "
            "transfer need convolutional feature maps (batch, height, width, channels)."
        )
    return ends


def section_start(model):
    """Where the first section starts: its first trunk map that feeds more
    than one layer (a stem's output feeding a residual block's two paths),
    else its first trunk map."""
    first_size = next(iter(section_ends(model)))
    first = None
    for layer in trunk_layers(model):
        shape = _single_output_shape(layer)
        if isinstance(layer, _NOT_COMPUTING) or shape is None or len(shape) != 4:
            continue
        if tuple(shape[1:3]) != first_size:
            break
        first = first or layer.name
        if len(compat.consumers(layer)) > 1:
            return layer.name
    return first


def section_pairs(model):
    """FSP pairs of one network as in the paper: each section's input with
    its output. For the CIFAR ResNets: `[("stem", "stage1"), ("stage1",
    "stage2"), ("stage2", "stage3")]`."""
    return matched_section_pairs(model, model)[0]


def candidates(model):
    """Human-readable list of a model's section points, for error messages."""
    try:
        ends = section_ends(model)
    except ValueError as e:
        return f"(none found: {e})"
    return ", ".join(
        f"{name} {taps.output_shape(model, name)}" for name in ends.values()
    )


def matched_section_ends(teacher, student):
    """`[(teacher layer, student layer)]`: the two networks' section ends at
    the spatial sizes both have, largest first.

    Raises:
        ValueError: listing both networks' section ends with their shapes
            when they share no spatial size.
    """
    t_ends, s_ends = section_ends(teacher), section_ends(student)
    common = [size for size in t_ends if size in s_ends]
    if not common:
        raise ValueError(
            f"The teacher {teacher.name!r} and the student {student.name!r} share no "
            f"section size to pair. Teacher: {candidates(teacher)}. Student: "
            f"{candidates(student)}. Pass the pairs explicitly."
        )
    return [(t_ends[size], s_ends[size]) for size in common]


def matched_section_pairs(teacher, student):
    """FSP pairs of both networks, matched by spatial size.

    Each pair runs from one common section end to the next. The first
    section's own pair (its input, the stem's output, to its end) is
    included when both networks have such an input.

    Returns:
        `(teacher_pairs, student_pairs)`, equally long.

    Raises:
        ValueError: when fewer than one pair can be formed, listing both
            networks' candidate taps.
    """
    ends = matched_section_ends(teacher, student)
    t_pairs = list(zip([e[0] for e in ends[:-1]], [e[0] for e in ends[1:]]))
    s_pairs = list(zip([e[1] for e in ends[:-1]], [e[1] for e in ends[1:]]))
    t_start, s_start = section_start(teacher), section_start(student)
    first_t, first_s = ends[0]
    if t_start and s_start and t_start != first_t and s_start != first_s:
        t_pairs.insert(0, (t_start, first_t))
        s_pairs.insert(0, (s_start, first_s))
    if not t_pairs:
        raise ValueError(
            f"Only one section size is shared by the teacher {teacher.name!r} and the "
            f"student {student.name!r}: no pair of maps to form. Teacher: "
            f"{candidates(teacher)}. Student: {candidates(student)}."
        )
    return t_pairs, s_pairs
