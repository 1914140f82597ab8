"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention
to Attention"): the maths and the term."""

from keras import ops

from keras_fsp import pairing, taps
from keras_fsp.terms.base import DistillationTerm, announce, register_term

REDUCTIONS = ("mean_squared", "l2")


def attention_map(features, p=2):
    """Spatial attention of a feature map: `sum_c |F_c|^p`, flattened and
    divided by its L2 norm.

    Args:
        features: `(batch, h, w, c)` map.
        p: the exponent (2 in the paper).

    Returns:
        float32 `(batch, h * w)`, each row of unit L2 norm.
    """
    f = ops.cast(features, "float32")
    q = ops.sum(ops.power(ops.abs(f), p), axis=-1)
    q = ops.reshape(q, (ops.shape(q)[0], -1))
    norm = ops.sqrt(ops.sum(ops.square(q), axis=-1, keepdims=True))
    return q / ops.maximum(norm, 1e-12)


def attention_key(layer, p):
    """Teacher-target key of the attention map of `layer`."""
    return f"/attention/{p:g}/{layer}"


@register_term("attention")
class AttentionTerm(DistillationTerm):
    """`beta / 2 * sum_j d(Q_S^j, Q_T^j)` over same-resolution tap pairs `j`,
    `Q` the normalised attention maps (`attention_map`).

    `d` is, with `reduction="mean_squared"` (default), the mean over the
    `h * w` positions of the squared difference: the authors' code and
    RepDistiller (which the published numbers come from), averaged over the
    batch by the distiller; with `reduction="l2"`, the L2 norm of the
    difference, as the paper's formula writes it. Channel counts may
    differ; spatial sizes must match.

    Args:
        pairs: `[(teacher layer, student layer), ...]`, or `"auto"`: the two
            networks' section ends at the spatial sizes both have
            (`keras_fsp.pairing.matched_section_ends`).
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

    def configure(self, teacher, student):
        """Resolves `"auto"` pairs (`pairs` then holds them, and they are
        printed once per process) and checks that each pair's maps have the
        same spatial size."""
        auto = self.pairs == "auto"
        if auto:
            self.pairs = pairing.matched_section_ends(teacher, student)
        if not self.pairs:
            raise ValueError("Attention transfer needs at least one (teacher, student) layer pair.")
        for pair in self.pairs:
            if len(pair) != 2:
                raise ValueError(f"Each attention pair is (teacher_layer, student_layer); got {pair!r}.")
            t_shape = taps.output_shape(teacher, pair[0], "teacher")
            s_shape = taps.output_shape(student, pair[1], "student")
            if len(t_shape) != 4 or len(s_shape) != 4 or t_shape[1:3] != s_shape[1:3]:
                raise ValueError(
                    f"Attention pair {tuple(pair)}: the teacher's map {t_shape} and the "
                    f"student's {s_shape} must be 4-D with the same spatial size."
                )
        self.teacher_taps = tuple(dict.fromkeys(t for t, _ in self.pairs))
        self.student_taps = tuple(dict.fromkeys(s for _, s in self.pairs))
        if auto:
            announce(f"keras_fsp: {teacher.name} -> {student.name}, {self.describe()}")

    def teacher_targets(self, features):
        return {attention_key(t, self.p): attention_map(features[t], self.p) for t in self.teacher_taps}

    def target_shapes(self, teacher):
        shapes = {}
        for t in self.teacher_taps:
            _, h, w, _ = taps.output_shape(teacher, t, "teacher")
            shapes[attention_key(t, self.p)] = (h * w,)
        return shapes

    def compute(self, student, teacher, y_true):
        total = 0.0
        for t, s in self.pairs:
            diff = attention_map(student[s], self.p) - teacher[attention_key(t, self.p)]
            if self.reduction == "mean_squared":
                total = total + ops.mean(ops.square(diff), axis=-1)
            else:
                total = total + ops.sqrt(ops.sum(ops.square(diff), axis=-1) + 1e-24)
        return 0.5 * self.beta * total

    def describe(self):
        return f"{self.name}: attention pairs (teacher, student) {self.pairs}, beta {self.beta:g}"

    def get_config(self):
        return {**super().get_config(), "pairs": self.pairs, "beta": self.beta, "p": self.p,
                "reduction": self.reduction}
