"""Similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019): the
student matches the teacher's similarities between the examples of a batch,
row-normalised Gram matrices of the flattened features. The maths and the
term."""

from keras import ops

from keras_fsp import pairing
from keras_fsp.terms.base import register_term
from keras_fsp.terms.relational import AUTO, RelationalTerm, flat_features, safe_norm


def similarity_matrix(features):
    """`G / ||G_i||`: the Gram matrix `F F^T` of the flattened `features`,
    each row divided by its L2 norm, `(batch, batch)`."""
    f = flat_features(features)
    gram = ops.matmul(f, ops.transpose(f))
    return gram / safe_norm(gram, axis=1)


def similarity_preserving_loss(teacher, student):
    """`||G_t - G_s||_F^2 / batch^2` of the two networks'
    `similarity_matrix`, one value for the batch; the maps may differ in
    shape."""
    diff = similarity_matrix(teacher) - similarity_matrix(student)
    b = ops.cast(ops.shape(diff)[0], "float32")
    return ops.sum(ops.square(diff)) / (b * b)


@register_term("sp")
class SimilarityPreservingTerm(RelationalTerm):
    """`beta * similarity_preserving_loss` between a teacher and a student
    layer, a batch-level term; the labels are the stage's `"task"` term.

    `layers="auto"` taps each network's last section output, the map before
    the pooling (`keras_fsp.pairing.section_ends`): the paper's last
    convolutional group, and RepDistiller's `feat[-2]`. Default weight:
    RepDistiller's (beta 3000).

    Args:
        layers: see `keras_fsp.terms.relational.RelationalTerm` (a pair of
            penultimate layers works too: any shape is flattened).
        beta: the weight.
        name: the term's name in stages (default `"sp"`).
    """

    def __init__(self, layers=AUTO, beta=3000.0, name="sp", **kwargs):
        super().__init__(layers, beta, name=name, **kwargs)

    def auto_layer(self, model, role):
        """The last section's output (`keras_fsp.pairing.section_ends`)."""
        return list(pairing.section_ends(model).values())[-1]

    def relation(self, teacher, student):
        return similarity_preserving_loss(teacher, student)
