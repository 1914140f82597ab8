"""A distillation method of your own, in one file: its term, its recipe and
its line in the method table. Nothing in keras_fsp changes:

    keras-fsp --plugins examples/my_method.py distill --method logit-mse --dataset digits \\
        --teacher_depth 14 --schedule_scale 0.002
    keras-fsp --plugins examples/my_method.py distill --help            # lists logit-mse
    keras-fsp --plugins examples/my_method.py reproduce cifar10-resnet26-to-resnet8 \\
        --methods kd,logit-mse --dataset npz:cifar10.npz

The term: the mean squared difference of the two networks' logits (Ba &
Caruana's "logit matching"), with the labels' cross-entropy beside it.
"""

from keras import ops

from keras_fsp.papers import methods, recipes
from keras_fsp.terms import LOGITS, DistillationTerm, register_term


@register_term("logit_mse")
class LogitMSE(DistillationTerm):
    """Mean squared difference of the two networks' logits, per example."""

    student_taps = teacher_taps = (LOGITS,)
    same_logits = True  # compared class by class

    def compute(self, student, teacher, y_true):
        return ops.mean(ops.square(student[LOGITS] - teacher[LOGITS]), axis=-1)


def logit_mse(teacher, student, steps_per_epoch, augment=None, scale=1.0):
    """One stage of logit MSE + labels on the student's usual schedule."""
    return recipes.single_stage(teacher, student, steps_per_epoch, {"logit_mse": 1.0, "task": 1.0},
                                "logit_mse", augment=augment, scale=scale)


methods.register_method("logit-mse", logit_mse, "logit MSE + labels (a plugin)")
