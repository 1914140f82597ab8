"""Training stages, declared as data.

A stage says which loss terms are active with which weights, which student
variables train, and with which optimizer. The papers train in stages (FSP:
FSP loss first, then the task; FitNets: hint first, then KD).
"""

import dataclasses
from typing import Callable, Mapping, Optional, Sequence, Union

import keras

LOSS_TERMS = ("fsp", "hint", "kd", "task")
# Terms that need the teacher's forward pass.
TEACHER_TERMS = ("fsp", "hint", "kd")
UP_TO_TAPS = "up_to_taps"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage of an `FSPDistiller`.

    Args:
        name: the stage's name, shown in logs.
        losses: `{term: weight}` with terms among `"fsp"`, `"hint"`, `"kd"`,
            `"task"`. Only these terms are computed; the teacher runs only
            if one of `"fsp"`, `"hint"`, `"kd"` is present. Weights can be
            changed during training with
            `keras_fsp.callbacks.LossWeightSchedule`.
        trainable: which student layers train. `None`: all of them;
            `"up_to_taps"`: the layers that the stage's tapped student maps
            depend on (the FSP maps, the guided layer: FitNets stage 1 trains
            the student up to the guided layer); a sequence of layer names; or a callable
            `layer -> bool`. The hint regressor trains when `"hint"` is
            active, the FSP projections when `"fsp"` is.
        optimizer: the stage's optimizer. `None`: a fresh copy of the
            optimizer given to `compile` (its step count and slots restart at
            each stage, as the papers' per-stage learning-rate schedules do).
        regularization: whether the student's regularization losses (weight
            decay) are added.
        fsp_pairs: indices of the distiller's FSP pairs this stage uses
            (`None`: all). Dense sequential FSP (Yeo et al. 2018) trains on
            the pairs of section 1 first, then of sections 1-2, and so on.

    Example:

    >>> fsp_then_kd = Stage("fsp+kd", losses={"fsp": 1e-2, "kd": 1.0})
    >>> fsp_then_kd.needs_teacher
    True
    """

    name: str
    losses: Mapping[str, float]
    trainable: Union[None, str, Sequence[str], Callable] = None
    optimizer: Optional[keras.optimizers.Optimizer] = None
    regularization: bool = True
    fsp_pairs: Optional[Sequence[int]] = None

    def __post_init__(self):
        if not isinstance(self.losses, Mapping) or not self.losses:
            raise ValueError(
                f"Stage {self.name!r}: losses must be a non-empty dict "
                f"{{term: weight}} with terms among {LOSS_TERMS}; "
                f"got {self.losses!r}."
            )
        unknown = [t for t in self.losses if t not in LOSS_TERMS]
        if unknown:
            raise ValueError(
                f"Stage {self.name!r}: unknown loss term(s) {unknown}; "
                f"valid terms are {LOSS_TERMS}."
            )
        object.__setattr__(
            self, "losses", {t: float(w) for t, w in self.losses.items()}
        )
        if isinstance(self.trainable, str) and self.trainable != UP_TO_TAPS:
            raise ValueError(
                f"Stage {self.name!r}: trainable={self.trainable!r}; use None "
                f"(the whole student), {UP_TO_TAPS!r}, a list of layer "
                "names or a callable layer -> bool."
            )
        if isinstance(self.trainable, (list, tuple)):
            object.__setattr__(self, "trainable", tuple(self.trainable))
        if self.fsp_pairs is not None:
            pairs = tuple(int(i) for i in self.fsp_pairs)
            if not pairs or "fsp" not in self.losses:
                raise ValueError(
                    f"Stage {self.name!r}: fsp_pairs={self.fsp_pairs!r} selects "
                    "FSP pairs, which needs a non-empty selection and an 'fsp' "
                    "loss term."
                )
            object.__setattr__(self, "fsp_pairs", pairs)

    @property
    def terms(self):
        return tuple(t for t in LOSS_TERMS if t in self.losses)

    @property
    def needs_teacher(self):
        return any(t in self.losses for t in TEACHER_TERMS)

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
            "fsp_pairs": None if self.fsp_pairs is None else list(self.fsp_pairs),
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

    In both, the student's head is neither run nor trained.
    - `"kd"`: `kd_weight * soft targets + (1 - kd_weight) * labels` (Hinton).
    - `"task"`: labels only; the teacher does not run.
    """
    return {
        "fsp": Stage("fsp", {"fsp": 1.0}, trainable=UP_TO_TAPS),
        "hint": Stage("hint", {"hint": 1.0}, trainable=UP_TO_TAPS),
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
