"""Hinton's soft targets (knowledge distillation, 2015): the maths and the
term."""

from keras import ops

from keras_fsp.terms.base import LOGITS, DistillationTerm, register_term


def check_temperature(temperature):
    """`temperature` as a float, refused unless it is > 0."""
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    return temperature


def soft_target_loss(teacher_logits, student_logits, temperature=4.0):
    """`T^2 * KL(softmax(z_t / T) || softmax(z_s / T))` per example.

    Hinton's soft targets: the KL divergence of the student's softened
    distribution from the teacher's, multiplied by `T^2` so that its
    gradients keep their scale relative to the hard-label loss when `T`
    changes. Its gradients are those of the cross-entropy of the paper (the
    two differ by the teacher's entropy, a constant), and it is 0 when the
    student matches the teacher, so the logged value shows progress.

    Returns:
        float32 `(batch,)`.
    """
    t = float(temperature)
    log_teacher = ops.log_softmax(ops.cast(teacher_logits, "float32") / t, axis=-1)
    log_student = ops.log_softmax(ops.cast(student_logits, "float32") / t, axis=-1)
    return (t * t) * ops.sum(ops.exp(log_teacher) * (log_teacher - log_student), axis=-1)


@register_term("kd")
class SoftTargetTerm(DistillationTerm):
    """Soft targets (`soft_target_loss`) on the two networks' logits. The mix
    with the labels is the stage's: the built-in `"kd"` stage is
    `0.9 * kd + 0.1 * task`.

    Args:
        temperature: `T > 0`.
        name: the term's name in stages (default `"kd"`).
    """

    student_taps = teacher_taps = (LOGITS,)
    same_logits = True

    def __init__(self, temperature=4.0, name="kd", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = check_temperature(temperature)

    def compute(self, student, teacher, y_true):
        return soft_target_loss(teacher[LOGITS], student[LOGITS], self.temperature)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
