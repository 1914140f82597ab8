"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang, CVPR 2022):
the maths and the term."""

from keras import ops

from keras_fsp.terms.base import LOGITS, DistillationTerm, register_term
from keras_fsp.terms.soft_targets import check_temperature

# Subtracted from the target class's logit to take it out of a softmax; a
# finite number, so that nothing becomes inf or NaN.
_MASKED = 1e9


def _binary_and_rest(logits, mask):
    """`(log b, log p~)`: the log-probabilities of [target, not target], and
    the log-softmax over the non-target classes."""
    z = ops.cast(logits, "float32")
    everything = ops.logsumexp(z, axis=-1)
    rest = ops.logsumexp(z - _MASKED * mask, axis=-1)
    log_target = ops.sum(mask * z, axis=-1) - everything
    log_others = rest - everything  # log(1 - p_target)
    log_b = ops.stack([log_target, log_others], axis=-1)
    log_rest = z - _MASKED * mask - rest[:, None]
    return log_b, log_rest


def decoupled_kd(teacher_logits, student_logits, labels, alpha=1.0, beta=8.0, temperature=4.0):
    """`(alpha * TCKD + beta * NCKD) * T^2` per example.

    TCKD is `KL(b_T || b_S)` of the binary distributions [p_target,
    1 - p_target]; NCKD is `KL(p~_T || p~_S)` of the softmaxes over the
    non-target classes; all probabilities at temperature `T`.

    Args:
        teacher_logits, student_logits: `(batch, classes)`.
        labels: integer class indices `(batch,)` (or `(batch, 1)`).

    Returns:
        float32 `(batch,)`.
    """
    t = float(temperature)
    classes = ops.shape(student_logits)[-1]
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    mask = ops.one_hot(labels, classes, dtype="float32")
    log_bt, log_qt = _binary_and_rest(ops.cast(teacher_logits, "float32") / t, mask)
    log_bs, log_qs = _binary_and_rest(ops.cast(student_logits, "float32") / t, mask)
    tckd = ops.sum(ops.exp(log_bt) * (log_bt - log_bs), axis=-1)
    others = 1.0 - mask
    nckd = ops.sum(others * ops.exp(log_qt) * (log_qt - log_qs), axis=-1)
    return (alpha * tckd + beta * nckd) * (t * t)


@register_term("dkd")
class DecoupledKDTerm(DistillationTerm):
    """Decoupled KD on the two networks' logits (`decoupled_kd`); the
    cross-entropy with the labels is the stage's separate `"task"` term.

    The paper's CIFAR settings are the defaults (alpha 1, beta 8, T 4); it
    warms the DKD weight up linearly over the first 20 epochs
    (`keras_fsp.papers.recipes.decoupled_kd` does, with a `LossWeightSchedule`).

    Args:
        alpha: weight of the target-class term (TCKD).
        beta: weight of the non-target-class term (NCKD); 0.5 on ImageNet.
        temperature: `T > 0`.
        name: the term's name in stages (default `"dkd"`).
    """

    student_taps = teacher_taps = (LOGITS,)
    same_logits = True

    def __init__(self, alpha=1.0, beta=8.0, temperature=4.0, name="dkd", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = check_temperature(temperature)

    def compute(self, student, teacher, y_true):
        return decoupled_kd(teacher[LOGITS], student[LOGITS], y_true,
                            self.alpha, self.beta, self.temperature)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta,
                "temperature": self.temperature}
