"""The padding mask of token features: which positions of a batch's
sequences are tokens and which are padding, so that the feature terms
compare tokens only (what a padded position holds is not a feature the
student should learn, and a batch pads each sequence differently).

A network has one when it takes an input named `"padding_mask"`
(keras-hub's text models: `(batch, steps)`, 1 or True at a token, 0 at
padding). A term over sequence features reads it as one more tap,
`PADDING_MASK` (`keras_fsp.taps.input_key`), declared by `mask_taps` in
its `configure`, so the distiller unions and runs taps as ever and never
needs to know that a term masks. Teacher targets are computed with the
teacher's mask; a term's `compute` reads the student's (both networks see
the same batch), so a teacher cache stores targets already masked and
keeps working.

Where features have fewer positions than the mask (a strided Conv1D), or
a term pools positions in groups, the mask is pooled with them: a group
counts if any of its tokens is valid, and its features are pooled over
its valid tokens only (`keras_fsp.positions.pool`).
"""

from keras import ops

from keras_fsp import positions, taps

MASK_INPUT = "padding_mask"
PADDING_MASK = taps.input_key(MASK_INPUT)


def has_mask(model):
    """Whether functional `model` takes an input named `MASK_INPUT`."""
    return taps.is_functional(model) and any(t.name == MASK_INPUT for t in taps.graph(model).inputs)


def mask_taps(teacher, student, teacher_layers, student_layers, what):
    """`(PADDING_MASK,)` when both networks take a padding mask, else `()`:
    what a term over the tapped layers adds to its taps of each network.

    Raises:
        ValueError: when only one of the networks takes one, or when a
            tapped layer's positions do not divide the mask's length.
    """
    t, s = has_mask(teacher), has_mask(student)
    if t != s:
        has, lacks = ("teacher", "student") if t else ("student", "teacher")
        raise ValueError(
            f"The {has} takes a {MASK_INPUT!r} input and the {lacks} none: {what} keeps padded "
            f"positions out with the mask of both networks. Give both an input named "
            f"{MASK_INPUT!r}, or neither."
        )
    if not t:
        return ()
    for model, names, role in ((teacher, teacher_layers, "teacher"), (student, student_layers, "student")):
        length = taps.output_shape(model, PADDING_MASK, role)[1]
        for name in names:
            shape = taps.output_shape(model, name, role)
            counts = positions.positions_of(shape)
            if counts is None or len(counts) != 1 or length is None or length % counts[0]:
                raise ValueError(
                    f"{what[0].upper()}{what[1:]} masks padded tokens, but the {role}'s layer "
                    f"{name!r} gives {shape}, not sequences (batch, steps, channels) whose steps "
                    f"divide the padding mask's {length}. Tap layers over the tokens (a class "
                    "token added in front changes their count)."
                )
    return (PADDING_MASK,)


def at_positions(mask, shape):
    """The float32 padding mask `(batch, steps)` of features of `shape`
    `(batch, steps, channels)`: the mask itself, or pooled in groups where
    the features have fewer steps (`positions.pool_mask`). `None` stays
    `None` (no mask: every position counts)."""
    if mask is None:
        return None
    return positions.pool_mask(ops.cast(mask, "float32"), tuple(shape[1:-1]))


def valid_count(mask):
    """The number of valid positions of each example of a float32 `mask`,
    at least 1 (an all-padding example gives 0, not NaN), shape `(batch,)`."""
    return ops.maximum(ops.sum(mask, axis=tuple(range(1, len(mask.shape)))), 1.0)
