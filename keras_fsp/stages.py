"""Training stages, declared as data, and the controller that switches them.

A stage says which loss terms are active with which weights, which student
variables train, and with which optimizer. The papers train in stages (FSP:
FSP loss first, then the task; FitNets: hint first, then KD).
`StageController` applies a stage to a distiller: it creates the terms the
stage names, sets their weights and which student layers train, and gives
the stage its optimizer.
"""

import contextlib
import dataclasses
import math
from typing import Callable, Mapping, Optional, Sequence, Union

import keras

from keras_fsp import compat, optimizers, taps
from keras_fsp.terms.base import LOGITS, term_class

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
        terms: `{term name: weight}`: the terms of the stage (registered
            types, `"fsp"`, `"hint"`, `"kd"`, `"task"`, `"attention"`,
            `"dkd"` or your own, or terms given to the distiller) and their
            weights, all `>= 0`. Only these terms are computed; the teacher
            runs only if one of them uses it. Weights can be changed during
            training with `keras_fsp.callbacks.LossWeightSchedule`.
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

    >>> fsp_and_kd = Stage("fsp+kd", {"fsp": 1e-2, "kd": 1.0})
    >>> fsp_and_kd.terms
    {'fsp': 0.01, 'kd': 1.0}
    """

    name: str
    terms: Mapping[str, float]
    trainable: Union[None, str, Sequence[str], Callable] = None
    optimizer: Optional[keras.optimizers.Optimizer] = None
    regularization: bool = True
    learning_rate_scale: float = 1.0
    global_clipnorm: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A stage's name must be a non-empty string; got {self.name!r}.")
        if not isinstance(self.terms, Mapping) or not self.terms:
            raise ValueError(
                f"Stage {self.name!r}: terms must be a non-empty dict {{term: weight}}, "
                f"e.g. {{'kd': 0.9, 'task': 0.1}}; got {self.terms!r}."
            )
        terms = {}
        for term, weight in self.terms.items():
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
            terms[term] = weight
        object.__setattr__(self, "terms", terms)
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

    def get_config(self):
        if callable(self.trainable):
            raise ValueError(
                f"Stage {self.name!r} selects trainable layers with a "
                "callable, which cannot be serialized; use a list of names."
            )
        return {
            "name": self.name,
            "terms": dict(self.terms),
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
        if "losses" in config:  # saved by keras_fsp 0.2
            config["terms"] = config.pop("losses")
        if config.get("optimizer") is not None:
            config["optimizer"] = keras.optimizers.deserialize(config["optimizer"])
        return cls(**config)


def builtin_stages():
    """The built-in stages by name.

    - `"fsp"`: FSP loss only, training the student up to its last FSP map
      (FSP paper, stage 1).
    - `"hint"`: hint loss, training the student up to the guided layer and
      the regressor (FitNets, stage 1).

    In both, the student's head is neither run nor trained; they train at
    `FEATURE_STAGE_LR_SCALE` times the compiled learning rate with gradients
    clipped to a global norm of `FEATURE_STAGE_CLIPNORM`.
    - `"attention"`: attention transfer plus the labels, the whole student
      at the compiled learning rate (Zagoruyko & Komodakis: one stage).
    - `"kd"`: `0.9 * soft targets + 0.1 * labels` (Hinton), the default.
    - `"task"`: labels only; the teacher does not run.
    """
    feature = dict(trainable=UP_TO_TAPS, learning_rate_scale=FEATURE_STAGE_LR_SCALE,
                   global_clipnorm=FEATURE_STAGE_CLIPNORM)
    return {
        "fsp": Stage("fsp", {"fsp": 1.0}, **feature),
        "hint": Stage("hint", {"hint": 1.0}, **feature),
        "attention": Stage("attention", {"attention": 1.0, "task": 1.0}),
        "kd": Stage("kd", {"kd": 0.9, "task": 0.1}),
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


def _same_stage(a, b):
    return a is b or a == b


class StageController:
    """Applies stages to a distiller: which stage is active, the terms each
    stage names (created from the term registry when the distiller has none
    of that name), their weights, which student layers train, and each
    stage's optimizer (its own, or a copy of the compiled one).

    Outside `fit` the student keeps its own trainable flags; inside
    (`training()`), the active stage's selection holds, since Keras reads the
    trainable variables as each epoch starts.
    """

    def __init__(self, distiller, stages=None):
        self.model = distiller
        self.given = dict(stages or {})
        self.stages = {**builtin_stages(), **self.given}
        optimizers.check_not_shared(self.stages.values())
        self.active = None
        self.template = None  # the compiled optimizer
        self.auto_scale_loss = True
        self.teacher_cached = False  # fitting on a teacher cache
        self._optimizers = optimizers.StageOptimizers()
        self._student_flags = {id(l): l.trainable for l in distiller.student.layers}
        self._training = False

    # ----------------------------------------------------------- the terms

    def terms_of(self, stage):
        """The stage's terms, `[term]`, created (registered types, with their
        defaults) and configured where the distiller has none of the name.

        Raises:
            ValueError: naming the stage, for a name that is neither a term
                of the distiller nor a registered type, or a term that cannot
                work on these networks.
        """
        model = self.model
        for name in stage.terms:
            if name in model.terms:
                continue
            try:
                cls = term_class(name)
            except ValueError as e:
                raise ValueError(f"Stage {stage.name!r} uses the unknown term {name!r}: {e} "
                                 f"This distiller's terms are {sorted(model.terms)}.") from None
            try:
                model.add_term(cls())
            except ValueError as e:
                raise ValueError(f"Stage {stage.name!r} uses the {name!r} term: {e}") from None
        return [model.terms[name] for name in stage.terms]

    def student_taps(self, stage=None):
        terms = self.terms_of(stage or self.active)
        return list(dict.fromkeys(n for t in terms for n in t.student_taps))

    def uses_teacher(self, stage=None):
        stage = self.active if stage is None else resolve_stage(stage, self.stages)
        return any(t.uses_teacher for t in self.terms_of(stage))

    def runs_teacher(self):
        """Whether the active stage's step runs the teacher (not in a stage
        without it, nor on a teacher cache)."""
        return self.active is None or (self.uses_teacher() and not self.teacher_cached)

    def check(self, stages):
        """Resolves `stages` (names or `Stage`s) and makes their terms now,
        so that what would fail only when training reaches one fails before
        any training."""
        stages = [resolve_stage(s, self.stages) for s in stages]
        for stage in stages:
            self.terms_of(stage)
        optimizers.check_not_shared([*self.stages.values(), *stages])
        return stages

    # ----------------------------------------------------------- switching

    def set(self, stage):
        stage = resolve_stage(stage, self.stages)
        if stage is self.active:
            return
        known = self.stages.get(stage.name)
        if known is not None and not _same_stage(known, stage):
            raise ValueError(
                f"The distiller already has a different stage named {stage.name!r}; give the "
                "new stage another name."
            )
        self.terms_of(stage)
        if known is None:
            optimizers.check_not_shared([*self.stages.values(), stage])
            self.stages[stage.name] = self.given[stage.name] = stage
        compat.flush_jax_state(self.model)
        self.active = stage
        self.apply_trainable()
        for name, term in self.model.terms.items():
            term.stage_weight.assign(stage.terms.get(name, 0.0))
        if self.template is not None:
            self.install_optimizer()
        if not self._training:
            self.restore_student_flags()

    def adopt(self, term):
        """A term just added: its weight and trainable flag in the active
        stage; in it, the stage's optimizer made again for its variables."""
        stage = self.active
        term.trainable = stage is not None and term.name in stage.terms
        if term.trainable:
            term.stage_weight.assign(stage.terms[term.name])
            if self.template is not None:
                self.install_optimizer()

    def custom_stages(self):
        """The stages that are not the built-in ones (overrides included)."""
        builtin = builtin_stages()
        return {n: s for n, s in self.stages.items() if not _same_stage(builtin.get(n), s)}

    # ---------------------------------------------------- trainable layers

    def apply_trainable(self):
        """Sets which student layers (and terms' own layers) train in the
        active stage; a layer the student froze itself stays frozen."""
        stage, student = self.active, self.model.student
        selector = stage.trainable
        chosen = None
        if selector == UP_TO_TAPS:
            tapped = [n for n in self.student_taps(stage) if n != LOGITS]
            if not tapped:
                raise ValueError(
                    f"Stage {stage.name!r} trains {UP_TO_TAPS!r} but taps no student layer "
                    f"(its terms {list(stage.terms)} read only the logits)."
                )
            chosen = {id(l) for l in taps.layers_up_to(student, tapped, "student")}
        elif callable(selector):
            chosen = {id(l) for l in student.layers if selector(l)}
        elif selector is not None:
            chosen = {id(taps.top_level_layer(student, name, "student")) for name in selector}
        for layer in student.layers:
            layer.trainable = self._student_flags[id(layer)] and (chosen is None or id(layer) in chosen)
        for name, term in self.model.terms.items():
            term.trainable = name in stage.terms

    def restore_student_flags(self):
        for layer in self.model.student.layers:
            layer.trainable = self._student_flags[id(layer)]

    @contextlib.contextmanager
    def training(self, teacher_cached=False):
        """Inside `fit`: the active stage's trainable selection holds."""
        self.apply_trainable()
        self._training, self.teacher_cached = True, teacher_cached
        try:
            yield
        finally:
            self._training, self.teacher_cached = False, False
            self.restore_student_flags()

    # ---------------------------------------------------------- optimizers

    def compile(self, template, auto_scale_loss):
        self.template, self.auto_scale_loss = template, bool(auto_scale_loss)
        self.apply_trainable()
        self.install_optimizer()
        if not self._training:
            self.restore_student_flags()

    def install_optimizer(self):
        """Gives the distiller the active stage's optimizer, built for the
        variables the stage trains, and has Keras rebuild its train and test
        functions (Keras builds them once per `fit`)."""
        model, stage = self.model, self.active
        variables = model.trainable_variables
        strategy = getattr(model, "distribute_strategy", None)
        layers = [model, model.student, *model.student.layers, *model.terms.values()]
        scaled = self.auto_scale_loss and optimizers.computes_in_float16(layers)
        # A Keras optimizer remembers the strategy it was created under: make
        # (clone) and build it inside the model's, or a stage switch inside
        # `fit` raises "Mixing different tf.distribute.Strategy objects".
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            optimizer = self._optimizers.for_stage(stage, self.template, scaled)
            if not optimizer.built:
                optimizer.build(variables)
        built_for = compat.optimizer_variable_count(optimizer)
        if built_for != len(variables):
            raise ValueError(
                f"The optimizer of stage {stage.name!r} was built for {built_for} variables but "
                f"the stage trains {len(variables)}: give each Stage its own optimizer instance."
            )
        model.optimizer = optimizer
        model.train_function = None
        model.test_function = None
        model.make_train_function()
