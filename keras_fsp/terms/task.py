"""The task term: the student's own loss on the labels."""

import keras
from keras import ops

from keras_fsp.terms.base import LOGITS, DistillationTerm, register_term


def default_student_loss():
    """Cross-entropy of integer labels and logits."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def check_student_loss(loss):
    """Raises unless `loss` is a `keras.losses.Loss` instance; returns it."""
    if not isinstance(loss, keras.losses.Loss):
        raise ValueError(
            "The student's loss must be a keras.losses.Loss instance that takes the student's "
            "logits, e.g. keras.losses.SparseCategoricalCrossentropy(from_logits=True); "
            f"got {loss!r}."
        )
    return loss


def per_example_loss(loss, y_true, logits):
    """`loss` of each example as float32 `(batch,)` (axes past the batch,
    e.g. of a sequence's positions, averaged)."""
    value = ops.cast(loss.call(y_true, ops.cast(logits, "float32")), "float32")
    while len(value.shape) > 1:
        value = ops.mean(value, axis=-1)
    return value


@register_term("task")
class TaskTerm(DistillationTerm):
    """The student's loss on the labels; the teacher is not used.

    Args:
        loss: a `keras.losses.Loss` taking `(labels, logits)`; default the
            loss given to the distiller's `compile` (itself
            `SparseCategoricalCrossentropy(from_logits=True)` by default).
        name: the term's name in stages (default `"task"`).
    """

    student_taps = (LOGITS,)

    def __init__(self, loss=None, name="task", **kwargs):
        super().__init__(name=name, **kwargs)
        self.own_loss = None if loss is None else check_student_loss(loss)
        self.loss = self.own_loss or default_student_loss()

    def use_student_loss(self, loss):
        if self.own_loss is None:
            self.loss = loss

    def compute(self, student, teacher, y_true):
        return per_example_loss(self.loss, y_true, student[LOGITS])

    def get_config(self):
        own = self.own_loss
        return {**super().get_config(),
                "loss": None if own is None else keras.saving.serialize_keras_object(own)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("loss") is not None:
            config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)
