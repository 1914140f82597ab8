"""KD with logit standardisation (Sun, Ren, Li, Wang, Cao, CVPR 2024): each
network's logits z-scored per example before the temperature softmax, so the
student matches the teacher's relations between classes rather than the
range of its logits. The maths and the term."""

from keras import ops

from keras_fsp.terms.base import LOGITS, register_term
from keras_fsp.terms.soft_targets import SoftTargetTerm, soft_target_loss

EPSILON = 1e-7  # the authors' code's, added to the standard deviation


def standardize(logits):
    """`(z - mean(z)) / (eps + std(z))` over the class axis, per example (the
    standard deviation with Bessel's correction, as the authors' code)."""
    z = ops.cast(logits, "float32")
    classes = z.shape[-1]
    centered = z - ops.mean(z, axis=-1, keepdims=True)
    std = ops.sqrt(ops.sum(ops.square(centered), axis=-1, keepdims=True) / (classes - 1))
    return centered / (EPSILON + std)


def standardized_kd(teacher_logits, student_logits, temperature=2.0):
    """`T^2 * KL(softmax(Z(z_t) / T) || softmax(Z(z_s) / T))` per example,
    `Z` = `standardize`."""
    return soft_target_loss(standardize(teacher_logits), standardize(student_logits),
                            temperature)


@register_term("ls_kd")
class StandardizedKDTerm(SoftTargetTerm):
    """KD on standardised logits (`standardized_kd`): the soft-target term
    with each network's logits z-scored first. The authors' CIFAR-100
    setting, the defaults of `keras_fsp.papers.recipes.standardized_kd`: T 2,
    this term weighted 9 and the labels 0.1.

    Args:
        temperature: `T > 0` (the "base temperature"; default 2).
        name: the term's name in stages (default `"ls_kd"`).
    """

    def __init__(self, temperature=2.0, name="ls_kd", **kwargs):
        super().__init__(temperature=temperature, name=name, **kwargs)

    def compute(self, student, teacher, y_true):
        return standardized_kd(teacher[LOGITS], student[LOGITS], self.temperature)
