"""The terms of one distiller: the built-in ones from its constructor's
arguments, the ones it is given, and registered ones its stages name,
configured against the two networks; and the check that a stage's terms
exist."""

from keras_fsp.terms.base import DistillationTerm, registered_terms, term_class
from keras_fsp.terms.fsp import FSPTerm
from keras_fsp.terms.hint import HintTerm
from keras_fsp.terms.soft_targets import SoftTargets
from keras_fsp.terms.task import TaskLoss

BUILTIN = ("fsp", "hint", "kd", "task")
# FSPTerm's defaults as the distiller's arguments give them: other values
# are the user's request, whose failure is an error.
_FSP_DEFAULTS = ("auto", None, None, "max", "auto")


def builtin_terms(fsp_pairs, student_fsp_pairs, fsp_weights, fsp_pooling, fsp_projection,
                  hint_layer, guided_layer, hint_normalize, temperature):
    """`(terms, explicit)`: the built-in terms the arguments configure, and
    the names of those the user asked for (not left at their defaults)."""
    made, explicit = {}, set()
    if fsp_pairs is not None and (isinstance(fsp_pairs, str) or len(fsp_pairs)):
        given = (fsp_pairs, student_fsp_pairs, fsp_weights, fsp_pooling, fsp_projection)
        made["fsp"] = FSPTerm(pairs=fsp_pairs, student_pairs=student_fsp_pairs,
                              pair_weights=fsp_weights, pooling=fsp_pooling,
                              projection=fsp_projection)
        if any(g is not d and g != d for g, d in zip(given, _FSP_DEFAULTS)):
            explicit.add("fsp")
    if (hint_layer is None) != (guided_layer is None):
        raise ValueError(
            "hint_layer (teacher) and guided_layer (student) go together: got "
            f"hint_layer={hint_layer!r}, guided_layer={guided_layer!r}."
        )
    if hint_layer is not None:
        made["hint"] = HintTerm(hint_layer, guided_layer, hint_normalize)
        explicit.add("hint")
    made["kd"] = SoftTargets(temperature)
    made["task"] = TaskLoss()
    return made, explicit


def make_terms(teacher, student, builtin, explicit, given_terms, stages):
    """Configures every term against the two networks.

    Args:
        builtin, explicit: what `builtin_terms` returned.
        given_terms: `DistillationTerm` instances (the distiller's `terms=`).
        stages: the stages given to the distiller; registered term types
            they name that nothing else configures are made with defaults.

    Returns:
        `(terms, unavailable)`: `{name: term}` of the configured terms, and
        `{name: why}` of built-in terms the user did not ask for that cannot
        work on these networks (e.g. automatic FSP pairs on networks that
        have none): only the stages using them fail.
    """
    made, explicit = dict(builtin), set(explicit)
    for term in given_terms:
        if not isinstance(term, DistillationTerm):
            raise ValueError(
                f"terms must be keras_fsp.terms.DistillationTerm instances; got {term!r}."
            )
        made[term.name] = term
        explicit.add(term.name)
    for stage in stages:
        for name in stage.losses:
            if name not in made and name not in BUILTIN and name in registered_terms():
                made[name] = term_class(name)()
                explicit.add(name)
    terms, unavailable = {}, {}
    for name, term in made.items():
        try:
            term.configure(teacher, student)
        except ValueError as e:
            if name in explicit:
                raise
            unavailable[name] = str(e)
            continue
        terms[name] = term
    return terms, unavailable


def check_stage_terms(stage, terms, unavailable, fsp_pairs):
    """Raises `ValueError` saying why, unless every term `stage` weights is
    among `terms`."""
    for name in stage.losses:
        if name in terms:
            continue
        if name in unavailable:
            raise ValueError(f"Stage {stage.name!r} uses the {name!r} term: {unavailable[name]}")
        if name == "fsp" and fsp_pairs is None:
            raise ValueError(
                f"Stage {stage.name!r} uses the FSP loss but this distiller has no FSP pairs "
                "(fsp_pairs=None)."
            )
        if name == "hint":
            raise ValueError(
                f"Stage {stage.name!r} uses the hint loss: create the distiller with "
                "hint_layer=... and guided_layer=...."
            )
        raise ValueError(
            f"Stage {stage.name!r} uses the unknown loss term {name!r}. This distiller's "
            f"terms are {sorted(terms)}; registered term types: "
            f"{sorted(registered_terms())}. Pass terms=[...] or register the type with "
            "keras_fsp.terms.register_term."
        )
