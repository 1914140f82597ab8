"""DIST (Huang, You, Wang, Qian, Xu, NeurIPS 2022, "Knowledge Distillation
from A Stronger Teacher"): the student matches the teacher's class
probabilities by correlation rather than exactly, across the classes of each
example (inter-class) and across the batch for each class (intra-class). The
maths and the term."""

from keras import ops

from keras_fsp.terms.base import LOGITS, DistillationTerm, register_term
from keras_fsp.terms.soft_targets import check_temperature

EPSILON = 1e-8  # the authors' code's, in the cosine's denominator


def pearson_distance(a, b, axis=-1):
    """`1 - Pearson(a, b)` along `axis` (a vector per other index)."""
    a = a - ops.mean(a, axis=axis, keepdims=True)
    b = b - ops.mean(b, axis=axis, keepdims=True)
    norms = ops.sqrt(ops.sum(ops.square(a), axis=axis)) * ops.sqrt(ops.sum(ops.square(b), axis=axis))
    return 1.0 - ops.sum(a * b, axis=axis) / (norms + EPSILON)


def dist_loss(teacher_logits, student_logits, temperature=4.0, beta=2.0, gamma=2.0):
    """`T^2 * (beta * inter + gamma * intra)`, one value for the batch.

    With `P = softmax(z / T)` of each network, `(batch, classes)`: inter is
    the mean over examples of `1 - Pearson` of the two networks' rows,
    intra the mean over classes of `1 - Pearson` of their columns (across
    the batch: a batch-level term).
    """
    t = float(temperature)
    p_t = ops.softmax(ops.cast(teacher_logits, "float32") / t, axis=-1)
    p_s = ops.softmax(ops.cast(student_logits, "float32") / t, axis=-1)
    inter = ops.mean(pearson_distance(p_s, p_t, axis=1))
    intra = ops.mean(pearson_distance(p_s, p_t, axis=0))
    return (t * t) * (beta * inter + gamma * intra)


@register_term("dist")
class DISTTerm(DistillationTerm):
    """DIST on the two networks' logits (`dist_loss`), a batch-level term;
    the labels are the stage's `"task"` term. Defaults: the paper's CIFAR-100
    setting (T 4, beta = gamma = 2, the labels weighted 1).

    Args:
        temperature: `T > 0`.
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.
        name: the term's name in stages (default `"dist"`).
    """

    student_taps = teacher_taps = (LOGITS,)
    same_logits = True

    def __init__(self, temperature=4.0, beta=2.0, gamma=2.0, name="dist", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = check_temperature(temperature)
        self.beta, self.gamma = float(beta), float(gamma)

    def compute(self, student, teacher, y_true):
        return dist_loss(teacher[LOGITS], student[LOGITS], self.temperature, self.beta, self.gamma)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "beta": self.beta,
                "gamma": self.gamma}
