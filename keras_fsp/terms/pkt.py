"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, "Learning Deep
Representations with Probabilistic Knowledge Transfer"): each network's
cosine similarities between the examples of a batch, as conditional
probabilities, and the KL divergence between them. The maths and the term."""

from keras import ops

from keras_fsp.terms.base import register_term
from keras_fsp.terms.relational import AUTO, RelationalTerm, flat_features, safe_norm

EPSILON = 1e-7  # the authors' code's (and RepDistiller's), in the norms and the logarithm


def conditional_probabilities(features):
    """`P[i, j]`, the probability of example `j` given `i` of `features`
    `(batch, ...)`, flattened: the cosine kernel `(cos(f_i, f_j) + 1) / 2` divided by its row sum, `(batch,
    batch)`."""
    f = flat_features(features)
    f = f / (safe_norm(f, axis=1) + EPSILON)
    kernel = (ops.matmul(f, ops.transpose(f)) + 1.0) / 2.0
    return kernel / ops.sum(kernel, axis=1, keepdims=True)


def pkt_loss(teacher, student):
    """`mean_ij P_t log((P_t + eps) / (P_s + eps))` of the two networks'
    `conditional_probabilities` (the mean over all `batch^2` entries, as the
    authors' code), one value for the batch; the widths may differ."""
    p_t = conditional_probabilities(teacher)
    p_s = conditional_probabilities(student)
    return ops.mean(p_t * (ops.log(p_t + EPSILON) - ops.log(p_s + EPSILON)))


@register_term("pkt")
class PKTTerm(RelationalTerm):
    """`beta * pkt_loss` between a teacher and a student layer, by default
    their penultimate features, a batch-level term; the labels are the
    stage's `"task"` term. Default: RepDistiller's weight (beta 30000, with
    the loss's mean over the batch's pairs).

    Args:
        layers: see `keras_fsp.terms.relational.RelationalTerm`.
        beta: the weight.
        name: the term's name in stages (default `"pkt"`).
    """

    def __init__(self, layers=AUTO, beta=30000.0, name="pkt", **kwargs):
        super().__init__(layers, beta, name=name, **kwargs)

    def relation(self, teacher, student):
        return pkt_loss(teacher, student)
