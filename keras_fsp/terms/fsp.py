"""The FSP matrix ("flow of solution procedure", Yim et al., CVPR 2017) and its
term, eq. (2); also the building block of dense sequential FSP (Yeo et al.,
ICIP 2018: one term per step, each with the pairs of its sections).

The maths (`fsp_matrix`, `fsp_distance`) is written with `keras.ops` only;
`keras_fsp.losses.FSPLoss` and `keras_fsp.keras_distillation` adapt it to
Keras' loss APIs.
"""

import math

import keras
from keras import ops

from keras_fsp import masks, pairing, positions, taps
from keras_fsp.terms.base import DistillationTerm, announce, register_term

POOLING_MODES = ("max", "avg")


def fsp_matrix(f1, f2, pooling="max", mask=None):
    """FSP matrix between two features of one network, eq. (1).

    `G[b, i, j] = sum_p f1[b, p, i] * f2[b, p, j] / P` over the `P`
    positions `p` of the two: `h * w` pixels of feature maps `(batch, h, w,
    channels)`, or the tokens or time steps of sequences `(batch, steps,
    channels)`. With a padding `mask` `(batch, steps)` (`keras_fsp.masks`),
    the sum runs over the valid positions and `P` is their number, so the
    matrix of a padded sequence is that of its tokens alone.

    When the position counts differ, the larger is pooled down to the
    smaller first over non-overlapping groups (`keras_fsp.positions`: max
    pooling, as in the paper; `"avg"` is the variant some PyTorch toolkits
    use). The product is accumulated in float32 and the result is float32
    whatever the input dtype (float16/bfloat16 sums of P products lose too
    much precision).

    Args:
        f1: tensor `(batch, positions..., m)`, the earlier features.
        f2: tensor `(batch, positions..., n)`, the later features.
        pooling: `"max"` (default, the paper) or `"avg"`.
        mask: `None`, or the sequences' padding mask `(batch, steps)` (1 at
            a token), pooled with the features where they have fewer steps:
            a group counts if any of its tokens does, and is pooled over
            its valid tokens only.

    Returns:
        float32 tensor `(batch, m, n)`.

    Example:

    >>> import numpy as np
    >>> g = fsp_matrix(np.ones((2, 8, 8, 3)), np.ones((2, 4, 4, 5)))
    >>> tuple(g.shape)
    (2, 3, 5)
    """
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}; got {pooling!r}.")
    f1 = ops.convert_to_tensor(f1)
    f2 = ops.convert_to_tensor(f2)
    size = positions.pooled_size(f1.shape, f2.shape)
    m1, m2 = masks.at_positions(mask, f1.shape), masks.at_positions(mask, f2.shape)
    # Pool in the input dtype (max pooling is exact), then accumulate in f32.
    f1 = ops.cast(positions.pool(f1, size, pooling, m1), "float32")
    f2 = ops.cast(positions.pool(f2, size, pooling, m2), "float32")
    axes = "hwdefgijkl"[:len(size)]  # "hw" for maps: the 4-D einsum as it always was
    g = ops.einsum(f"b{axes}m,b{axes}n->bmn", f1, f2)
    if mask is None:
        return g / float(math.prod(size))
    # Padded positions of f1 and f2 are 0: divide by the valid ones' number.
    return g / ops.reshape(masks.valid_count(positions.pool_mask(m1, size)), (-1, 1, 1))


def per_position_linear(channels, input_shape, name):
    """A built linear map of features `input_shape` to `channels`, position
    by position, without bias: a 1x1 convolution of feature maps (as
    always), a Dense layer of sequences and any other rank."""
    if len(input_shape) == 4:
        layer = keras.layers.Conv2D(channels, 1, use_bias=False, name=name)
    else:
        layer = keras.layers.Dense(channels, use_bias=False, name=name)
    layer.build(input_shape)
    return layer


def _kernel_matrix(projection):
    """A `per_position_linear` layer's kernel as a float32 `(c_in, c_out)`."""
    kernel = projection.kernel
    return ops.reshape(ops.cast(kernel, "float32"), tuple(kernel.shape[-2:]))


def fsp_matrices(features, pairs, pooling="max", projections=None):
    """FSP matrices of the layer `pairs` from a dict `{layer: feature map}`;
    `projections` (`{layer: layer}`) map some of the maps first. The
    padding mask is the dict's `masks.PADDING_MASK`, where it has one.

    A projection `W` (linear, no bias) of a feature that is not max-pooled
    is applied to the matrix instead, `G(f1 W1, f2 W2) = W1^T G(f1, f2) W2`:
    the same value, without mapping every position to the teacher's wider
    channels (on ImageNet-sized pairs, most of the term's FLOPs). Max
    pooling does not commute with `W`, so a feature it reduces is projected
    first, as the definition says."""
    projections = projections or {}
    mask = features.get(masks.PADDING_MASK)
    out = []
    for pair in pairs:
        maps = [features[name] for name in pair]
        size = positions.pooled_size(maps[0].shape, maps[1].shape)
        on_matrix = [None, None]  # the kernels applied to the matrix, per side
        for side, name in enumerate(pair):
            if name not in projections:
                continue
            pooled = math.prod(positions.positions_of(maps[side].shape)) != math.prod(size)
            if pooling == "max" and pooled:
                maps[side] = projections[name](maps[side])
            else:
                on_matrix[side] = _kernel_matrix(projections[name])
        g = fsp_matrix(*maps, pooling=pooling, mask=mask)
        if on_matrix[0] is not None:
            g = ops.einsum("mi,bmn->bin", on_matrix[0], g)
        if on_matrix[1] is not None:
            g = ops.einsum("bmn,nj->bmj", g, on_matrix[1])
        out.append(g)
    return out


def fsp_matrices_of(model, pairs, x, pooling="max", projections=None, role="model"):
    """FSP matrices of a functional `model` for its layer `pairs` on `x`
    (inference mode), as numpy arrays `(batch, m, n)`, one per pair."""
    names = list(dict.fromkeys(n for p in pairs for n in p))
    names += [masks.PADDING_MASK] if masks.has_mask(model) else []
    features = taps.tap_model(model, names, include_logits=False, role=role)(x, training=False)
    return [ops.convert_to_numpy(g) for g in fsp_matrices(features, pairs, pooling, projections)]


def fsp_distance(teacher_matrices, student_matrices, weights=None, normalize=False):
    """Eq. (2) per example: `sum_i lambda_i ||G_i^T - G_i^S||_F^2`.

    Args:
        teacher_matrices, student_matrices: lists of `(batch, m_i, n_i)`.
        weights: one lambda per pair; default 1 each (the paper).
        normalize: divide each pair's squared norm by its matrix size
            `m * n` (a mean over the entries instead of the paper's sum),
            which keeps the value near 1 whatever the network widths.

    Returns:
        float32 `(batch,)`.
    """
    teacher_matrices, student_matrices = list(teacher_matrices), list(student_matrices)
    if len(teacher_matrices) != len(student_matrices):
        raise ValueError(
            f"Got {len(teacher_matrices)} teacher and {len(student_matrices)} student FSP "
            "matrices: they must come in pairs."
        )
    if weights is None:
        weights = [1.0] * len(teacher_matrices)
    if len(weights) != len(teacher_matrices):
        raise ValueError(
            f"{len(weights)} weights (lambda_i) for {len(teacher_matrices)} FSP matrix pairs: "
            "give one weight per pair."
        )
    reduce = ops.mean if normalize else ops.sum
    total = 0.0
    for w, g_t, g_s in zip(weights, teacher_matrices, student_matrices):
        diff = ops.cast(g_t, "float32") - ops.cast(g_s, "float32")
        total = total + float(w) * reduce(ops.square(diff), axis=(1, 2))
    return total


def fsp_key(pair, pooling):
    """Teacher-target key of the FSP matrix of the teacher layer pair `pair`."""
    return f"/fsp/{pooling}/{pair[0]}/{pair[1]}"


@register_term("fsp")
class FSPTerm(DistillationTerm):
    """`sum_i lambda_i ||G_i^T - G_i^S||_F^2` over FSP-matrix pairs.

    Args:
        pairs: teacher layer pairs `[(first, second), ...]`, or `"auto"`:
            the two networks' sections paired
            (`keras_fsp.pairing.matched_section_pairs`: each section's input
            with its output; a CNN's sections by spatial size, a
            transformer's blocks grouped evenly).
        student_pairs: the student's pairs when its layer names differ from
            the teacher's (found automatically with `pairs="auto"`).
        pair_weights: lambda_i per pair; default 1 each (the paper).
        pooling: `"max"` (the paper) or `"avg"`, to bring the larger map of
            a pair down to the smaller one's size.
        projection: `"auto"` (default): a learned linear map, position by
            position (`per_position_linear`: a 1x1 convolution of feature
            maps, a Dense layer of sequences), takes a student's features
            to the teacher's channel count where the two differ (the
            mapping is logged); `False`: such a pair is an error;
            `True`: same as `"auto"`.
        normalize: divide each pair's squared norm by the matrix size
            `m * n` (see `fsp_distance`).
        name: the term's name in stages (default `"fsp"`).
    """

    def __init__(self, pairs="auto", student_pairs=None, pair_weights=None, pooling="max",
                 projection="auto", normalize=False, name="fsp", **kwargs):
        super().__init__(name=name, **kwargs)
        if pooling not in POOLING_MODES:
            raise ValueError(f"FSPTerm pooling must be one of {POOLING_MODES}; got {pooling!r}.")
        if projection not in ("auto", True, False):
            raise ValueError(f"projection must be 'auto', True or False; got {projection!r}.")
        if isinstance(pairs, str) and pairs != "auto":
            raise ValueError(
                f"FSPTerm pairs must be 'auto' or a list of layer-name pairs; got {pairs!r}."
            )
        self.pairs = pairs if isinstance(pairs, str) else [tuple(p) for p in pairs]
        self.student_pairs = None if student_pairs is None else [tuple(p) for p in student_pairs]
        self.pair_weights = None if pair_weights is None else [float(w) for w in pair_weights]
        self.pooling = pooling
        self.projection = projection
        self.normalize = bool(normalize)
        self.projections = {}

    # ---------------------------------------------------------------- setup

    def configure(self, teacher, student):
        """Resolves `"auto"` pairs (`pairs` and `student_pairs` then hold the
        pairs found), checks shapes, and builds the projections. Automatic
        pairs and projections are logged (once per process)."""
        auto = self.pairs == "auto"
        if auto:
            t_pairs, s_pairs = pairing.matched_section_pairs(teacher, student)
            if self.student_pairs is not None:
                s_pairs = self.student_pairs
        else:
            t_pairs = self.pairs
            s_pairs = self.pairs if self.student_pairs is None else self.student_pairs
        for pair in list(t_pairs) + list(s_pairs):
            if len(pair) != 2:
                raise ValueError(f"Each FSP pair is (first_layer, second_layer); got {pair!r}.")
        if len(t_pairs) != len(s_pairs):
            raise ValueError(
                f"The teacher has {len(t_pairs)} FSP pairs {list(t_pairs)} and the student "
                f"{len(s_pairs)} {list(s_pairs)}: they must match one to one."
            )
        if not t_pairs:
            raise ValueError("The FSP term needs at least one pair of layers.")
        if self.pair_weights is not None and len(self.pair_weights) != len(t_pairs):
            raise ValueError(
                f"pair_weights has {len(self.pair_weights)} entries for {len(t_pairs)} FSP pairs "
                f"{list(t_pairs)}."
            )
        self.pairs, self.student_pairs = list(t_pairs), list(s_pairs)
        for model, pairs, role in ((teacher, t_pairs, "teacher"), (student, s_pairs, "student")):
            for pair in pairs:
                shapes = [taps.output_shape(model, n, role) for n in pair]
                try:
                    positions.pooled_size(*shapes)
                except ValueError as e:
                    message = f"FSP pair {pair} of the {role}: {e}"
                    raise (pairing.mismatch(teacher, student, message) if auto
                           else ValueError(message)) from None
        try:
            self.projections = self._make_projections(teacher, student)
        except ValueError as e:
            raise (pairing.mismatch(teacher, student, str(e)) if auto else e) from None
        self.teacher_taps = tuple(dict.fromkeys(n for p in t_pairs for n in p))
        self.student_taps = tuple(dict.fromkeys(n for p in s_pairs for n in p))
        mask = masks.mask_taps(teacher, student, self.teacher_taps, self.student_taps, "the FSP term")
        self.teacher_taps += mask
        self.student_taps += mask
        if auto or self.projections:
            announce(f"keras_fsp: {teacher.name} -> {student.name}, {self.describe()}")

    def _make_projections(self, teacher, student):
        projections = {}
        for t_pair, s_pair in zip(self.pairs, self.student_pairs):
            for t_name, s_name in zip(t_pair, s_pair):
                t_shape = taps.output_shape(teacher, t_name, "teacher")
                s_shape = taps.output_shape(student, s_name, "student")
                if t_shape[-1] == s_shape[-1] or s_name in projections:
                    continue
                if self.projection is False:
                    raise ValueError(
                        f"FSP pair mismatch: teacher layer {t_name!r} has shape {t_shape} and "
                        f"student layer {s_name!r} has shape {s_shape}; their channel counts "
                        "must be equal for the FSP matrices to have the same size. Tap layers "
                        "with equal channels, or pass FSPTerm(projection='auto') to learn a "
                        "per-position projection of the student's features."
                    )
                # Layer names cannot hold the "/" of a nested layer's path.
                proj = per_position_linear(t_shape[-1], s_shape,
                                           f"{self.name}_projection_{s_name.replace('/', '_')}")
                projections[s_name] = proj
        return projections

    def matrices_of(self, teacher, student, x):
        """The teacher's and the student's FSP matrices of this term's pairs
        on `x` (inference mode, projections applied): two lists of numpy
        arrays `(batch, m_i, n_i)`."""
        return (
            fsp_matrices_of(teacher, self.pairs, x, self.pooling, role="teacher"),
            fsp_matrices_of(student, self.student_pairs, x, self.pooling,
                            self.projections, role="student"),
        )

    def describe(self):
        """The pairs, one a line, and each learned projection's channels."""
        lines = [f"{self.name}: {len(self.pairs)} FSP pairs (teacher -> student)"]
        for t, s in zip(self.pairs, self.student_pairs):
            lines.append(f"  {t} -> {s}")
        for name, proj in self.projections.items():
            c_in, c_out = proj.kernel.shape[-2:]
            kind = "1x1" if len(proj.kernel.shape) == 4 else "per-position"
            lines.append(f"  {kind} projection of the student's {name!r}: {c_in} -> {c_out} channels")
        return "\n".join(lines)

    # ------------------------------------------------------------- compute

    def teacher_targets(self, features):
        g = fsp_matrices(features, self.pairs, self.pooling)
        return {fsp_key(p, self.pooling): m for p, m in zip(self.pairs, g)}

    def target_shapes(self, teacher):
        return {
            fsp_key((a, b), self.pooling): (
                taps.output_shape(teacher, a, "teacher")[-1],
                taps.output_shape(teacher, b, "teacher")[-1],
            )
            for a, b in self.pairs
        }

    def compute(self, student, teacher, y_true):
        g_t = [teacher[fsp_key(p, self.pooling)] for p in self.pairs]
        g_s = fsp_matrices(student, self.student_pairs, self.pooling, self.projections)
        return fsp_distance(g_t, g_s, self.pair_weights, self.normalize)

    def get_config(self):
        return {
            **super().get_config(),
            "pairs": self.pairs,
            "student_pairs": self.student_pairs,
            "pair_weights": self.pair_weights,
            "pooling": self.pooling,
            "projection": self.projection,
            "normalize": self.normalize,
        }
