"""Distillation terms: each one summand of a stage's loss, registered by name.

One module per method, holding its maths and its term: `"fsp"` (`FSPTerm`,
`fsp_matrix`), `"hint"` (`HintTerm`), `"kd"` (`SoftTargetTerm`), `"task"`
(`TaskTerm`), `"attention"` (`AttentionTerm`), `"dkd"` (`DecoupledKDTerm`).
Write your own by subclassing `DistillationTerm` and registering it with
`register_term` (see `keras_fsp.terms.base`). Also `"ls_kd"`
(`StandardizedKDTerm`, KD on z-scored logits) and `"dist"` (`DISTTerm`,
correlation relations over classes and over the batch). Relational terms
on features, batch-level (`keras_fsp.terms.relational`): `"rkd"` (`RKDTerm`,
distances and angles), `"pkt"` (`PKTTerm`, cosine-similarity probabilities)
and `"sp"` (`SimilarityPreservingTerm`, normalised Gram matrices); `"crd"`
(`CRDTerm`, contrastive representation distillation: learned embeddings of
the penultimate features, queues of negatives, one value per example);
`"reviewkd"` (`ReviewKDTerm`, knowledge review: the student's levels fused
deepest first by learned attention-based fusion modules, each compared with
the teacher's by the hierarchical context loss).
"""

from keras_fsp.terms.attention import AttentionTerm, attention_map
from keras_fsp.terms.base import (
    LOGITS,
    DistillationTerm,
    batch_mean,
    register_term,
    registered_terms,
    term_class,
)
from keras_fsp.terms.crd import CRDTerm, crd_loss
from keras_fsp.terms.dist import DISTTerm, dist_loss
from keras_fsp.terms.dkd import DecoupledKDTerm, decoupled_kd
from keras_fsp.terms.fsp import FSPTerm, fsp_distance, fsp_key, fsp_matrix
from keras_fsp.terms.hint import HintTerm, hint_distance
from keras_fsp.terms.logit_standardization import StandardizedKDTerm, standardize, standardized_kd
from keras_fsp.terms.pkt import PKTTerm, pkt_loss
from keras_fsp.terms.relational import RelationalTerm
from keras_fsp.terms.review import ReviewKDTerm, hierarchical_context_loss
from keras_fsp.terms.rkd import RKDTerm, rkd_loss
from keras_fsp.terms.similarity import SimilarityPreservingTerm, similarity_preserving_loss
from keras_fsp.terms.soft_targets import SoftTargetTerm, soft_target_loss
from keras_fsp.terms.task import TaskTerm

__all__ = [
    "LOGITS",
    "AttentionTerm",
    "CRDTerm",
    "DISTTerm",
    "DecoupledKDTerm",
    "DistillationTerm",
    "FSPTerm",
    "HintTerm",
    "PKTTerm",
    "RKDTerm",
    "RelationalTerm",
    "ReviewKDTerm",
    "SimilarityPreservingTerm",
    "SoftTargetTerm",
    "StandardizedKDTerm",
    "TaskTerm",
    "attention_map",
    "batch_mean",
    "crd_loss",
    "decoupled_kd",
    "dist_loss",
    "fsp_distance",
    "fsp_key",
    "fsp_matrix",
    "hierarchical_context_loss",
    "hint_distance",
    "pkt_loss",
    "register_term",
    "registered_terms",
    "rkd_loss",
    "similarity_preserving_loss",
    "soft_target_loss",
    "standardize",
    "standardized_kd",
    "term_class",
]
