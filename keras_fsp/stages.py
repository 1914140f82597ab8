"""Training stages, declared as data.

A stage says which loss terms are active with which weights, which student
variables train, and with which optimizer. The papers train in stages (FSP:
FSP loss first, then the task; FitNets: hint first, then KD).
"""

import dataclasses
import math
from typing import Callable, Mapping, Optional, Sequence, Union

import keras

from keras_fsp import taps

UP_TO_TAPS = "up_to_taps"
#: How the built-in "fsp" and "hint" stages adapt a copy of the compiled
#: optimizer: 1/100 of its learning rate (the FSP paper's stage-1 rate, 1e-3,
#: against its task rate, 0.1) and gradients clipped to a global norm of 10.
#: Their losses are sums of squared differences in the thousands to 1e5 at the
#: start, whose gradients make a task's learning rate diverge (RESULTS.md).
FEATURE_STAGE_LR_SCALE = 0.01
FEATURE_STAGE_CLIPNORM = 10.0


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage of an `FSPDistiller`.

    Args:
        name: the stage's name, shown in logs.
        losses: `{term name: weight}`: the distiller's terms (built in:
            `"fsp"`, `"hint"`, `"kd"`, `"task"`, `"attention"`, `"dkd"`, or
            any registered or given term) and their weights, all `>= 0`.
            Only these terms are computed; the teacher runs only if one of
            them uses it. Weights can be changed during training with
            `keras_fsp.callbacks.LossWeightSchedule`.
        trainable: which student layers train. `None`: all of them;
            `"up_to_taps"`: the layers that the stage's tapped student maps
            depend on (FitNets stage 1 trains the student up to the guided
            layer); a sequence of layer names; or a callable
            `layer -> bool`. A term's own layers (hint regressor, FSP
            projections) train while the term is active.
        optimizer: the stage's optimizer. `None`: a fresh copy of the
            optimizer given to `compile` (its step count and slots restart at
            each stage, as the papers' per-stage learning-rate schedules do).
        regularization: whether the student's regularization losses (weight
            decay) are added.
        learning_rate_scale: multiplies the learning rate of the stage's
            copy of the compiled optimizer; ignored for a stage's own
            `optimizer`.
        global_clipnorm: clip the gradients' global norm to this value when
            the stage trains with a copy of the compiled optimizer (one with
            no clipping of its own); ignored for a stage's own `optimizer`.
            Under `tf.distribute`, Keras clips each replica's gradient before
            summing them: the distiller then clips each to
            `global_clipnorm / replicas`, so their sum stays within it.

    Example:

    >>> fsp_then_kd = Stage("fsp+kd", losses={"fsp": 1e-2, "kd": 1.0})
    >>> fsp_then_kd.terms
    ('fsp', 'kd')
    """

    name: str
    losses: Mapping[str, float]
    trainable: Union[None, str, Sequence[str], Callable] = None
    optimizer: Optional[keras.optimizers.Optimizer] = None
    regularization: bool = True
    learning_rate_scale: float = 1.0
    global_clipnorm: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A stage's name must be a non-empty string; got {self.name!r}.")
        if not isinstance(self.losses, Mapping) or not self.losses:
            raise ValueError(
                f"Stage {self.name!r}: losses must be a non-empty dict {{term: weight}}, "
                f"e.g. {{'kd': 0.9, 'task': 0.1}}; got {self.losses!r}."
            )
        losses = {}
        for term, weight in self.losses.items():
            if not isinstance(term, str):
                raise ValueError(f"Stage {self.name!r}: term names are strings; got {term!r}.")
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ValueError(
                    f"Stage {self.name!r}: the weight of {term!r} must be a number; got {weight!r}."
                ) from None
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(
                    f"Stage {self.name!r}: the weight of {term!r} must be finite and >= 0; "
                    f"got {weight}."
                )
            losses[term] = weight
        object.__setattr__(self, "losses", losses)
        if isinstance(self.trainable, str) and self.trainable != UP_TO_TAPS:
            raise ValueError(
                f"Stage {self.name!r}: trainable={self.trainable!r}; use None "
                f"(the whole student), {UP_TO_TAPS!r}, a list of layer "
                "names or a callable layer -> bool."
            )
        if isinstance(self.trainable, (list, tuple)):
            object.__setattr__(self, "trainable", tuple(self.trainable))
        scale = self.learning_rate_scale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"Stage {self.name!r}: learning_rate_scale must be a finite number > 0; "
                f"got {scale!r}."
            )
        if self.global_clipnorm is not None and not float(self.global_clipnorm) > 0:
            raise ValueError(
                f"Stage {self.name!r}: global_clipnorm must be > 0 or None; "
                f"got {self.global_clipnorm!r}."
            )

    @property
    def terms(self):
        """The names of the stage's terms."""
        return tuple(self.losses)

    def get_config(self):
        if callable(self.trainable):
            raise ValueError(
                f"Stage {self.name!r} selects trainable layers with a "
                "callable, which cannot be serialized; use a list of names."
            )
        return {
            "name": self.name,
            "losses": dict(self.losses),
            "trainable": list(self.trainable)
            if isinstance(self.trainable, tuple)
            else self.trainable,
            "optimizer": None
            if self.optimizer is None
            else keras.optimizers.serialize(self.optimizer),
            "regularization": self.regularization,
            "learning_rate_scale": self.learning_rate_scale,
            "global_clipnorm": self.global_clipnorm,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("optimizer") is not None:
            config["optimizer"] = keras.optimizers.deserialize(config["optimizer"])
        return cls(**config)


def builtin_stages(kd_weight=0.9):
    """The built-in stages by name.

    - `"fsp"`: FSP loss only, training the student up to its last FSP map
      (FSP paper, stage 1).
    - `"hint"`: hint loss, training the student up to the guided layer and
      the regressor (FitNets, stage 1).

    In both, the student's head is neither run nor trained; they train at
    `FEATURE_STAGE_LR_SCALE` times the compiled learning rate with gradients
    clipped to a global norm of `FEATURE_STAGE_CLIPNORM`.
    - `"kd"`: `kd_weight * soft targets + (1 - kd_weight) * labels` (Hinton).
    - `"task"`: labels only; the teacher does not run.
    """
    kd_weight = float(kd_weight)
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(
            f"kd_weight is the soft targets' share of the 'kd' stage, between 0 and 1 (the "
            f"labels get 1 - kd_weight); got {kd_weight}."
        )
    feature = dict(trainable=UP_TO_TAPS, learning_rate_scale=FEATURE_STAGE_LR_SCALE,
                   global_clipnorm=FEATURE_STAGE_CLIPNORM)
    return {
        "fsp": Stage("fsp", {"fsp": 1.0}, **feature),
        "hint": Stage("hint", {"hint": 1.0}, **feature),
        "kd": Stage("kd", {"kd": kd_weight, "task": 1.0 - kd_weight}),
        "task": Stage("task", {"task": 1.0}),
    }


def resolve_stage(stage, stages):
    """A `Stage` from a name (looked up in `stages`) or a `Stage`."""
    if isinstance(stage, Stage):
        return stage
    if isinstance(stage, str) and stage in stages:
        return stages[stage]
    raise ValueError(
        f"Unknown stage {stage!r}. Valid stage names are {sorted(stages)}, "
        "or pass a keras_fsp.Stage(...)."
    )


def apply_trainable(stage, student, original, tapped):
    """Sets which of the student's layers train in `stage` (its `trainable`
    selector); `original` maps `id(layer)` to the layer's own flag, which a
    stage never overrides to True; `tapped` are the student layers the
    stage's terms tap (for `UP_TO_TAPS`)."""
    selector = stage.trainable
    if selector is None:
        chosen = None
    elif selector == UP_TO_TAPS:
        if not tapped:
            raise ValueError(
                f"Stage {stage.name!r} trains {UP_TO_TAPS!r} but taps no student layer "
                f"(its terms {list(stage.losses)} read only the logits)."
            )
        chosen = {id(l) for l in taps.layers_up_to(student, tapped, "student")}
    elif callable(selector):
        chosen = {id(l) for l in student.layers if selector(l)}
    else:
        chosen = {id(taps.top_level_layer(student, name, "student")) for name in selector}
    for layer in student.layers:
        layer.trainable = original[id(layer)] and (chosen is None or id(layer) in chosen)
