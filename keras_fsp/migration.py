"""What keras_fsp 0.2's `FSPDistiller` keywords became: each one a term's or
a stage's setting now, and a one-line error naming the replacement."""

REMOVED_ARGUMENTS = {
    "fsp_pairs": "terms=[keras_fsp.terms.FSPTerm(pairs=...)]",
    "student_fsp_pairs": "terms=[keras_fsp.terms.FSPTerm(pairs=..., student_pairs=...)]",
    "fsp_weights": "terms=[keras_fsp.terms.FSPTerm(pair_weights=...)]",
    "fsp_pooling": "terms=[keras_fsp.terms.FSPTerm(pooling=...)]",
    "fsp_projection": "terms=[keras_fsp.terms.FSPTerm(projection=...)]",
    "hint_layer": "terms=[keras_fsp.terms.HintTerm(hint_layer, guided_layer)]",
    "guided_layer": "terms=[keras_fsp.terms.HintTerm(hint_layer, guided_layer)]",
    "hint_normalize": "terms=[keras_fsp.terms.HintTerm(..., normalize=True)]",
    "temperature": "terms=[keras_fsp.terms.SoftTargetTerm(temperature=...)]",
    "kd_weight": "stages={'kd': keras_fsp.Stage('kd', {'kd': w, 'task': 1 - w})}",
}


def refuse_removed_arguments(kwargs):
    """Raises `TypeError` for the first removed keyword in `kwargs`."""
    for name in kwargs:
        if name in REMOVED_ARGUMENTS:
            raise TypeError(f"FSPDistiller({name}=...) was removed in keras_fsp 0.3: pass "
                            f"{REMOVED_ARGUMENTS[name]}.")
