"""Relational distillation: the student matches how the examples of a batch
relate to one another in the teacher's features (distances, angles,
similarities), not the features themselves, so the two networks' widths may
differ and no projection is learned. What RKD (`keras_fsp.terms.rkd`), PKT
(`keras_fsp.terms.pkt`) and SP (`keras_fsp.terms.similarity`) share: the
choice of the feature layers, and numerically safe helpers.

Their values are batch-level (one number for the batch): sample weights do
not apply, and the relations are those of each replica's batch. Tapped on
token features `(batch, steps, channels)` of networks with a padding mask
(`keras_fsp.masks`), the padded positions' features are zero before the
features are flattened, so what padding holds does not change the
relations (the student's mask: both networks see the same batch). CRD
(`keras_fsp.terms.crd`) shares the choice of layers too, but learns
embeddings and has a value per example.
"""

from keras import ops

from keras_fsp import masks, pairing, taps
from keras_fsp.terms.base import DistillationTerm, announce

AUTO = "auto"


def flat_features(features, mask=None):
    """`features` as float32 `(batch, -1)`; with a padding `mask` `(batch,
    steps)`, the padded positions of sequences are zero."""
    f = ops.cast(features, "float32")
    if mask is not None:
        f = f * ops.expand_dims(masks.at_positions(mask, f.shape), -1)
    return ops.reshape(f, (ops.shape(f)[0], -1))


def safe_norm(x, axis=-1, keepdims=True, epsilon=1e-12):
    """`max(||x||_2, epsilon)` along `axis`, with finite gradients at 0 (the
    square root's derivative at 0 is infinite: clamping before it makes the
    gradient of a zero vector 0, as PyTorch's `normalize` has it)."""
    return ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=keepdims),
                                epsilon * epsilon))


def smooth_l1(a, b):
    """Mean Huber loss of `a - b` with threshold 1 (PyTorch's `smooth_l1_loss`):
    `0.5 d^2` where `|d| < 1`, else `|d| - 0.5`."""
    d = a - b
    magnitude = ops.abs(d)
    return ops.mean(ops.where(magnitude < 1.0, 0.5 * ops.square(d), magnitude - 0.5))


def _check_layers(layers):
    if layers == AUTO:
        return AUTO
    if isinstance(layers, str):
        return (layers, layers)
    if isinstance(layers, (tuple, list)) and len(layers) == 2 and all(isinstance(n, str) for n in layers):
        return tuple(layers)
    raise ValueError(
        f"layers must be 'auto', a layer name of both networks, or (teacher_layer, "
        f"student_layer); got {layers!r}."
    )


class RelationalTerm(DistillationTerm):
    """A batch-level term on one teacher layer and one student layer,
    flattened to `(batch, features)`.

    Its value is `beta * relation(teacher, student)`: subclasses implement
    `relation` on the two flattened float32 feature matrices (the teacher's
    gradients stopped) and may override `auto_layer`.

    Args:
        layers: `(teacher_layer, student_layer)`, one name for both, or
            `"auto"`: each network's `auto_layer` (the penultimate features,
            `keras_fsp.pairing.penultimate`, unless the method says
            otherwise); resolved when the distiller configures the term,
            then logged once per process (`keras_fsp.terms.base.announce`).
        beta: the term's own weight (RepDistiller's `-b`), so that the
            stage may weight it 1.
        name: the term's name in stages.
    """

    def __init__(self, layers=AUTO, beta=1.0, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.layers = _check_layers(layers)
        self.beta = float(beta)
        if self.layers != AUTO:
            self.teacher_taps, self.student_taps = (self.layers[0],), (self.layers[1],)

    def auto_layer(self, model, role):
        """The layer `"auto"` taps on `model`: its penultimate features."""
        return pairing.penultimate(model, role)

    def configure(self, teacher, student):
        """Resolves `"auto"` and checks that each tap has features to
        compare (a batch axis and at least one more)."""
        auto = self.layers == AUTO
        if auto:
            self.layers = (self.auto_layer(teacher, "teacher"), self.auto_layer(student, "student"))
            self.teacher_taps, self.student_taps = (self.layers[0],), (self.layers[1],)
        super().configure(teacher, student)
        ranks = []
        for model, name, role in ((teacher, self.layers[0], "teacher"), (student, self.layers[1], "student")):
            ranks.append(len(taps.output_shape(model, name, role)))
            if ranks[-1] < 2:
                raise ValueError(
                    f"The {self.name!r} term relates examples by their features, but the "
                    f"{role}'s layer {name!r} gives {taps.output_shape(model, name, role)}: "
                    "choose a layer with a batch axis and features."
                )
        if ranks == [3, 3]:  # token features: the student's mask, for both
            mask = masks.mask_taps(teacher, student, self.layers[:1], self.layers[1:],
                                   f"the {self.name!r} term")
            self.student_taps = (self.layers[1], *mask)
        if auto:
            announce(f"keras_fsp: {teacher.name} -> {student.name}, {self.describe()}")

    def compute(self, student, teacher, y_true):
        t, s = self.layers
        mask = student.get(masks.PADDING_MASK)
        return self.beta * self.relation(flat_features(teacher[t], mask), flat_features(student[s], mask))

    def relation(self, teacher, student):
        """The term's value from the two networks' `(batch, features)`
        matrices (their widths may differ): a float32 scalar, or `(batch,)`
        for a term with a value per example (CRD)."""
        raise NotImplementedError(f"{type(self).__name__} must implement relation().")

    def describe(self):
        if self.layers == AUTO:
            return f"{self.name}: layers 'auto' (not resolved yet)"
        return f"{self.name}: teacher {self.layers[0]!r} -> student {self.layers[1]!r}"

    def get_config(self):
        layers = self.layers if self.layers == AUTO else list(self.layers)
        return {**super().get_config(), "layers": layers, "beta": self.beta}
