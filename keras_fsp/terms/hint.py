"""The FitNets hint (Romero et al., ICLR 2015): its maths and its term."""

import keras
from keras import ops

from keras_fsp import taps
from keras_fsp.terms.base import DistillationTerm, register_term


def hint_distance(hint, guided, normalize=False):
    """`1/2 ||hint - guided||^2` per example.

    Args:
        hint: the teacher's map, `(batch, ...)`.
        guided: the (regressed) student map, same shape.
        normalize: `False` (the paper): the sum of squares over the whole
            map; `True`: their mean, which keeps the value independent of
            the map's size.

    Returns:
        float32 `(batch,)`.
    """
    sq = ops.square(ops.cast(hint, "float32") - ops.cast(guided, "float32"))
    axes = tuple(range(1, len(sq.shape)))
    return 0.5 * (ops.mean(sq, axis=axes) if normalize else ops.sum(sq, axis=axes))


@register_term("hint")
class HintTerm(DistillationTerm):
    """`1/2 ||hint(x) - regressor(guided(x))||^2` between a teacher layer (the
    hint) and a student layer (the guided layer).

    When the two maps differ in shape, the term owns a regressor: a 3x3
    convolution (strided when the guided map is larger by an integer factor)
    to the hint's channels, trained with the term.

    Args:
        hint_layer: the teacher layer giving the hint.
        guided_layer: the student layer it guides (default: the same name).
        normalize: see `hint_distance`.
        name: the term's name in stages (default `"hint"`).
    """

    def __init__(self, hint_layer=None, guided_layer=None, normalize=False, name="hint", **kwargs):
        super().__init__(name=name, **kwargs)
        if hint_layer is None:
            raise ValueError(
                "The hint term needs its layers: give the distiller "
                "terms=[keras_fsp.terms.HintTerm(hint_layer, guided_layer)]."
            )
        self.hint_layer = hint_layer
        self.guided_layer = guided_layer or hint_layer
        self.normalize = bool(normalize)
        self.teacher_taps = (self.hint_layer,)
        self.student_taps = (self.guided_layer,)
        self.regressor = None

    def configure(self, teacher, student):
        hint = taps.output_shape(teacher, self.hint_layer, "teacher")
        guided = taps.output_shape(student, self.guided_layer, "student")
        if hint == guided:
            return
        if len(hint) != 4 or len(guided) != 4:
            raise ValueError(
                f"Hint layer {self.hint_layer!r} {hint} and guided layer {self.guided_layer!r} "
                f"{guided} differ in shape; the regressor maps 4-D feature maps only."
            )
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

    def compute(self, student, teacher, y_true):
        guided = student[self.guided_layer]
        if self.regressor is not None:
            guided = self.regressor(guided)
        return hint_distance(teacher[self.hint_layer], guided, self.normalize)

    def get_config(self):
        return {
            **super().get_config(),
            "hint_layer": self.hint_layer,
            "guided_layer": self.guided_layer,
            "normalize": self.normalize,
        }
