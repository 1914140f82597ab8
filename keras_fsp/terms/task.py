"""The task term: the student's own loss on the labels."""

import keras
from keras import ops

from keras_fsp.terms.base import LOGITS, DistillationTerm, register_term


@register_term("task")
class TaskLoss(DistillationTerm):
    """The hard-label loss of the student's logits; the teacher is not used.

    Args:
        loss: a `keras.losses.Loss` taking `(labels, logits)`; default
            `SparseCategoricalCrossentropy(from_logits=True)`. It is also the
            loss `evaluate` reports.
        name: the term's name in stages (default `"task"`).
    """

    student_taps = (LOGITS,)

    def __init__(self, loss=None, name="task", **kwargs):
        super().__init__(name=name, **kwargs)
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if not isinstance(loss, keras.losses.Loss):
            raise ValueError(
                "The task loss must be a keras.losses.Loss instance that takes the student's "
                "logits, e.g. keras.losses.SparseCategoricalCrossentropy(from_logits=True); "
                f"got {loss!r}."
            )
        self.loss = loss

    def compute(self, student, teacher, y_true):
        per_example = self.loss.call(y_true, ops.cast(student[LOGITS], "float32"))
        per_example = ops.cast(per_example, "float32")
        while len(per_example.shape) > 1:
            per_example = ops.mean(per_example, axis=-1)
        return per_example

    def get_config(self):
        return {**super().get_config(), "loss": keras.saving.serialize_keras_object(self.loss)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("loss") is not None:
            config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)
