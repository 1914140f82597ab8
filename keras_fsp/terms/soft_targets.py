"""Hinton's soft-target term (knowledge distillation, 2015)."""

from keras_fsp.losses import SoftTargetLoss
from keras_fsp.terms.base import LOGITS, DistillationTerm, register_term


@register_term("kd")
class SoftTargets(DistillationTerm):
    """`T^2 * H(softmax(z_t / T), softmax(z_s / T))`
    (`keras_fsp.losses.SoftTargetLoss`) on the two networks' logits.

    Args:
        temperature: `T > 0`.
        name: the term's name in stages (default `"kd"`).
    """

    student_taps = teacher_taps = (LOGITS,)
    same_logits = True

    def __init__(self, temperature=4.0, name="kd", **kwargs):
        super().__init__(name=name, **kwargs)
        self.loss = SoftTargetLoss(temperature=temperature)
        self.temperature = self.loss.temperature

    def compute(self, student, teacher, y_true):
        return self.loss.call(teacher[LOGITS], student[LOGITS])

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
