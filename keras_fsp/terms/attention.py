"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention
to Attention"): the maths and the term."""

import math

from keras import ops

from keras_fsp import masks, pairing, positions, taps
from keras_fsp.terms.base import DistillationTerm, announce, register_term

REDUCTIONS = ("mean_squared", "l2")


def attention_map(features, p=2, size=None, mask=None):
    """Attention of features over their positions: `sum_c |F_c|^p`,
    flattened and divided by its L2 norm.

    Args:
        features: `(batch, positions..., c)`: a map `(batch, h, w, c)`, or a
            sequence `(batch, steps, c)`.
        p: the exponent (2 in the paper).
        size: position counts to bring the map to first, each an integer
            divisor of the features' own: the map's values are averaged over
            groups of positions (the attention of a group of tokens is its
            tokens' mean energy: the same map, normalised, as their sum).
            `None`: the features' own positions.
        mask: `None`, or the sequences' padding mask `(batch, steps)`
            (`keras_fsp.masks`): padded positions are 0 before the
            normalisation (a group of tokens averages its valid ones), so
            the map spreads over the tokens only.

    Returns:
        float32 `(batch, positions)`, each row of unit L2 norm.
    """
    f = ops.cast(features, "float32")
    q = ops.sum(ops.power(ops.abs(f), p), axis=-1)
    m = masks.at_positions(mask, f.shape)
    if m is not None or (size is not None and tuple(size) != tuple(f.shape[1:-1])):
        q = ops.squeeze(positions.pool(ops.expand_dims(q, -1), size or f.shape[1:-1], "avg", m), -1)
    q = ops.reshape(q, (ops.shape(q)[0], -1))
    norm = ops.sqrt(ops.sum(ops.square(q), axis=-1, keepdims=True))
    return q / ops.maximum(norm, 1e-12)


def attention_key(layer, p, size=None):
    """Teacher-target key of the attention map of `layer` (brought to the
    position counts `size`, when given)."""
    if size is None:
        return f"/attention/{p:g}/{layer}"
    return f"/attention/{p:g}@{'x'.join(str(n) for n in size)}/{layer}"


@register_term("attention")
class AttentionTerm(DistillationTerm):
    """`beta / 2 * sum_j d(Q_S^j, Q_T^j)` over same-resolution tap pairs `j`,
    `Q` the normalised attention maps (`attention_map`).

    `d` is, with `reduction="mean_squared"` (default), the mean over the
    `h * w` positions of the squared difference: the authors' code and
    RepDistiller (which the published numbers come from), averaged over the
    batch by the distiller; with `reduction="l2"`, the L2 norm of the
    difference, as the paper's formula writes it. Channel counts may
    differ. The spatial sizes of maps must match (the paper); the lengths
    of sequences `(batch, steps, channels)` may differ by an integer
    factor: the longer's map is averaged over groups of positions
    (`attention_map`), since a transformer's tokens have one length
    throughout and a student may tokenise more coarsely.

    Args:
        pairs: `[(teacher layer, student layer), ...]`, or `"auto"`: the two
            networks' matched section ends
            (`keras_fsp.pairing.matched_section_ends`: a CNN's at the
            spatial sizes both have, a transformer's blocks grouped evenly).
        beta: the weight (1000 in the paper, with `reduction="mean_squared"`).
        p: the exponent of the attention map (2).
        reduction: `"mean_squared"` or `"l2"`.
        name: the term's name in stages (default `"attention"`).
    """

    def __init__(self, pairs="auto", beta=1000.0, p=2, reduction="mean_squared",
                 name="attention", **kwargs):
        super().__init__(name=name, **kwargs)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
        if isinstance(pairs, str) and pairs != "auto":
            raise ValueError(f"pairs must be 'auto' or a list of (teacher, student) layers; got {pairs!r}.")
        self.pairs = pairs if isinstance(pairs, str) else [tuple(p_) for p_ in pairs]
        self.beta = float(beta)
        self.p = float(p)
        self.reduction = reduction
        self._sizes = None  # per pair, from `configure`; None: no pooling

    def configure(self, teacher, student):
        """Resolves `"auto"` pairs (`pairs` then holds them, and they are
        logged once per process) and checks that each pair's maps have the
        same spatial size (sequences: lengths that divide one another)."""
        auto = self.pairs == "auto"
        if auto:
            self.pairs = pairing.matched_section_ends(teacher, student)
        if not self.pairs:
            raise ValueError("Attention transfer needs at least one (teacher, student) layer pair.")
        self._sizes = [self._pooled_size(teacher, student, pair) for pair in self.pairs]
        self.teacher_taps = tuple(dict.fromkeys(t for t, _ in self.pairs))
        self.student_taps = tuple(dict.fromkeys(s for _, s in self.pairs))
        mask = masks.mask_taps(teacher, student, self.teacher_taps, self.student_taps,
                               "attention transfer")
        self.teacher_taps += mask
        self.student_taps += mask
        if auto:
            announce(f"keras_fsp: {teacher.name} -> {student.name}, {self.describe()}")

    def _pooled_size(self, teacher, student, pair):
        """`(teacher's, student's)` position counts to pool each map of
        `pair` to (None: its own)."""
        if len(pair) != 2:
            raise ValueError(f"Each attention pair is (teacher_layer, student_layer); got {pair!r}.")
        t_shape = taps.output_shape(teacher, pair[0], "teacher")
        s_shape = taps.output_shape(student, pair[1], "student")
        if len(t_shape) == 4 and len(s_shape) == 4:  # maps: the paper pairs one resolution
            if t_shape[1:3] != s_shape[1:3] or None in t_shape[1:3]:
                raise ValueError(
                    f"Attention pair {tuple(pair)}: the teacher's map {t_shape} and the "
                    f"student's {s_shape} must have the same spatial size."
                )
            return None, None
        try:
            size = positions.pooled_size(t_shape, s_shape, "attention transfer")
        except ValueError as e:
            raise ValueError(f"Attention pair {tuple(pair)}: {e}") from None
        return tuple(None if positions.positions_of(shape) == size else size
                     for shape in (t_shape, s_shape))

    def _targets(self):
        """`[(teacher layer, target key, teacher's pooled size)]`, one per pair."""
        return [(t, attention_key(t, self.p, size), size)
                for (t, _), (size, _) in zip(self.pairs, self._pair_sizes())]

    def _pair_sizes(self):
        return self._sizes or [(None, None)] * len(self.pairs)

    def teacher_targets(self, features):
        mask = features.get(masks.PADDING_MASK)
        return {key: attention_map(features[t], self.p, size, mask) for t, key, size in self._targets()}

    def target_shapes(self, teacher):
        return {key: (math.prod(size or taps.output_shape(teacher, t, "teacher")[1:-1]),)
                for t, key, size in self._targets()}

    def compute(self, student, teacher, y_true):
        total = 0.0
        mask = student.get(masks.PADDING_MASK)  # the batch's (the teacher saw the same)
        for (_, s), (_, key, _), (_, s_size) in zip(self.pairs, self._targets(), self._pair_sizes()):
            diff = attention_map(student[s], self.p, s_size, mask) - teacher[key]
            if self.reduction == "mean_squared" and mask is not None:
                # The mean over the valid positions (padded ones are 0 in both maps).
                m = masks.at_positions(mask, student[s].shape)
                m = positions.pool_mask(m, s_size or tuple(student[s].shape[1:-1]))
                total = total + ops.sum(ops.square(diff), axis=-1) / masks.valid_count(m)
            elif self.reduction == "mean_squared":
                total = total + ops.mean(ops.square(diff), axis=-1)
            else:
                total = total + ops.sqrt(ops.sum(ops.square(diff), axis=-1) + 1e-24)
        return 0.5 * self.beta * total

    def describe(self):
        return f"{self.name}: attention pairs (teacher, student) {self.pairs}, beta {self.beta:g}"

    def get_config(self):
        return {**super().get_config(), "pairs": self.pairs, "beta": self.beta, "p": self.p,
                "reduction": self.reduction}
