"""Distillation terms: each one summand of a stage's loss, registered by name.

Built in: `"fsp"` (`FSPTerm`), `"hint"` (`HintTerm`), `"kd"`
(`SoftTargets`), `"task"` (`TaskLoss`), `"attention"` (`AttentionTransfer`),
`"dkd"` (`DecoupledKD`). Write your own by subclassing `DistillationTerm` and
registering it with `register_term` (see `keras_fsp.terms.base`).
"""

from keras_fsp.terms.attention import AttentionTransfer, attention_map
from keras_fsp.terms.base import (
    LOGITS,
    DistillationTerm,
    register_term,
    registered_terms,
    tap_key,
    term_class,
)
from keras_fsp.terms.dkd import DecoupledKD, decoupled_kd
from keras_fsp.terms.fsp import FSPTerm, fsp_key
from keras_fsp.terms.hint import HintTerm
from keras_fsp.terms.soft_targets import SoftTargets
from keras_fsp.terms.task import TaskLoss

__all__ = [
    "LOGITS",
    "AttentionTransfer",
    "DecoupledKD",
    "DistillationTerm",
    "FSPTerm",
    "HintTerm",
    "SoftTargets",
    "TaskLoss",
    "attention_map",
    "decoupled_kd",
    "fsp_key",
    "register_term",
    "registered_terms",
    "tap_key",
    "term_class",
]
