"""The protocol of a distillation term, and the registry of term types.

A term is one summand of a stage's loss. It declares what it reads from the
two networks (`student_taps`, `teacher_taps`: layer names, or `LOGITS` for
the network's output), what it needs from the teacher
(`teacher_targets`, which is also what a teacher cache stores), owns its
trainable layers (a hint regressor, FSP projections), and computes one
value per example (`compute`). The distiller only unions the taps of the
active terms, runs each network once, and sums `weight * term` over them: it
never needs to know what a term is.

A new method is a subclass registered by name:

```python
@keras_fsp.terms.register_term("my_term")
class MyTerm(keras_fsp.terms.DistillationTerm):
    student_taps = teacher_taps = (keras_fsp.terms.LOGITS,)

    def compute(self, student, teacher, y_true):
        return keras.ops.mean(keras.ops.square(student[LOGITS] - teacher[LOGITS]), axis=-1)

distiller = FSPDistiller(teacher, student, stages={"mine": Stage("mine", {"my_term": 1.0})})
```
"""

import keras

from keras_fsp import taps

LOGITS = taps.LOGITS

_REGISTRY = {}


def register_term(name):
    """Class decorator: registers a `DistillationTerm` type under `name`.

    A stage may then name the term (`Stage("s", {name: weight})`) without
    the distiller being given an instance: it creates one with the class's
    defaults. The class is also registered with Keras' serialization
    (package `"keras_fsp"`), so distillers using it save and load.
    """

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, DistillationTerm)):
            raise TypeError(f"register_term({name!r}) decorates DistillationTerm subclasses; got {cls!r}.")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
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
            f"{sorted(_REGISTRY)}. Define one with @keras_fsp.terms.register_term."
        )
    return _REGISTRY[name]


_ANNOUNCED = set()


def announce(text):
    """Prints `text` (a term's automatic pairing) once per process: a
    distiller built again with the same networks (a resumed run,
    `from_config`, a harness building one per stage) does not repeat it."""
    if text not in _ANNOUNCED:
        _ANNOUNCED.add(text)
        print(text, flush=True)


def tap_key(layer):
    """Teacher-target key of a raw tapped map (shared by every term using it)."""
    return LOGITS if layer == LOGITS else f"tap/{layer}"


class DistillationTerm(keras.layers.Layer):
    """One loss term of an `FSPDistiller` stage.

    Subclasses set `student_taps` and `teacher_taps` (tuples of layer names,
    `LOGITS` for the output), possibly in `configure`, and implement
    `compute`. A term that needs more than raw maps from the teacher (FSP
    matrices, attention maps) overrides `teacher_targets` and
    `target_shapes`; these are what `FSPDistiller.teacher_outputs` caches,
    keyed by what they are, so two terms needing the same target share it.

    The term's `name` is the name stages use (`Stage.losses`) and its logged
    metric is `{name}_loss`. Layers the term creates (in `configure`) are
    the distiller's variables, trained only while the term is active.
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
        self.built = True  # a term builds its own layers in `configure`

    @property
    def uses_teacher(self):
        return bool(self.teacher_taps)

    def configure(self, teacher, student):
        """Resolves the taps against the two networks, checks their shapes
        and builds the term's own layers. Called once by the distiller,
        before training; raise `ValueError` with a clear message for
        anything that cannot work. The default checks that tapped layers
        exist and, for `same_logits` terms, that the class counts agree
        (otherwise the first step fails with a shape error, perhaps after a
        whole earlier stage)."""
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

    def teacher_targets(self, features):
        """`{key: tensor}` this term needs from the teacher's tapped outputs
        (a dict keyed by tap name). Default: the raw taps."""
        return {tap_key(n): features[n] for n in self.teacher_taps}

    def target_shapes(self, teacher):
        """`{key: per-example shape}` of `teacher_targets`, for checking a
        cache before training."""
        return {tap_key(n): taps.tap_shape(teacher, n, "teacher")[1:] for n in self.teacher_taps}

    def compute(self, student, teacher, y_true):
        """The term's value per example.

        Args:
            student: `{tap: tensor}`, the student's tapped outputs
                (training mode), with `LOGITS` if tapped.
            teacher: `{key: tensor}`, the teacher's targets (what
                `teacher_targets` returned, gradients stopped).
            y_true: the labels of the batch.

        Returns:
            a float32 tensor `(batch,)`; the distiller averages it (with the
            sample weights) and multiplies it by the stage's weight.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute().")

    def describe(self):
        """One line about what the term taps, for logs."""
        return f"{self.name}: student {list(self.student_taps)}, teacher {list(self.teacher_taps)}"

    def get_config(self):
        return super().get_config()
