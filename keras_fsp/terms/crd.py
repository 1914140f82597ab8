"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020,
"Contrastive Representation Distillation"): each network's penultimate
features are mapped linearly to a small embedding and L2-normalised; the
student's embedding of an example must pick the teacher's embedding of the
same example out of many others' (and the teacher's the student's). The
maths, the queue of negatives and the term.

Negatives come from a FIFO queue of the most recent embeddings of each
network (MoCo's, He et al., CVPR 2020), not from RepDistiller's memory of one
embedding per training example: that memory is indexed by the example's
position in the dataset, which keras_fsp's pipeline (arrays, streams, teacher
caches, scanned epochs) does not hand to a term. A queue needs no index, and
its entries are at most `queue_size / batch` steps old (RepDistiller's are
up to an epoch old). The objective is the softmax (InfoNCE) form, a
cross-entropy picking the positive among `1 + negatives` (CMC's
`NCESoftmaxLoss` by the same authors, HobbitLong/CMC `NCE/NCECriterion.py`;
RepDistiller's `crd/criterion.py` has only the NCE form, whose noise
constant assumes uniformly drawn dataset indices).
"""

import math

import keras
from keras import ops

from keras_fsp import taps
from keras_fsp.terms.base import register_term
from keras_fsp.terms.relational import AUTO, RelationalTerm, safe_norm


def normalized_embedding(layer, features):
    """`layer(features)` (a linear map of `(batch, features)`) divided by
    its L2 norm, `(batch, dim)`."""
    e = ops.cast(layer(features), "float32")
    return e / safe_norm(e, axis=1)


def info_nce(anchors, positives, negatives, valid, temperature):
    """`-log softmax` of each anchor's positive among its positive and the
    valid negatives, per example, `(batch,)`.

    Args:
        anchors, positives: `(batch, dim)`, row `i` of each the same example.
        negatives: `(slots, dim)`, shared by every anchor.
        valid: `(slots,)` booleans, the negatives that count (a queue not
            yet full has empty slots).
        temperature: divides the dot products.
    """
    positive = ops.sum(anchors * positives, axis=1) / temperature
    negative = ops.matmul(anchors, ops.transpose(negatives)) / temperature
    negative = ops.where(valid[None, :], negative, float("-inf"))
    logits = ops.concatenate([positive[:, None], negative], axis=1)
    return ops.logsumexp(logits, axis=1) - positive


def crd_loss(teacher, student, teacher_queue, student_queue, valid, temperature=0.07):
    """CRD's symmetric contrastive loss, per example, `(batch,)`: the student's
    embedding as anchor against the teacher's (its positive) and the
    teacher queue's negatives, plus the teacher's against the student's and
    the student queue's. Embeddings `(batch, dim)` and queues `(slots, dim)`
    are L2-normalised; `valid` `(slots,)` marks the filled slots of both
    queues."""
    return (info_nce(student, teacher, teacher_queue, valid, temperature)
            + info_nce(teacher, student, student_queue, valid, temperature))


def enqueue(queue, pointer, rows):
    """`queue` `(slots, dim)` with `rows` `(batch, dim)` written at slots
    `pointer, pointer + 1, ...` modulo `slots` (first in, first out: the
    oldest entries are overwritten, wrapping around the end). Of a batch
    larger than the queue only its last `slots` rows stay, where they would
    have ended up one by one."""
    slots, batch = queue.shape[0], ops.shape(rows)[0]
    rows = rows[-slots:]  # (no slot written twice in one scatter)
    kept = ops.shape(rows)[0]
    index = ops.mod(pointer + (batch - kept) + ops.arange(kept, dtype="int32"), slots)
    return ops.scatter_update(queue, index[:, None], ops.cast(rows, queue.dtype))


@register_term("crd")
class CRDTerm(RelationalTerm):
    """`beta * crd_loss` between a teacher and a student layer, by default
    their penultimate features, one value per example; the labels are the
    stage's `"task"` term.

    The term owns two linear embeddings to `embedding_dim` (one per network,
    both trained by this term; the teacher's features stay frozen) and two
    queues of the latest `queue_size` embeddings of each network, with the
    slot to write next (`queue_pointer`) and how many are filled
    (`queue_filled`): non-trainable variables, so they are saved with the
    distiller's weights and checkpoints and resume as they were. After each
    training step's loss the batch's embeddings enter the queues; until
    they are full only their filled part counts (the first step has no
    negatives: its value is 0). The teacher target is the tapped features
    themselves, so a teacher cache holds them and the embedding still
    trains.

    Under `tf.distribute` each replica keeps its own queues (of its share of
    the batch, sync-on-read variables); a checkpoint holds the first
    replica's, which every replica gets back. On JAX the arrays are global:
    one queue of the global batch.

    Defaults: the paper's and RepDistiller's (`--feat_dim 128 --nce_t 0.07
    --nce_k 16384`, `-b 0.8`). RepDistiller's memory momentum (0.5) has no
    counterpart: a queue entry is written once.

    Args:
        layers: see `keras_fsp.terms.relational.RelationalTerm`.
        beta: the term's weight (RepDistiller's `-b`).
        embedding_dim: the embeddings' width.
        temperature: `T > 0` of the softmax.
        queue_size: negatives per anchor once the queues are full (a
            batch larger than that leaves its last `queue_size`).
        name: the term's name in stages (default `"crd"`).
    """

    def __init__(self, layers=AUTO, beta=0.8, embedding_dim=128, temperature=0.07,
                 queue_size=16384, name="crd", **kwargs):
        super().__init__(layers, beta, name=name, **kwargs)
        self.embedding_dim, self.queue_size = int(embedding_dim), int(queue_size)
        self.temperature = float(temperature)
        if self.embedding_dim < 1 or self.queue_size < 1 or not self.temperature > 0:
            raise ValueError(
                "CRD needs embedding_dim >= 1, queue_size >= 1 and temperature > 0; got "
                f"{embedding_dim!r}, {queue_size!r} and {temperature!r}."
            )
        shape = (self.queue_size, self.embedding_dim)
        self.student_queue = self._state("student_queue", shape, "float32")
        self.teacher_queue = self._state("teacher_queue", shape, "float32")
        self.queue_pointer = self._state("queue_pointer", (), "int32")
        self.queue_filled = self._state("queue_filled", (), "int32")
        self.student_embedding = self.teacher_embedding = None

    def _state(self, name, shape, dtype):
        # Sync-on-read: under tf.distribute each replica updates its own copy
        # inside the step (an on-write variable would need them to agree);
        # reading or saving takes the first replica's, restoring sets all.
        with keras.name_scope(self.name):
            return keras.Variable(initializer="zeros", shape=shape, dtype=dtype, trainable=False,
                                  synchronization="on_read", aggregation="only_first_replica",
                                  name=name)

    def configure(self, teacher, student):
        """Resolves the layers (`RelationalTerm`) and builds the two
        embeddings on their flattened widths."""
        super().configure(teacher, student)
        for model, layer, role in ((teacher, self.layers[0], "teacher"),
                                   (student, self.layers[1], "student")):
            shape = taps.output_shape(model, layer, role)[1:]
            if None in shape:
                raise ValueError(
                    f"The {self.name!r} term embeds the {role}'s layer {layer!r} linearly, but its "
                    f"shape {shape} is not fixed: choose a pooled layer (layers=...)."
                )
            # float32: dot products divided by 0.07 lose too much in float16.
            embedding = keras.layers.Dense(self.embedding_dim, dtype="float32",
                                           name=f"{self.name}_{role}_embedding")
            embedding.build((None, math.prod(shape)))
            setattr(self, f"{role}_embedding", embedding)

    def relation(self, teacher, student):
        t = normalized_embedding(self.teacher_embedding, teacher)
        s = normalized_embedding(self.student_embedding, student)
        valid = ops.arange(self.queue_size, dtype="int32") < self.queue_filled
        value = crd_loss(t, s, self.teacher_queue, self.student_queue, valid, self.temperature)
        self._remember(ops.stop_gradient(t), ops.stop_gradient(s))
        return value

    def _remember(self, teacher, student):
        """The batch's embeddings into the queues, after the loss read them
        (on JAX the assignments are the step's non-trainable updates, which
        Keras' trainer returns from `compute_loss`)."""
        batch = ops.shape(student)[0]
        pointer = self.queue_pointer.value
        self.teacher_queue.assign(enqueue(self.teacher_queue, pointer, teacher))
        self.student_queue.assign(enqueue(self.student_queue, pointer, student))
        self.queue_pointer.assign(ops.mod(pointer + batch, self.queue_size))
        self.queue_filled.assign(ops.minimum(self.queue_filled + batch, self.queue_size))

    def describe(self):
        return (f"{super().describe()}, embeddings of {self.embedding_dim}, "
                f"{self.queue_size} negatives, T {self.temperature}")

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim,
                "temperature": self.temperature, "queue_size": self.queue_size}
