"""The FitNets hint (Romero et al., ICLR 2015): its maths and its term."""

import keras
from keras import ops

from keras_fsp import masks, pairing, positions, taps
from keras_fsp.terms.base import DistillationTerm, announce, register_term


def hint_distance(hint, guided, normalize=False, mask=None):
    """`1/2 ||hint - guided||^2` per example.

    Args:
        hint: the teacher's map, `(batch, ...)`.
        guided: the (regressed) student map, same shape.
        normalize: `False` (the paper): the sum of squares over the whole
            map; `True`: their mean, which keeps the value independent of
            the map's size.
        mask: `None`, or a float32 padding mask `(batch, steps)` at the
            sequences' positions (`keras_fsp.masks`): the sum (the mean)
            runs over the valid positions only, so what padding holds
            never counts.

    Returns:
        float32 `(batch,)`.
    """
    sq = ops.square(ops.cast(hint, "float32") - ops.cast(guided, "float32"))
    axes = tuple(range(1, len(sq.shape)))
    if mask is None:
        return 0.5 * (ops.mean(sq, axis=axes) if normalize else ops.sum(sq, axis=axes))
    total = ops.sum(sq * ops.expand_dims(mask, -1), axis=axes)
    return 0.5 * (total / (masks.valid_count(mask) * sq.shape[-1]) if normalize else total)


def hint_key(layer, size):
    """Teacher-target key of the hint `layer` pooled to the positions `size`."""
    return f"/hint/{'x'.join(str(n) for n in size)}/{layer}"


@register_term("hint")
class HintTerm(DistillationTerm):
    """`1/2 ||hint(x) - regressor(guided(x))||^2` between a teacher layer (the
    hint) and a student layer (the guided layer).

    When the two differ in shape, the term owns a regressor, trained with
    it. Feature maps `(batch, h, w, c)`: a 3x3 convolution (strided when the
    guided map is larger by an integer factor) to the hint's channels.
    Sequences `(batch, steps, c)` (any other rank with positions): the
    longer of the two is averaged over groups of consecutive positions down
    to the shorter's length (`keras_fsp.positions`), and a Dense layer maps
    the guided features to the hint's channels position by position.

    Args:
        hint_layer: the teacher layer giving the hint; `None` (default):
            chosen with the guided layer, in the middle of the networks as
            FitNets does: the middle pair of
            `keras_fsp.pairing.matched_section_ends` (the earlier of the two
            middle ones of an even count), logged once per process.
        guided_layer: the student layer it guides (default: the same name).
        normalize: see `hint_distance`.
        name: the term's name in stages (default `"hint"`).
    """

    def __init__(self, hint_layer=None, guided_layer=None, normalize=False, name="hint", **kwargs):
        super().__init__(name=name, **kwargs)
        self.hint_layer = hint_layer
        self.guided_layer = guided_layer or hint_layer
        self.normalize = bool(normalize)
        self.regressor = None
        self._sizes = (None, None)  # the positions to pool (hint, guided) to; None: none

    def configure(self, teacher, student):
        auto = self.hint_layer is None
        if auto:
            ends = pairing.matched_section_ends(teacher, student)
            self.hint_layer, self.guided_layer = ends[(len(ends) - 1) // 2]
        mask = masks.mask_taps(teacher, student, (self.hint_layer,), (self.guided_layer,),
                               "the hint term")
        self.teacher_taps = (self.hint_layer, *mask)
        self.student_taps = (self.guided_layer, *mask)
        hint = taps.output_shape(teacher, self.hint_layer, "teacher")
        guided = taps.output_shape(student, self.guided_layer, "student")
        if hint == guided:
            pass
        elif len(hint) == 4 and len(guided) == 4:
            self._map_regressor(hint, guided)
        else:
            self._sequence_regressor(hint, guided)
        if auto:
            announce(f"keras_fsp: {teacher.name} -> {student.name}, {self.describe()}")

    def _map_regressor(self, hint, guided):
        if guided[1] % hint[1] or guided[2] % hint[2]:
            raise ValueError(
                f"The guided layer {self.guided_layer!r} {guided} must be at least as large as "
                f"the hint {self.hint_layer!r} {hint}, by an integer factor, for a strided "
                "regressor to map it."
            )
        strides = (guided[1] // hint[1], guided[2] // hint[2])
        self.regressor = keras.layers.Conv2D(
            hint[-1], 3, strides=strides, padding="same", kernel_initializer="he_normal",
            name=f"{self.name}_regressor",
        )
        self.regressor.build(guided)

    def _sequence_regressor(self, hint, guided):
        try:
            size = positions.pooled_size(hint, guided, "a hint")
        except ValueError as e:
            raise ValueError(
                f"Hint layer {self.hint_layer!r} {hint} and guided layer {self.guided_layer!r} "
                f"{guided}: {e} Or name other layers: HintTerm(hint_layer, guided_layer)."
            ) from None
        self._sizes = tuple(None if positions.positions_of(shape) == size else size
                            for shape in (hint, guided))
        if hint[-1] != guided[-1]:
            self.regressor = keras.layers.Dense(hint[-1], name=f"{self.name}_regressor")
            self.regressor.build((guided[0], *size, guided[-1]))

    def describe(self):
        regressor = ""
        if self.regressor is not None:
            regressor = f", regressor {type(self.regressor).__name__} to {self.regressor.kernel.shape[-1]} channels"
        return f"{self.name}: hint {self.hint_layer!r} -> guided {self.guided_layer!r}{regressor}"

    def _target_key(self):
        size = self._sizes[0]
        return self.hint_layer if size is None else hint_key(self.hint_layer, size)

    def teacher_targets(self, features):
        hint, size = features[self.hint_layer], self._sizes[0]
        if size is not None:
            mask = masks.at_positions(features.get(masks.PADDING_MASK), hint.shape)
            hint = positions.pool(hint, size, "avg", mask)
        return {self._target_key(): hint}

    def target_shapes(self, teacher):
        shape = taps.output_shape(teacher, self.hint_layer, "teacher")[1:]
        size = self._sizes[0]
        return {self._target_key(): shape if size is None else (*size, shape[-1])}

    def compute(self, student, teacher, y_true):
        guided = student[self.guided_layer]
        # The batch's padding mask (the student's; the teacher saw the same
        # batch) at the guided features' positions, then at the compared ones.
        mask = masks.at_positions(student.get(masks.PADDING_MASK), guided.shape)
        if self._sizes[1] is not None:
            guided = positions.pool(guided, self._sizes[1], "avg", mask)
            mask = None if mask is None else positions.pool_mask(mask, self._sizes[1])
        if self.regressor is not None:
            guided = self.regressor(guided)
        return hint_distance(teacher[self._target_key()], guided, self.normalize, mask)

    def get_config(self):
        return {
            **super().get_config(),
            "hint_layer": self.hint_layer,
            "guided_layer": self.guided_layer,
            "normalize": self.normalize,
        }
