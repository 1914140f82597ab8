"""Optimizers of stages: a stage's own, or a fresh copy of the compiled one
with the stage's learning-rate scale and gradient clipping; loss-scaled when
training computes in float16; and learning rates scaled by a constant.
Backend-agnostic."""

import keras
from keras import ops

from keras_fsp import compat


@keras.saving.register_keras_serializable(package="keras_fsp")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule multiplied by a constant."""

    def __init__(self, schedule, scale):
        self.schedule = schedule
        self.scale = float(scale)

    def __call__(self, step):
        return self.schedule(step) * self.scale

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "scale": self.scale}

    @classmethod
    def from_config(cls, config):
        schedule = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(schedule, config["scale"])


def scale_learning_rate(optimizer, factor):
    """Multiplies `optimizer`'s learning rate (a constant or a schedule, also
    inside a `LossScaleOptimizer`) by `factor`, in place."""
    if factor == 1.0:
        return
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = compat.learning_rate(inner)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        inner.learning_rate = ScaledSchedule(rate, factor)
    else:
        inner.learning_rate = float(ops.convert_to_numpy(rate)) * factor


def clone_optimizer(optimizer, learning_rate_scale=1.0, global_clipnorm=None):
    """A fresh optimizer like `optimizer`, its learning rate (or schedule)
    scaled, with `global_clipnorm` when it clips nothing itself."""
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    scale_learning_rate(clone, learning_rate_scale)
    inner = getattr(clone, "inner_optimizer", clone)  # LossScaleOptimizer
    clips = any(getattr(inner, k, None) for k in ("clipnorm", "clipvalue", "global_clipnorm"))
    if global_clipnorm is not None and not clips:
        # Keras clips each replica's gradient before summing them: clip each
        # to its share so that the sum stays within the norm.
        inner.global_clipnorm = float(global_clipnorm) / compat.num_replicas()
    return clone


def computes_in_float16(layers):
    """Whether any of `layers` computes in float16 (then the loss needs
    scaling, as Keras' `compile` decides from the model's policy alone)."""
    return any(getattr(layer, "compute_dtype", None) == "float16" for layer in layers)


def check_not_shared(stages):
    """Refuses one optimizer instance in two stages: an optimizer is built
    for one set of variables."""
    owners = {}
    for stage in stages:
        if stage.optimizer is None:
            continue
        other = owners.setdefault(id(stage.optimizer), stage.name)
        if other != stage.name:
            raise ValueError(
                f"Stages {other!r} and {stage.name!r} share one optimizer instance; an "
                "optimizer is built for one set of variables: give each Stage its own."
            )


class StageOptimizers:
    """Makes the optimizer of each stage (its own, or a copy of the compiled
    one, `template`).

    `keras.Model.compile` wraps the compiled optimizer in a
    `LossScaleOptimizer` under `"mixed_float16"`; a stage's own optimizer
    and the per-stage copies would bypass it, so the wrapping is done here,
    for every stage. A stage's own optimizer gets the same wrapper each time,
    so that returning to the stage resumes its loss scale.
    """

    def __init__(self):
        self._wrappers = {}  # id(inner) -> (inner, wrapper)

    def for_stage(self, stage, template, loss_scaled):
        if stage.optimizer is not None:
            optimizer = stage.optimizer
        else:
            optimizer = clone_optimizer(template, stage.learning_rate_scale, stage.global_clipnorm)
        if not loss_scaled or isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return optimizer
        if stage.optimizer is None:
            return keras.optimizers.LossScaleOptimizer(optimizer, name="loss_scale_optimizer")
        key = id(optimizer)
        if key not in self._wrappers:
            wrapper = keras.optimizers.LossScaleOptimizer(optimizer, name="loss_scale_optimizer")
            self._wrappers[key] = (optimizer, wrapper)
        return self._wrappers[key][1]
