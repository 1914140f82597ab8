"""Relational knowledge distillation (Park, Kim, Lu, Cho, CVPR 2019, "Relational
Knowledge Distillation"): the student matches the teacher's distances between
pairs of examples and angles within triplets, on the penultimate features.
The maths and the term."""

from keras import ops

from keras_fsp.terms.base import register_term
from keras_fsp.terms.relational import AUTO, RelationalTerm, flat_features, safe_norm, smooth_l1

EPSILON = 1e-12  # the floor of squared distances, the authors' and RepDistiller's


def pairwise_distances(features):
    """Euclidean distances between the examples of `features` `(batch,
    ...)`, flattened: `(batch, batch)`, 0 on the diagonal.

    The squared distances from the Gram matrix are floored at `EPSILON`
    before the square root (rounding makes them slightly negative, and the
    root's derivative at 0 is infinite): the diagonal, masked to 0
    afterwards, then passes zero gradients, not NaN.
    """
    e = flat_features(features)
    sq = ops.sum(ops.square(e), axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * ops.matmul(e, ops.transpose(e))
    off_diagonal = 1.0 - ops.eye(ops.shape(e)[0], dtype="float32")
    return ops.sqrt(ops.maximum(d2, EPSILON)) * off_diagonal


def _mean_normalised(d):
    # Divided by the mean over the distinct pairs (the positive entries), so
    # the loss ignores each network's scale. One example: no pair, all 0.
    positive = ops.cast(d > 0, "float32")
    mean = ops.sum(d) / ops.maximum(ops.sum(positive), 1.0)
    return d / ops.maximum(mean, EPSILON)


def triplet_angles(features):
    """Cosines of the angles at each example: `[i, j, k] = cos(e_j - e_i,
    e_k - e_i)`, `(batch, batch, batch)` (0 where a side has length 0: `j` or
    `k` is `i`, or a duplicate of it).
    Memory grows as `batch^2 * d` and `batch^3`."""
    e = flat_features(features)
    diff = e[None, :, :] - e[:, None, :]  # [i, j] = e_j - e_i
    unit = diff / safe_norm(diff, axis=-1)
    return ops.matmul(unit, ops.transpose(unit, (0, 2, 1)))


def rkd_loss(teacher, student, distance_weight=25.0, angle_weight=50.0):
    """`distance_weight * L_D + angle_weight * L_A`, one value for the batch.

    `L_D`: mean smooth-L1 between the two networks' pairwise distances, each
    divided by its mean over distinct pairs; `L_A`: mean smooth-L1 between
    their triplet angle cosines. `teacher` and `student` `(batch, ...)` are
    flattened and may differ in width. A part weighted 0 is not computed.
    """
    loss = 0.0
    if distance_weight:
        loss = distance_weight * smooth_l1(_mean_normalised(pairwise_distances(student)),
                                           _mean_normalised(pairwise_distances(teacher)))
    if angle_weight:
        loss = loss + angle_weight * smooth_l1(triplet_angles(student), triplet_angles(teacher))
    return ops.cast(loss, "float32")


@register_term("rkd")
class RKDTerm(RelationalTerm):
    """`beta * rkd_loss` between a teacher and a student layer, by default
    their penultimate features, a batch-level term; the labels are the
    stage's `"task"` term. Defaults: the paper's and RepDistiller's weights
    (distance 25, angle 50; RepDistiller weights the term 1).

    Args:
        layers: see `keras_fsp.terms.relational.RelationalTerm`.
        distance_weight: weight of the distance-wise loss.
        angle_weight: weight of the angle-wise loss.
        beta: multiplies both (RepDistiller's `-b`, 1).
        name: the term's name in stages (default `"rkd"`).
    """

    def __init__(self, layers=AUTO, distance_weight=25.0, angle_weight=50.0, beta=1.0, name="rkd",
                 **kwargs):
        super().__init__(layers, beta, name=name, **kwargs)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        if self.distance_weight < 0 or self.angle_weight < 0 or not (self.distance_weight or self.angle_weight):
            raise ValueError(
                "RKD's distance_weight and angle_weight must be >= 0, not both 0; got "
                f"{distance_weight!r} and {angle_weight!r}."
            )

    def relation(self, teacher, student):
        return rkd_loss(teacher, student, self.distance_weight, self.angle_weight)

    def get_config(self):
        return {**super().get_config(), "distance_weight": self.distance_weight,
                "angle_weight": self.angle_weight}
