"""keras_fsp's losses as `keras.distillation.DistillationLoss` objects, so
users of Keras' own `keras.distillation.Distiller` can add FSP to it.

Keras' `Distiller` hands each distillation loss the output of *one* teacher
layer and *one* student layer; an FSP matrix needs two maps of each network.
`fsp_distillation_losses` therefore returns, per pair, a capture loss on the
pair's first layer (it contributes 0 and keeps the maps) followed by the FSP
loss on its second layer, which reads the captured maps. Keras applies the
losses in list order within one step, so keep them together and in order.

Example:

```python
distiller = keras.distillation.Distiller(
    teacher, student,
    distillation_losses=fsp_distillation_losses(
        [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]
    ) + [SoftTargetDistillation(temperature=4.0)],
    student_loss_weight=0.5,
)
```

Note that `keras.distillation.Distiller` runs the student a second time to
tap its features, and has neither stages nor a hint regressor:
`keras_fsp.FSPDistiller` runs each network once and has both.

Every loss here is registered serializable (package `"keras_fsp"`), so a
`Distiller` using them saves and loads with plain Keras.
"""

import itertools

import keras
from keras import ops

from keras_fsp.terms.fsp import fsp_distance, fsp_matrix
from keras_fsp.terms.hint import hint_distance
from keras_fsp.terms.soft_targets import check_temperature, soft_target_loss

serializable = keras.saving.register_keras_serializable(package="keras_fsp")


class DistillationLoss(keras.distillation.DistillationLoss):
    """Keras' `DistillationLoss`, restorable from its `get_config`."""

    @classmethod
    def from_config(cls, config):
        return cls(**config)

# Captures by link number: a deserialized pair loss finds the capture that
# was deserialized just before it (Keras restores the losses in list order).
_CAPTURES = {}
_LINKS = itertools.count()


@serializable
class FSPCapture(DistillationLoss):
    """Keeps the first maps of an FSP pair for the `FSPPairDistillation`
    that follows it; contributes a zero loss."""

    def __init__(self, teacher_layer_name, student_layer_name, link=None):
        self.teacher_layer_name = teacher_layer_name
        self.student_layer_name = student_layer_name
        self.link = next(_LINKS) if link is None else link
        _CAPTURES[self.link] = self
        self.teacher_features = self.student_features = None

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        self.teacher_features, self.student_features = teacher_outputs, student_outputs
        return ops.convert_to_tensor(0.0)

    def get_config(self):
        return {
            "teacher_layer_name": self.teacher_layer_name,
            "student_layer_name": self.student_layer_name,
            "link": self.link,
        }


@serializable
class FSPPairDistillation(DistillationLoss):
    """`||G^T - G^S||_F^2` (batch mean) for one FSP pair; its first maps come
    from the `FSPCapture` made with it by `fsp_distillation_losses`."""

    def __init__(self, capture, teacher_layer_name, student_layer_name, pooling="max"):
        self.capture = capture if isinstance(capture, FSPCapture) else _CAPTURES[capture]
        self.teacher_layer_name = teacher_layer_name
        self.student_layer_name = student_layer_name
        self.pooling = pooling

    def get_config(self):
        return {
            "capture": self.capture.link,
            "teacher_layer_name": self.teacher_layer_name,
            "student_layer_name": self.student_layer_name,
            "pooling": self.pooling,
        }

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        if self.capture.teacher_features is None:
            raise ValueError(
                "FSPPairDistillation found no captured first maps: keep the "
                "losses of fsp_distillation_losses together and in order."
            )
        g_t = fsp_matrix(ops.stop_gradient(self.capture.teacher_features),
                         ops.stop_gradient(teacher_outputs), self.pooling)
        g_s = fsp_matrix(self.capture.student_features, student_outputs, self.pooling)
        return ops.mean(fsp_distance([g_t], [g_s]))

    def validate_outputs(self, teacher_outputs, student_outputs):
        if teacher_outputs.shape[-1] != student_outputs.shape[-1]:
            raise ValueError(
                f"FSP pair ending at teacher layer {self.teacher_layer_name!r} "
                f"{tuple(teacher_outputs.shape)} and student layer "
                f"{self.student_layer_name!r} {tuple(student_outputs.shape)}: "
                "channel counts must be equal."
            )


def fsp_distillation_losses(pairs, student_pairs=None, pooling="max"):
    """FSP for `keras.distillation.Distiller`: a list of losses, two per pair.

    Args:
        pairs: teacher layer pairs `[(first, second), ...]`.
        student_pairs: the student's pairs if its names differ.
        pooling: `"max"` or `"avg"`.

    Returns:
        a list of `DistillationLoss` objects (give them equal weights; the
        capture losses contribute 0).
    """
    student_pairs = pairs if student_pairs is None else student_pairs
    if len(student_pairs) != len(pairs):
        raise ValueError(
            f"{len(pairs)} teacher pairs but {len(student_pairs)} student pairs."
        )
    losses = []
    for (t_a, t_b), (s_a, s_b) in zip(pairs, student_pairs):
        capture = FSPCapture(t_a, s_a)
        losses += [capture, FSPPairDistillation(capture, t_b, s_b, pooling)]
    return losses


@serializable
class SoftTargetDistillation(DistillationLoss):
    """Hinton soft targets with the `T^2` factor
    (`keras_fsp.terms.soft_target_loss`) on the final outputs."""

    def __init__(self, temperature=4.0):
        self.temperature = check_temperature(temperature)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return ops.mean(soft_target_loss(ops.stop_gradient(teacher_outputs), student_outputs,
                                         self.temperature))

    def get_config(self):
        return {"temperature": self.temperature}


@serializable
class HintDistillation(DistillationLoss):
    """FitNets hint between equally shaped maps (Keras' `Distiller` has no
    place for a trainable regressor: use `FSPDistiller` when shapes differ)."""

    def __init__(self, teacher_layer_name, student_layer_name, normalize=False):
        self.teacher_layer_name = teacher_layer_name
        self.student_layer_name = student_layer_name
        self.normalize = bool(normalize)

    def validate_outputs(self, teacher_outputs, student_outputs):
        if tuple(teacher_outputs.shape[1:]) != tuple(student_outputs.shape[1:]):
            raise ValueError(
                f"Hint layer {self.teacher_layer_name!r} "
                f"{tuple(teacher_outputs.shape)} and guided layer "
                f"{self.student_layer_name!r} {tuple(student_outputs.shape)} "
                "differ in shape: keras_fsp.FSPDistiller with "
                "terms=[keras_fsp.terms.HintTerm(...)] adds the regressor FitNets uses."
            )

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return ops.mean(hint_distance(ops.stop_gradient(teacher_outputs), student_outputs,
                                      self.normalize))

    def get_config(self):
        return {
            "teacher_layer_name": self.teacher_layer_name,
            "student_layer_name": self.student_layer_name,
            "normalize": self.normalize,
        }
