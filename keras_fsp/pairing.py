"""Automatic tap pairing: where the sections of a network end, and which
teacher and student features correspond; for convolutional networks and for
sequence models (transformers over tokens, Conv1D networks over time steps).

A CNN computes in sections that each keep one spatial size (a ResNet's
stages, a MobileNet's groups of inverted residual blocks). The *trunk
points* of a network are the maps that every path from its input to its
output passes through (a residual block's output, not the inside of its
branch). A section ends at the last trunk point of its spatial size, except
where a final 1x1 convolution there (with its normalisation and activation)
prepares the maps for what follows: one that widens them (the expansion of
the next section's first inverted residual block in MobileNetV2 and
EfficientNet, or the classifier's last convolution) or a pre-activated one
(a DenseNet transition); the section's own output is the map before it. Padding,
dropout, noise and input-preprocessing layers are not section points: they
compute nothing a student should learn.

Teacher and student are paired by the spatial sizes at which their sections
end (both networks see the same inputs, so the sizes line up), which works
across families: ResNet-50 -> MobileNetV2, DenseNet -> EfficientNet, a
CIFAR ResNet-26 -> ResNet-8. Nested functional models (keras-hub backbones
in their classifiers) are seen through (`keras_fsp.taps.graph`). An ensemble
of teachers (`keras_fsp.ensemble.teacher_ensemble`) is read as its feature
member (`features_from`), its layers named by their paths in the ensemble
(`"teacher_a/stage1"`).

A sequence model's trunk carries `(batch, steps, channels)` features; the
trunk's rank is that of its last trunk point with positions (a ViT's tokens,
not its patch embedding's map). Where the steps change length (a Conv1D
network's strides and pooling), sections are told apart by length as a
CNN's by spatial size. Where they keep one length (a transformer's tokens),
the sections are its blocks: a block starts at each trunk point whose
computation since the previous one holds an attention layer (a residual
add after multi-head attention, or an opaque encoder layer holding one)
and ends before the next such point, with everything on the trunk in
between (the feed-forward residual, the normalisations); what comes before
the first is the stem, whose output starts the first section. A network
without attention on such a trunk has one block per trunk point (its
normalisation and activation with it). Teacher and student blocks are
grouped evenly by depth: the shallower network's every block is paired
with the deeper's block at the same relative depth (`i * B / n`, rounded).

A transformer paired with a network in sections of several sizes (a ViT with
a CNN, either way round) pairs by depth too: the sections whose maps its
tokens, read as their grid of patches, can be pooled with
(`keras_fsp.positions.token_grid`), and as many of its blocks at the same
relative depths: a ResNet's three stages with blocks 2, 4 and 6 of a
six-block ViT.
"""

import keras

from keras_fsp import compat, ensemble, positions, taps


def _layer_types(*names):
    return tuple(getattr(keras.layers, n) for n in names if hasattr(keras.layers, n))


# Layers that are never section points: they reshape, pad, regularise or
# preprocess, but compute no features.
_NOT_COMPUTING = _layer_types(
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Dropout",
    "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "Rescaling", "Normalization", "InputLayer", "Resizing", "CenterCrop", "Masking",
)
# Layers that belong to the convolution before (or, pre-activated, after) them.
_NORM_OR_ACTIVATION = _layer_types(
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "Activation", "ReLU",
    "LeakyReLU", "PReLU", "ELU",
)
_CONVOLUTIONS = _layer_types("Conv1D", "Conv2D", "DepthwiseConv1D", "DepthwiseConv2D",
                             "SeparableConv1D", "SeparableConv2D")
_ATTENTION = _layer_types("MultiHeadAttention", "GroupQueryAttention", "Attention",
                          "AdditiveAttention")


def _is_pointwise(layer):
    return (
        isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D))
        and set(layer.kernel_size) == {1}
        and set(layer.strides) == {1}
    )


def _has_attention(layer):
    """Whether `layer` is, or holds (an opaque transformer block), attention."""
    return any(isinstance(sub, _ATTENTION) for sub in compat.sublayers(layer))


def trunk_layers(model):
    """The layer names of a functional `model`'s graph (in order) whose
    output every path from the inputs to the output passes through."""
    g = ensemble.feature_graph(model)
    names = list(g.nodes)
    position = {name: i for i, name in enumerate(names)}
    trunk, furthest = [], -1
    for i, name in enumerate(names):
        if furthest <= i:  # no edge from before passes over this node
            trunk.append(name)
        furthest = max([furthest] + [position[c] for c in g.consumers(name)])
    return trunk


def _trunk_points(model):
    """`[(name, positions)]`: the computing trunk points of `model` whose
    positions have a known size, in graph order, of the rank of the last
    one (see the module's docstring).

    Raises:
        ValueError: if there is none.
    """
    g = ensemble.feature_graph(model)
    points = []
    for name in trunk_layers(model):
        node = g.nodes[name]
        size = positions.positions_of(getattr(node.output, "shape", None) or ())
        if size is not None and not isinstance(node.layer, _NOT_COMPUTING):
            points.append((name, size))
    if not points:
        raise ValueError(
            f"{model.name!r} has no feature maps or sequences of known size on its trunk (the "
            "layers every path from its input to its output passes through): FSP, hints and "
            "attention transfer need features (batch, height, width, channels) or (batch, "
            "steps, channels) there, of a fixed input size (build the model, or its "
            "backbone, for one; a keras-hub text classifier: call it in a functional model "
            "on keras.Input((steps,), dtype='int32', name=...) inputs). Or name the layers "
            "to tap explicitly."
        )
    rank = len(points[-1][1])
    return [(name, size) for name, size in points if len(size) == rank]


def _sections(model):
    """`{positions: [trunk layer names]}`: the computing trunk points of each
    spatial size (sequence length), in graph order (largest size first)."""
    sections = {}
    for name, size in _trunk_points(model):
        if sections and size != list(sections)[-1] and size in sections:
            raise ValueError(
                f"Cannot find the sections of {model.name!r} automatically: the spatial "
                f"size {size} comes back at layer {name!r} after a different one. "
                "Pass the layer pairs explicitly (fsp_pairs=[(first, second), ...])."
            )
        sections.setdefault(size, []).append(name)
    return sections


def _in_blocks(model):
    """Whether `model`'s trunk is a sequence of one length: its sections are
    blocks (`_blocks`), not sizes."""
    sections = _sections(model)
    return len(sections) == 1 and len(next(iter(sections))) == 1


def _blocks(model):
    """`(start, [block ends])` of a trunk of one sequence length (see the
    module's docstring); `start` is None where no stem comes before the
    first block."""
    g = ensemble.feature_graph(model)
    order = {name: i for i, name in enumerate(g.nodes)}
    names = list(g.nodes)
    units, attends = [], []  # [[first, last] trunk point], whether each starts a block
    for name in next(iter(_sections(model).values())):
        if units and isinstance(g.nodes[name].layer, _NORM_OR_ACTIVATION):
            units[-1][1] = name
            continue
        since = order[units[-1][1]] + 1 if units else 0
        attends.append(any(_has_attention(g.nodes[n].layer) for n in names[since:order[name] + 1]))
        units.append([name, name])
    if not any(attends):
        return units[0][1], [last for _, last in units[1:]]
    cuts = [i for i, a in enumerate(attends) if a] + [len(units)]
    start = units[cuts[0] - 1][1] if cuts[0] else None
    return start, [units[b - 1][1] for b in cuts[1:]]


def _own_end(g, run):
    """The section's output among its trunk points `run` (see the module's
    docstring): before a final 1x1 convolution that widens the maps (with the
    normalisation and activation after it), or that is pre-activated (the
    normalisation and activation in front of it follow no convolution: a
    DenseNet transition), and then before those too."""
    nodes = [g.nodes[n] for n in run]
    i = len(run) - 1
    while i > 0 and isinstance(nodes[i].layer, _NORM_OR_ACTIVATION):
        i -= 1
    if i == 0 or not _is_pointwise(nodes[i].layer):
        return run[-1]
    j = i - 1
    while j > 0 and isinstance(nodes[j].layer, _NORM_OR_ACTIVATION):
        j -= 1
    if not isinstance(nodes[j].layer, _CONVOLUTIONS):
        return run[j]
    widens = nodes[i].output.shape[-1] > nodes[i].inputs[0].shape[-1]
    return run[i - 1] if widens else run[-1]


def section_ends(model):
    """`{(height, width): layer name}`: where each section of `model` ends,
    in graph order (largest spatial size first); `{(steps,): name}` for a
    sequence model whose steps change length; `{block number: name}`,
    numbered from 1, for one whose steps keep one length (a transformer).

    Raises:
        ValueError: if the model has no feature maps or sequences of known
            size on its trunk, or a spatial size comes back after a
            different one (sections cannot be told apart).
    """
    if _in_blocks(model):
        return dict(enumerate(_blocks(model)[1], 1))
    g = ensemble.feature_graph(model)
    return {size: _own_end(g, run) for size, run in _sections(model).items()}


def section_start(model):
    """Where the first section starts: its first trunk map, with the
    normalisation and activation layers that follow it (a stem's output);
    for a transformer, its stem's output (None where it has none)."""
    if _in_blocks(model):
        return _blocks(model)[0]
    g = ensemble.feature_graph(model)
    run = next(iter(_sections(model).values()))
    k = 0
    while k + 1 < len(run) and isinstance(g.nodes[run[k + 1]].layer, _NORM_OR_ACTIVATION):
        k += 1
    return run[k]


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
    return ", ".join(f"{name} {taps.output_shape(model, name)}" for name in ends.values())


def mismatch(teacher, student, message):
    """A `ValueError` with `message` and both networks' candidate taps."""
    return ValueError(
        f"{message} Candidate taps (section ends) of the teacher {teacher.name!r}: "
        f"{candidates(teacher)}. Of the student {student.name!r}: {candidates(student)}. "
        "Pass the pairs explicitly."
    )


def _evenly(ends, n):
    """`n` of a network's block `ends`, at evenly spread relative depths."""
    return [ends[((i + 1) * len(ends) + n // 2) // n - 1] for i in range(n)]


def matched_section_ends(teacher, student):
    """`[(teacher layer, student layer)]`: the two networks' section ends at
    the spatial sizes (sequence lengths) both have, largest first; for
    transformers, their blocks grouped evenly (as many pairs as the
    shallower has blocks).

    Raises:
        ValueError: listing both networks' section ends with their shapes
            when they share no spatial size, or when one computes in blocks
            of one length and the other in sections of several sizes.
    """
    t_ends, s_ends = section_ends(teacher), section_ends(student)
    t_blocks, s_blocks = _in_blocks(teacher), _in_blocks(student)
    if t_blocks != s_blocks:
        return _blocks_with_sections(teacher, student, t_ends, s_ends, t_blocks)
    if t_blocks:
        n = min(len(t_ends), len(s_ends))
        if not n:
            raise mismatch(teacher, student, "The teacher or the student has no block to pair.")
        return list(zip(_evenly(list(t_ends.values()), n), _evenly(list(s_ends.values()), n)))
    common = [size for size in t_ends if size in s_ends]
    if not common:
        raise mismatch(teacher, student, "The teacher and the student share no section size to pair.")
    return [(t_ends[size], s_ends[size]) for size in common]


def _blocks_with_sections(teacher, student, t_ends, s_ends, teacher_in_blocks):
    """`matched_section_ends` of a transformer and a network in sections of
    several sizes (see the module's docstring)."""
    blocks, sections = (teacher, student) if teacher_in_blocks else (student, teacher)
    b_ends, c_ends = (t_ends, s_ends) if teacher_in_blocks else (s_ends, t_ends)
    tokens = taps.output_shape(blocks, next(iter(b_ends.values())))
    usable = []
    for size, name in c_ends.items():
        try:
            positions.pooled_size(tokens, (None, *size, 1))
            usable.append(name)
        except ValueError:
            pass
    n = min(len(usable), len(b_ends))
    if not n:
        raise mismatch(
            teacher, student,
            f"The {'teacher' if teacher_in_blocks else 'student'} computes in blocks over "
            f"{tokens[1]} tokens and the {'student' if teacher_in_blocks else 'teacher'} in "
            "sections of several sizes, none of whose maps those tokens, read as a grid of "
            "patches, can be pooled with.",
        )
    b, c = _evenly(list(b_ends.values()), n), _evenly(usable, n)
    return list(zip(b, c)) if teacher_in_blocks else list(zip(c, b))


def matched_section_pairs(teacher, student):
    """FSP pairs of both networks, matched by spatial size (transformers:
    by depth, see `matched_section_ends`).

    Each pair runs from one common section end to the next. The first
    section's own pair (its input, the stem's output, to its end) is
    included when both networks' first sections have the same size (any
    two transformers) and such an input.

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
    # Both stems' outputs start a pair where the first sections line up: any
    # transformer (its tokens, read as a grid, pool with a CNN's map).
    same_first = (_in_blocks(teacher) or _in_blocks(student)
                  or next(iter(_sections(teacher))) == next(iter(_sections(student))))
    if same_first and t_start not in (None, first_t) and s_start not in (None, first_s):
        t_pairs.insert(0, (t_start, first_t))
        s_pairs.insert(0, (s_start, first_s))
    if not t_pairs:
        raise mismatch(
            teacher, student,
            "Only one section size (or block) is matched between the teacher and the student: "
            "no pair of maps to form.",
        )
    return t_pairs, s_pairs


_ACTIVATIONS = _layer_types("ReLU", "LeakyReLU", "PReLU", "ELU", "Activation")


def preactivation(model, name, role="model"):
    """The map that layer `name` of `model` activates: where `name` (behind
    identities, such as a CIFAR ResNet's named section ends) is a
    non-linear activation of one input, that input (a ResNet block's sum
    before its ReLU: `"stage1_block1_add"` for `"stage1"`); else `name`
    itself. ReviewKD compares the student with the teacher's features
    before their last ReLU, which keep the negative part (`keras_fsp.terms.review`)."""
    g = ensemble.feature_graph(model, role)
    name = g.resolve(name, role)
    node = g.nodes[name]
    while isinstance(node.layer, keras.layers.Identity) and g.producer(node.inputs[0]) is not None:
        node = g.nodes[g.producer(node.inputs[0])]
    linear = getattr(node.layer, "activation", None) is keras.activations.linear
    source = g.producer(node.inputs[0]) if len(node.inputs) == 1 else None
    if isinstance(node.layer, _ACTIVATIONS) and not linear and source is not None:
        return source
    return name


def penultimate(model, role="model"):
    """The layer whose output the classifier reads: the pooled features
    before the logits (`"pool"` of the CIFAR ResNets, `"avg_pool"` of
    `keras.applications` models). A final softmax is stepped over, and so are
    dropout and other non-computing layers in front of the classifier (the
    features are what they receive).

    Raises:
        ValueError: when the logits come from no single-input layer on
            features (name the layer explicitly then).
    """
    g = ensemble.feature_graph(model, role)

    def fail(why):
        return ValueError(
            f"Cannot find the penultimate features of the {role} {model.name!r}: {why}. Name "
            "the feature layers explicitly (layers=(teacher_layer, student_layer))."
        )

    name = g.producer(g.output)
    if name is not None and taps.is_softmax(g.nodes[name].layer) and isinstance(
            g.nodes[name].layer, (keras.layers.Softmax, keras.layers.Activation)):
        name = g.producer(g.nodes[name].inputs[0])  # the classifier is before the softmax
    if name is None:
        raise fail("its output is not computed by a layer")
    classifier = name
    while True:
        inputs = g.nodes[name].inputs
        if len(inputs) != 1:
            raise fail(f"layer {name!r} takes {len(inputs)} inputs")
        name = g.producer(inputs[0])
        if name is None or isinstance(g.nodes[name].layer, keras.layers.InputLayer):
            raise fail(f"the classifier {classifier!r} reads the inputs directly")
        if not isinstance(g.nodes[name].layer, _NOT_COMPUTING):
            return name
