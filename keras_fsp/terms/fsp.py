"""The FSP term (Yim et al., CVPR 2017, eq. 2), also the building block of
dense sequential FSP (Yeo et al., ICIP 2018: one term per step, each with the
pairs of its sections)."""

import keras

from keras_fsp import pairing, taps
from keras_fsp.fsp import POOLING_MODES, fsp_matrices, fsp_matrices_of, pooled_spatial_size
from keras_fsp.losses import FSPLoss
from keras_fsp.terms.base import DistillationTerm, announce, register_term


def fsp_key(pair, pooling):
    """Teacher-target key of the FSP matrix of the teacher layer pair `pair`."""
    return f"fsp/{pooling}/{pair[0]}/{pair[1]}"


@register_term("fsp")
class FSPTerm(DistillationTerm):
    """`sum_i lambda_i ||G_i^T - G_i^S||_F^2` over FSP-matrix pairs.

    Args:
        pairs: teacher layer pairs `[(first, second), ...]`, or `"auto"`:
            the two networks' sections paired by spatial size
            (`keras_fsp.pairing.matched_section_pairs`: each section's input
            with its output).
        student_pairs: the student's pairs when its layer names differ from
            the teacher's (found automatically with `pairs="auto"`).
        pair_weights: lambda_i per pair; default 1 each (the paper).
        pooling: `"max"` (the paper) or `"avg"`, to bring the larger map of
            a pair down to the smaller one's size.
        projection: `"auto"` (default): a learned 1x1 convolution maps a
            student map to the teacher's channel count where the two differ
            (the mapping is printed); `False`: such a pair is an error;
            `True`: same as `"auto"`.
        normalize: divide each pair's squared norm by the matrix size
            `m * n`, which keeps the loss near 1 whatever the widths (the
            paper's sum when False, the default).
        name: the term's name in stages (default `"fsp"`).
    """

    def __init__(self, pairs="auto", student_pairs=None, pair_weights=None, pooling="max",
                 projection="auto", normalize=False, name="fsp", **kwargs):
        super().__init__(name=name, **kwargs)
        if pooling not in POOLING_MODES:
            raise ValueError(f"fsp_pooling must be one of {POOLING_MODES}; got {pooling!r}.")
        if projection not in ("auto", True, False):
            raise ValueError(f"projection must be 'auto', True or False; got {projection!r}.")
        if isinstance(pairs, str) and pairs != "auto":
            raise ValueError(
                f"fsp_pairs must be 'auto', None or a list of layer-name pairs; got {pairs!r}."
            )
        self.pairs = pairs if isinstance(pairs, str) else [tuple(p) for p in pairs]
        self.student_pairs = None if student_pairs is None else [tuple(p) for p in student_pairs]
        self.pair_weights = None if pair_weights is None else [float(w) for w in pair_weights]
        self.pooling = pooling
        self.projection = projection
        self.normalize = bool(normalize)
        self.loss = FSPLoss(weights=self.pair_weights, normalize=self.normalize)
        self.projections = {}
        
    # ---------------------------------------------------------------- setup

    def configure(self, teacher, student):
        """Resolves `"auto"` pairs (`pairs` and `student_pairs` then hold the
        pairs found), checks shapes, and builds the projections. Automatic
        pairs and projections are printed (once per process)."""
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
                f"fsp_weights has {len(self.pair_weights)} entries for {len(t_pairs)} FSP pairs "
                f"{list(t_pairs)}."
            )
        self.pairs, self.student_pairs = list(t_pairs), list(s_pairs)
        for model, pairs, role in ((teacher, t_pairs, "teacher"), (student, s_pairs, "student")):
            for pair in pairs:
                shapes = [taps.output_shape(model, n, role) for n in pair]
                try:
                    pooled_spatial_size(*shapes)
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
                        "with equal channels, or pass fsp_projection='auto' to learn a 1x1 "
                        "projection of the student's map."
                    )
                # Layer names cannot hold the "/" of a nested layer's path.
                proj = keras.layers.Conv2D(t_shape[-1], 1, use_bias=False,
                                           name=f"{self.name}_projection_{s_name.replace('/', '_')}")
                proj.build(s_shape)
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
            _, _, c_in, c_out = proj.kernel.shape
            lines.append(f"  1x1 projection of the student's {name!r}: {c_in} -> {c_out} channels")
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
        return self.loss.call(g_t, g_s)

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

