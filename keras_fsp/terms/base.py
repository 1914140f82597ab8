"""The protocol of a distillation term, and the registry of term types.

A term is one summand of a stage's loss. It declares what it reads from the
two networks (`student_taps`, `teacher_taps`: layer names, or `LOGITS` for
the network's output), what it needs from the teacher (`teacher_targets`,
which is also what a teacher cache stores), owns its trainable layers (a
hint regressor, FSP projections), and computes its value (`compute`). The
distiller only unions the taps of the active terms, runs each network once,
and sums `weight * value` over them: it never needs to know what a term is.

Both networks' tapped outputs are keyed alike: by the layer name as the term
declared it (`"stage2"`, `"backbone/conv1_relu"`) or `LOGITS`. What a term
derives from the teacher (an FSP matrix, an attention map) is keyed by what
it is (`"/fsp/max/stem/stage1"`: keys keras_fsp makes start with "/", which
no layer name can), so two terms needing the same target share it.

A term's value is either one number per example, shape `(batch,)`, which the
distiller averages with the sample weights, or one number for the batch, a
scalar (relational losses over pairs of examples), which it uses as it is
(sample weights do not apply). A new method is a subclass registered by name:

```python
import keras
from keras import ops
from keras_fsp.terms import LOGITS, DistillationTerm, register_term

@register_term("logit_mse")
class LogitMSE(DistillationTerm):
    student_taps = teacher_taps = (LOGITS,)

    def compute(self, student, teacher, y_true):  # one value per example
        return ops.mean(ops.square(student[LOGITS] - teacher[LOGITS]), axis=-1)

@register_term("logit_gram")
class LogitGram(DistillationTerm):
    student_taps = teacher_taps = (LOGITS,)

    def compute(self, student, teacher, y_true):  # one value for the batch
        s, t = student[LOGITS], teacher[LOGITS]
        return ops.mean(ops.square(ops.matmul(s, ops.transpose(s)) - ops.matmul(t, ops.transpose(t))))
```

Any stage may then name them: `Stage("mine", {"logit_mse": 1.0, "task": 1.0})`.
"""

import logging

import keras
from keras import ops

from keras_fsp import taps

LOGITS = taps.LOGITS

_REGISTRY = {}


def register_term(name):
    """Class decorator: registers a `DistillationTerm` type under `name`.

    A stage may then name the term (`Stage("s", {name: weight})`) without
    the distiller being given an instance: it creates one with the class's
    defaults when the stage is first used. The class is also registered with
    Keras' serialization (package `"keras_fsp"`), so distillers using it save
    and load.
    """

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, DistillationTerm)):
            raise TypeError(f"register_term({name!r}) decorates DistillationTerm subclasses; got {cls!r}.")
        if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
            raise ValueError(
                f"A term type is already registered as {name!r} ({_REGISTRY[name].__name__}); "
                "choose another name."
            )
        _REGISTRY[name] = cls
        cls.registered_name = name
        return keras.saving.register_keras_serializable(package="keras_fsp")(cls)

    return decorate


def registered_terms():
    """`{name: class}` of every registered term type."""
    return dict(_REGISTRY)


def term_class(name):
    """The term type registered as `name`.

    Raises:
        ValueError: naming the registered types when there is none.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"No distillation term type is registered as {name!r}; registered: "
            f"{sorted(_REGISTRY)}. Define one with @keras_fsp.terms.register_term, or give "
            "the distiller an instance (terms=[...])."
        )
    return _REGISTRY[name]


_ANNOUNCED = set()


def announce(text):
    """Logs `text` (a term's automatic pairing) at INFO level to the
    `keras_fsp` logger (`logging.basicConfig(level=logging.INFO)` shows it;
    the command line writes it into the run's log), once per process: a
    distiller built again with the same networks (a resumed run,
    `from_config`) does not repeat it."""
    if text not in _ANNOUNCED:
        _ANNOUNCED.add(text)
        logging.getLogger("keras_fsp").info(text)


def batch_mean(value, sample_weight=None):
    """A term's value as the batch's float32 loss: the (sample-weighted)
    mean of per-example values, or a batch-level scalar as it is."""
    value = ops.cast(value, "float32")
    if len(value.shape) == 0:
        return value
    if sample_weight is not None:
        value = value * ops.cast(ops.reshape(sample_weight, ops.shape(value)), "float32")
    return ops.mean(value)


class DistillationTerm(keras.layers.Layer):
    """One loss term of an `FSPDistiller` stage.

    Subclasses set `student_taps` and `teacher_taps` (tuples of layer names,
    `LOGITS` for the output), possibly in `configure`, and implement
    `compute`. A term that needs more than raw taps from the teacher (FSP
    matrices, attention maps) overrides `teacher_targets` and
    `target_shapes`; these are what `FSPDistiller.teacher_outputs` caches.

    The term's `name` is the name stages use and its logged metric is
    `{name}_loss`. `stage_weight` is its weight in the active stage (0 when the
    term is not in it), a variable so that `LossWeightSchedule` changes it
    without retracing the step. Layers the term creates (in `configure`)
    train only while the term is active.
    """

    #: Layer names tapped on each network (`LOGITS`: the output).
    student_taps = ()
    teacher_taps = ()
    registered_name = None
    #: Whether the term compares the two networks' logits class by class
    #: (soft targets, DKD): then their class counts must be equal.
    same_logits = False

    def __init__(self, name=None, **kwargs):
        super().__init__(name=name or self.registered_name or type(self).__name__.lower(), **kwargs)
        self.stage_weight = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                            name="stage_weight")
        self.built = True  # a term builds its own layers in `configure`

    @property
    def uses_teacher(self):
        return bool(self.teacher_taps)

    def configure(self, teacher, student):
        """Resolves the taps against the two networks, checks their shapes
        and builds the term's own layers. Called once by the distiller,
        before the term's first stage trains; raise `ValueError` with a
        clear message for anything that cannot work. The default checks that
        tapped layers exist and, for `same_logits` terms, that the class
        counts agree."""
        for model, names, role in ((teacher, self.teacher_taps, "teacher"),
                                   (student, self.student_taps, "student")):
            for name in names:
                if name != LOGITS:
                    taps.output_shape(model, name, role)
        if self.same_logits:
            t, s = (taps.tap_shape(m, LOGITS, r)[-1]
                    for m, r in ((teacher, "teacher"), (student, "student")))
            if None not in (t, s) and t != s:
                raise ValueError(
                    f"the {self.name!r} term compares the networks' logits class by class, but "
                    f"the teacher has {t} classes and the student {s}."
                )

    def use_student_loss(self, loss):
        """Called by the distiller's `compile` with its `loss` (the student's
        own loss on the labels); a term computing that loss adopts it."""

    def teacher_targets(self, features):
        """`{key: tensor}` this term needs from the teacher's tapped outputs
        (`features`, keyed like the student's). Default: the raw taps."""
        return {n: features[n] for n in self.teacher_taps}

    def target_shapes(self, teacher):
        """`{key: per-example shape}` of `teacher_targets`, for checking a
        cache before training."""
        return {n: taps.tap_shape(teacher, n, "teacher")[1:] for n in self.teacher_taps}

    def compute(self, student, teacher, y_true):
        """The term's value on one batch.

        Args:
            student: `{tap: tensor}`, the student's tapped outputs
                (training mode).
            teacher: `{key: tensor}`, what `teacher_targets` returned
                (gradients stopped): raw taps under the same keys as
                `student`.
            y_true: the labels of the batch.

        Returns:
            float32 `(batch,)`, one value per example, or a scalar for the
            whole batch.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute().")

    def describe(self):
        """One line about what the term taps, for logs."""
        return f"{self.name}: student {list(self.student_taps)}, teacher {list(self.teacher_taps)}"
