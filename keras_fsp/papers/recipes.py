"""The papers' training procedures as recipes: stages, per-stage optimizers
and learning-rate schedules, and callbacks, so an experiment is a few lines.

    recipe = recipes.fsp_paper(teacher, student, steps_per_epoch=391)
    keras_fsp.training.train(recipe, (x_train, y_train), (x_test, y_test), "runs/fsp")

The methods by name (what `keras-fsp distill --method` takes) are
`keras_fsp.papers.methods`.

Schedules are given in iterations, as in the papers, and converted to whole
epochs (rounded up) with `steps_per_epoch`. Every stage has its own SGD
(momentum 0.9) whose step count starts at 0, so each stage's learning-rate
boundaries count from the stage's start. Weight decay is the models' own
(`cifar_resnet(weight_decay=1e-4)`).
"""

import dataclasses
import inspect
import math
from typing import Dict, List, Optional

import keras

from keras_fsp import jax_steps
from keras_fsp.augment import MixUp, chain
from keras_fsp.callbacks import LossWeightSchedule, RestoreKernelNorms, StageSchedule
from keras_fsp.distiller import FSPDistiller
from keras_fsp.ensemble import feature_member
from keras_fsp.papers.cifar_resnet import dense_taps
from keras_fsp.stages import UP_TO_TAPS, Stage
from keras_fsp.terms import (AttentionTerm, CRDTerm, DecoupledKDTerm, DISTTerm, FSPTerm, HintTerm,
                             PKTTerm, ReviewKDTerm, RKDTerm, SimilarityPreservingTerm,
                             SoftTargetTerm, StandardizedKDTerm)


STAGE1_OPTIMIZERS = ("sgd", "adam")


def _piecewise(rates, boundaries):
    if isinstance(rates, keras.optimizers.schedules.LearningRateSchedule):
        return rates
    rates, boundaries = [float(r) for r in rates], [int(b) for b in boundaries]
    if len(rates) != len(boundaries) + 1:
        raise ValueError(f"{len(rates)} rates need {len(rates) - 1} boundaries; got {boundaries}.")
    if not boundaries:
        return rates[0]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, rates)


def linear_decay(rate, iterations):
    """A learning rate falling linearly from `rate` to 0 over `iterations`."""
    return keras.optimizers.schedules.PolynomialDecay(float(rate), int(iterations), 0.0, power=1.0)


def sgd(rates, boundaries=(), momentum=0.9, global_clipnorm=None):
    """SGD with a piecewise-constant learning rate (boundaries in steps), or
    with `rates` a `LearningRateSchedule`."""
    return keras.optimizers.SGD(learning_rate=_piecewise(rates, boundaries), momentum=momentum,
                                global_clipnorm=global_clipnorm)


def _stage1_optimizer(name, rates, boundaries=(), global_clipnorm=None):
    """The optimizer of an FSP stage 1: `"sgd"` (momentum 0.9, as every stage
    of the papers) or `"adam"` (whose step does not grow with the loss's
    scale), with a piecewise-constant rate and an optional global gradient
    clip norm."""
    if name == "sgd":
        return sgd(rates, boundaries, global_clipnorm=global_clipnorm)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=_piecewise(rates, boundaries),
                                     global_clipnorm=global_clipnorm)
    raise ValueError(f"stage1_optimizer must be one of {STAGE1_OPTIMIZERS}; got {name!r}.")


def _epochs(iterations, steps_per_epoch):
    return max(1, math.ceil(iterations / steps_per_epoch))


def _scaled(values, scale):
    return [max(1, int(round(v * scale))) for v in values]


@dataclasses.dataclass
class Recipe:
    """A model to train, its stages by start epoch, and its callbacks.

    Attributes:
        name: the method's name.
        model: the `FSPDistiller` (or, for supervised recipes, the model).
        schedule: `{start_epoch: Stage}`; empty for supervised recipes.
        epochs: total epochs.
        callbacks: callbacks the recipe needs (the stage schedule included).
        student: the network being trained.
    """

    name: str
    model: keras.Model
    schedule: Dict[int, Stage]
    epochs: int
    callbacks: List[keras.callbacks.Callback]
    student: keras.Model
    optimizer: Optional[keras.optimizers.Optimizer] = None

    def compile(self, metrics=("accuracy",), **kwargs):
        if isinstance(self.model, FSPDistiller):
            # Every stage brings its own optimizer; "sgd" is only the template.
            self.model.compile(optimizer="sgd", metrics=list(metrics), **kwargs)
        else:
            self.model.compile(
                optimizer=self.optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=list(metrics),
                **kwargs,
            )
            jax_steps.install(self.model)  # whole epochs per dispatch on JAX, as a distiller
        return self


#: Variables AdamW does not decay: biases, normalisations' scales and
#: offsets, embeddings (the usual exclusions for transformers).
NOT_DECAYED = ("bias", "gamma", "beta", "embeddings")


def adamw(iterations, rate=1e-3, weight_decay=0.05, warmup=0, global_clipnorm=1.0):
    """AdamW with a linear warm-up over `warmup` steps to `rate`, then a
    cosine decay to 0 at `iterations`, decoupled weight decay on every
    variable but `NOT_DECAYED`, gradients clipped to `global_clipnorm`."""
    warmup = int(min(max(warmup, 0), iterations - 1))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else float(rate), max(1, int(iterations) - warmup), alpha=0.0,
        warmup_target=float(rate) if warmup else None, warmup_steps=warmup)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay,
                                       global_clipnorm=global_clipnorm)
    optimizer.exclude_from_weight_decay(var_names=list(NOT_DECAYED))
    return optimizer


def with_adamw(recipe, steps_per_epoch, rate=1e-3, weight_decay=0.05, warmup_epochs=5,
               global_clipnorm=1.0):
    """`recipe` with every stage (or the supervised training) on `adamw`
    over that stage's iterations: the usual recipe of Vision Transformers on
    small data, in place of the papers' SGD. Each stage warms up for
    `warmup_epochs` (at most a quarter of the stage) and decays to 0 by its
    end; the stages, terms and callbacks are the recipe's own.

    Returns:
        the new `Recipe` (the given one's distiller is rebuilt and should no
        longer be used).
    """

    def make(epochs):
        iterations = epochs * steps_per_epoch
        warmup = min(warmup_epochs * steps_per_epoch, iterations // 4)
        return adamw(iterations, rate, weight_decay, warmup, global_clipnorm)

    if not recipe.schedule:
        return dataclasses.replace(recipe, optimizer=make(recipe.epochs))
    starts = sorted(recipe.schedule)
    ends = starts[1:] + [recipe.epochs]
    schedule = {start: dataclasses.replace(recipe.schedule[start], optimizer=make(end - start))
                for start, end in zip(starts, ends)}
    old = recipe.model
    stages = {stage.name: stage for stage in schedule.values()}
    distiller = FSPDistiller(old.teacher, old.student, terms=list(old.terms.values()),
                             stages=stages, stage=schedule[0].name, augment=old.augment)
    callbacks = [StageSchedule(schedule) if isinstance(c, StageSchedule) else c
                 for c in recipe.callbacks]
    return dataclasses.replace(recipe, model=distiller, schedule=schedule, callbacks=callbacks)


def supervised(model, steps_per_epoch, iterations=64000, boundaries=None,
               rates=(0.1, 0.01, 0.001), augment=None, scale=1.0, name="supervised",
               schedule="steps"):
    """Plain training with labels: the papers' teachers and the student alone.

    He et al.'s CIFAR recipe: SGD momentum 0.9, 0.1 -> 0.01 -> 0.001 at 32k
    and 48k of 64k iterations (by default the boundaries sit at 50% and 75% of
    `iterations`). `schedule="linear"` instead decays `rates[0]` linearly to
    0 over the iterations. `augment` (e.g. `PadCropFlip()`) runs inside the
    step, in training only; `scale` shrinks every iteration count.
    """
    if boundaries is None:
        boundaries = (iterations // 2, iterations * 3 // 4)
    iterations, *boundaries = _scaled([iterations, *boundaries], scale)
    trained = model
    if augment is not None:
        inputs = keras.Input(model.input_shape[1:])
        trained = keras.Model(inputs, model(augment(inputs)), name=f"{model.name}_augmented")
    if schedule == "linear":
        optimizer = sgd(linear_decay(rates[0], iterations))
    elif schedule == "steps":
        optimizer = sgd(rates, boundaries)
    else:
        raise ValueError(f"schedule must be 'steps' or 'linear'; got {schedule!r}.")
    return Recipe(name, trained, {}, _epochs(iterations, steps_per_epoch), [], model,
                  optimizer=optimizer)


def student_alone(student, steps_per_epoch, iterations=64000, augment=None, scale=1.0):
    """The baseline: the student trained with labels on the stage-2 budget."""
    return supervised(student, steps_per_epoch, iterations, augment=augment,
                      scale=scale, name="student_alone")


STAGE2 = ("task", "kd")


def _task_stage(iterations, scale, lr=0.1, terms=None, name="task"):
    """Stage 2 of the FSP paper: labels only (or `terms`), `lr` (0.1) ->
    /10 -> /100 at 50% and 75%."""
    iterations, b1, b2 = _scaled([iterations, iterations // 2, iterations * 3 // 4], scale)
    rates = (lr, lr / 10, lr / 100)
    return Stage(name, terms or {"task": 1.0}, optimizer=sgd(rates, (b1, b2))), iterations


def _stage2(stage2, iterations, scale, kd_weight):
    """The stage after a flow or attention stage 1: the task (the papers) or
    KD (`kd_weight * soft + (1 - kd_weight) * labels`, not in the papers)."""
    if stage2 == "task":
        return _task_stage(iterations, scale)
    if stage2 == "kd":
        return _task_stage(iterations, scale, terms={"kd": kd_weight, "task": 1.0 - kd_weight},
                           name="kd")
    raise ValueError(f"stage2 must be one of {STAGE2}; got {stage2!r}.")


def _soft_targets(stage2, temperature):
    """The soft-target term a stage 2 of KD needs (none for the task alone:
    a teacher of other classes has no soft targets for the student)."""
    return [SoftTargetTerm(temperature)] if stage2 == "kd" else []


def _stage_callbacks(schedule, restore_kernel_norms):
    callbacks = [StageSchedule(schedule)]
    if restore_kernel_norms:
        start = max(schedule)  # the task stage comes last
        callbacks.append(RestoreKernelNorms(at_stage=schedule[start].name, start_epoch=start))
    return callbacks


def passes_on(to, *sets):
    """Marks a recipe that passes its other keyword arguments on to the recipe
    `to`, setting `sets` of them itself, so that `settings` finds every
    keyword argument it takes."""

    def mark(recipe):
        recipe.passes_on = (to, sets)
        return recipe

    return mark


# Set by the command line itself (`--schedule_scale`, the data's augmentation).
_NOT_SETTINGS = ("teacher", "student", "steps_per_epoch", "augment", "scale")


def settings(recipe):
    """`{name: default}` of the keyword arguments of `recipe` that a command
    line can set (a None, bool, number or string default), those it passes
    on included."""
    out = {}
    for p in inspect.signature(recipe).parameters.values():
        if (p.default is not p.empty and p.name not in _NOT_SETTINGS
                and (p.default is None or isinstance(p.default, (bool, int, float, str)))):
            out[p.name] = p.default
    to, sets = getattr(recipe, "passes_on", (None, ()))
    if to is not None:
        for name, default in settings(to).items():
            if name not in sets:
                out.setdefault(name, default)
    return out


def fsp_paper(teacher, student, steps_per_epoch, stage1_iterations=21000,
              stage2_iterations=64000, pairs="sections", pooling="max",
              projection="auto", restore_kernel_norms=True, stage1_weight_decay=True,
              stage1_optimizer="sgd", stage1_clipnorm=10.0, stage2="task", temperature=4.0,
              kd_weight=0.9, augment=None, scale=1.0):
    """FSP (Yim et al. 2017): the paper's procedure, plus two fixes by default.

    Stage 1: FSP loss only on each section's input/output pair, max pooling,
    equal lambdas; learning rate 1e-3 -> 1e-4 -> 1e-5 at 11k and 16k of 21k.
    Stage 2: labels only, 0.1 -> 0.01 -> 0.001 at 32k and 48k of 64k; the
    teacher does not run.

    Args:
        pairs: `"sections"` (the paper) or `"consecutive"` (consecutive section
            outputs, the PyTorch toolkits' reading), or an explicit list.
        pooling: `"max"` (the paper) or `"avg"`.
        projection: `"auto"`: learn 1x1 projections where channel counts differ.
        restore_kernel_norms: rescale the student's batch-normalised kernels
            to their initial norms when stage 2 starts
            (`keras_fsp.callbacks.RestoreKernelNorms`; not in the paper).
            Stage 1 inflates them about 25x on CIFAR-10, which slows stage 2
            down; restoring them gained 1.2-2.5 points (RESULTS.md).
            `False` is the paper's procedure exactly.
        stage1_weight_decay: keep the student's weight decay in stage 1.
        stage1_optimizer: `"sgd"` (the paper) or `"adam"`, at the
            paper's stage-1 rates.
        stage1_clipnorm: clip stage 1's gradients to this global norm
            (default 10; `None`: the paper). The FSP loss starts near 9e4
            on CIFAR-10 with a gradient norm near 2e4: unclipped SGD at 1e-3
            inflates the kernels 20x within 25 steps and reached NaN in 3 of
            7 ResNet-26 students. Clipping at 10 kept every run finite and
            gained 0.5 points for ResNet-8 and 2.6 for fast optimization
            (RESULTS.md).
        stage2: `"task"` (the paper) or `"kd"`: stage 2 trains with Hinton's
            soft targets at `temperature` (`kd_weight` soft, the rest
            labels), flow as an initialisation then KD as the signal
            (`fsp_kd`).
    """
    if pairs == "sections":
        fsp_pairs = "auto"
    elif pairs == "consecutive":
        fsp_pairs = [("stage1", "stage2"), ("stage2", "stage3")]
    else:
        fsp_pairs = pairs
    s1, b1, b2 = _scaled([stage1_iterations, stage1_iterations * 11 / 21,
                          stage1_iterations * 16 / 21], scale)
    fsp = Stage("fsp", {"fsp": 1.0}, trainable=UP_TO_TAPS, regularization=stage1_weight_decay,
                optimizer=_stage1_optimizer(stage1_optimizer, (1e-3, 1e-4, 1e-5), (b1, b2),
                                           stage1_clipnorm))
    task, s2 = _stage2(stage2, stage2_iterations, scale, kd_weight)
    terms = [FSPTerm(pairs=fsp_pairs, pooling=pooling, projection=projection),
             *_soft_targets(stage2, temperature)]
    distiller = FSPDistiller(teacher, student, terms=terms, augment=augment,
                             stages={"fsp": fsp, task.name: task}, stage="fsp")
    e1 = _epochs(s1, steps_per_epoch)
    schedule = {0: fsp, e1: task}
    return Recipe("fsp" if stage2 == "task" else "fsp_kd", distiller, schedule,
                  e1 + _epochs(s2, steps_per_epoch),
                  _stage_callbacks(schedule, restore_kernel_norms), student)


def dense_fsp(teacher, student, steps_per_epoch, points_per_section=2,
              stage1_iterations=21000, stage2_iterations=64000, restore_kernel_norms=True,
              stage1_optimizer="sgd", stage1_clipnorm=None, stage2="task", temperature=4.0,
              kd_weight=0.9, augment=None, scale=1.0):
    """Dense, sequential FSP (Yeo et al. 2018).

    Taps `points_per_section` evenly spaced maps per section of both
    `cifar_resnet`s (`keras_fsp.papers.dense_taps`) and pairs consecutive
    taps, across the down-sampling points (max pooling). Stage 1 is split
    into one step per section: step k trains the FSP term `"dense_fsp_k"`,
    whose pairs end in sections 1..k, a third of the stage-1 iterations each, at 1e-3 then 1e-4
    for its last third (the slides give no schedule: this is our reading).
    Then the task stage, as in `fsp_paper` (`restore_kernel_norms`,
    `stage1_optimizer`, `stage1_clipnorm` and `stage2` too; each step has its
    own optimizer).
    """
    member, prefix = feature_member(teacher)  # an ensemble: its feature member's
    t_taps = [prefix + name for name in dense_taps(member, points_per_section)]
    s_taps = dense_taps(student, points_per_section)
    t_pairs, s_pairs = list(zip(t_taps[:-1], t_taps[1:])), list(zip(s_taps[:-1], s_taps[1:]))
    section_of = [int(b.split("_")[0][-1]) for _, b in s_pairs]  # "stage2_block1" -> 2
    step_iters = stage1_iterations / 3
    n, b = _scaled([step_iters, step_iters * 2 / 3], scale)
    terms, stages = [], {}
    for k in (1, 2, 3):
        index = [i for i, s in enumerate(section_of) if s <= k]
        name = f"dense_fsp_{k}"
        terms.append(FSPTerm(pairs=[t_pairs[i] for i in index],
                             student_pairs=[s_pairs[i] for i in index], name=name))
        stages[name] = Stage(
            name, {name: 1.0}, trainable=UP_TO_TAPS,
            optimizer=_stage1_optimizer(stage1_optimizer, (1e-3, 1e-4), (b,), stage1_clipnorm),
        )
    task, s2 = _stage2(stage2, stage2_iterations, scale, kd_weight)
    stages[task.name] = task
    distiller = FSPDistiller(teacher, student, terms=terms + _soft_targets(stage2, temperature),
                             augment=augment, stages=stages, stage="dense_fsp_1")
    step_epochs = _epochs(n, steps_per_epoch)
    schedule = {(k - 1) * step_epochs: stages[f"dense_fsp_{k}"] for k in (1, 2, 3)}
    schedule[3 * step_epochs] = task
    return Recipe("dense_fsp" if stage2 == "task" else "dense_fsp_kd", distiller, schedule,
                  3 * step_epochs + _epochs(s2, steps_per_epoch),
                  _stage_callbacks(schedule, restore_kernel_norms), student)


def fitnets(teacher, student, steps_per_epoch, hint_layer=None, guided_layer=None,
            stage1_iterations=35000, stage2_iterations=64000, temperature=3.0,
            lambda_start=4.0, lambda_end=1.0, stage2="kd", augment=None, scale=1.0,
            hint_clipnorm=10.0):
    """FitNets as the FSP paper ran it (Romero et al. 2015).

    Stage 1: hint loss (the hint and guided layers: `HintTerm`'s choice in
    the middle of the networks unless named; `"stage2"` of the CIFAR
    ResNets), training the student up to the guided layer and the
    regressor, learning rate 1e-4 then 1e-5 after 25k of 35k iterations,
    gradients clipped to the global norm `hint_clipnorm` (`None`: unclipped,
    the paper's procedure, which diverges from a wide teacher: RESULTS.md).
    Stage 2: `task + lambda * soft targets` at temperature 3, lambda falling
    linearly from 4 to 1 over the stage (epoch by epoch), 0.1 -> 0.01 ->
    0.001 at 50% and 75%; `stage2="task"`: the labels alone (a teacher of
    another task, whose logits mean nothing to the student).
    """
    s1, b1 = _scaled([stage1_iterations, stage1_iterations * 25 / 35], scale)
    hint = Stage("hint", {"hint": 1.0}, trainable=UP_TO_TAPS,
                 optimizer=sgd((1e-4, 1e-5), (b1,), global_clipnorm=hint_clipnorm))
    task, s2 = _task_stage(stage2_iterations, scale)
    if stage2 == "kd":
        second = Stage("fitnets_kd", {"kd": lambda_start, "task": 1.0}, optimizer=task.optimizer)
    elif stage2 == "task":
        second = task
    else:
        raise ValueError(f"stage2 must be one of {STAGE2}; got {stage2!r}.")
    terms = [HintTerm(hint_layer, guided_layer), *_soft_targets(stage2, temperature)]
    distiller = FSPDistiller(teacher, student, terms=terms, augment=augment,
                             stages={"hint": hint, second.name: second}, stage="hint")
    e1, e2 = _epochs(s1, steps_per_epoch), _epochs(s2, steps_per_epoch)
    schedule = {0: hint, e1: second}
    callbacks = [StageSchedule(schedule)]
    if stage2 == "kd":
        callbacks.append(LossWeightSchedule.linear("kd", lambda_start, lambda_end, epochs=e2,
                                                   start_epoch=e1))
    return Recipe("fitnet", distiller, schedule, e1 + e2, callbacks, student)


def single_stage(teacher, student, steps_per_epoch, terms, name, given_terms=(),
                 iterations=64000, lr=0.1, augment=None, scale=1.0, callbacks=()):
    """One stage of `terms` (`{term: weight}`, e.g. `{"kd": 0.9, "task":
    0.1}`) on the student's usual schedule: SGD momentum 0.9 at `lr` ->
    `lr/10` -> `lr/100` at 50% and 75% of `iterations`. `given_terms` are
    term instances with settings (e.g. `SoftTargetTerm(temperature=3)`);
    registered types a stage names get their defaults. The building block
    of one-stage methods, your own included."""
    stage, its = _task_stage(iterations, scale, lr, terms=terms, name=name)
    distiller = FSPDistiller(teacher, student, terms=list(given_terms), augment=augment,
                             stages={name: stage}, stage=name)
    return Recipe(name, distiller, {0: stage}, _epochs(its, steps_per_epoch),
                  [StageSchedule({0: stage}), *callbacks], student)


def hinton_kd(teacher, student, steps_per_epoch, iterations=64000, temperature=4.0,
              kd_weight=0.9, lr=0.1, augment=None, scale=1.0):
    """Hinton soft targets: `kd_weight * T^2 H(soft) + (1 - kd_weight) * H(labels)`,
    one stage, the student's usual schedule (`lr` -> `lr/10` -> `lr/100` at
    50% and 75%)."""
    return single_stage(teacher, student, steps_per_epoch, {"kd": kd_weight, "task": 1.0 - kd_weight},
                        "kd", [SoftTargetTerm(temperature)], iterations, lr, augment, scale)


def attention_transfer(teacher, student, steps_per_epoch, iterations=64000, beta=1000.0,
                       kd_weight=0.0, temperature=4.0, lr=0.1, augment=None, scale=1.0):
    """Attention transfer (Zagoruyko & Komodakis 2017): one stage of the
    task's cross-entropy plus `beta / 2` times the attention terms of the
    sections' outputs (`keras_fsp.terms.AttentionTerm`, the authors' mean
    of squares, beta 1000), on the student's usual schedule.

    `kd_weight > 0` adds Hinton's soft targets as in the paper's AT + KD
    (`kd_weight` soft, `1 - kd_weight` labels): `at-kd`.
    """
    terms = {"attention": 1.0, "task": 1.0 - kd_weight}
    given = [AttentionTerm(beta=beta)]
    if kd_weight:
        terms["kd"] = kd_weight
        given.append(SoftTargetTerm(temperature))
    return single_stage(teacher, student, steps_per_epoch, terms, "at_kd" if kd_weight else "at",
                        given, iterations, lr, augment, scale)


@passes_on(attention_transfer)
def attention_kd(teacher, student, steps_per_epoch, kd_weight=0.9, **kwargs):
    """Attention transfer with Hinton's soft targets in one stage."""
    return attention_transfer(teacher, student, steps_per_epoch, kd_weight=kd_weight, **kwargs)


def linear_warmup(term, epochs):
    """The weight of `term` rising linearly to 1 over its first `epochs`
    epochs: `(epoch + 1) / epochs` from epoch 0 (mdistiller's
    `min(epoch / warmup, 1)` with epochs counted from 1), the papers'
    warm-ups counted in epochs of the data as they are (DKD's, ReviewKD's:
    20)."""
    epochs = max(1, int(epochs))
    return LossWeightSchedule(term, lambda epoch: min((epoch + 1) / epochs, 1.0))


def decoupled_kd(teacher, student, steps_per_epoch, iterations=64000, alpha=1.0, beta=8.0,
                 temperature=4.0, warmup_epochs=20, lr=0.1, augment=None, scale=1.0):
    """Decoupled KD (Zhao et al. 2022): cross-entropy + `(alpha * TCKD + beta
    * NCKD) * T^2`, the DKD weight warmed up linearly over the first
    `warmup_epochs` epochs (the paper's CIFAR settings: alpha 1, beta 8,
    T 4, 20 epochs), on the student's usual schedule."""
    return single_stage(teacher, student, steps_per_epoch, {"dkd": 1.0, "task": 1.0}, "dkd",
                        [DecoupledKDTerm(alpha=alpha, beta=beta, temperature=temperature)],
                        iterations, lr, augment, scale,
                        callbacks=[linear_warmup("dkd", warmup_epochs)])


def standardized_kd(teacher, student, steps_per_epoch, iterations=64000, temperature=2.0,
                    kd_weight=9.0, task_weight=0.1, lr=0.1, augment=None, scale=1.0):
    """KD with logit standardisation (Sun et al. 2024): `kd_weight` times KD
    on z-scored logits at `temperature` plus `task_weight` times the labels,
    one stage on the student's usual schedule (the authors' CIFAR-100
    setting: T 2, weights 9 and 0.1)."""
    return single_stage(teacher, student, steps_per_epoch,
                        {"ls_kd": kd_weight, "task": task_weight}, "ls_kd",
                        [StandardizedKDTerm(temperature)], iterations, lr, augment, scale)


def dist(teacher, student, steps_per_epoch, iterations=64000, temperature=4.0, beta=2.0,
         gamma=2.0, lr=0.1, augment=None, scale=1.0):
    """DIST (Huang et al. 2022): the labels plus `T^2 * (beta * inter +
    gamma * intra)` correlation relations, one stage on the student's usual
    schedule (the paper's CIFAR-100 setting: T 4, beta = gamma = 2)."""
    return single_stage(teacher, student, steps_per_epoch, {"dist": 1.0, "task": 1.0}, "dist",
                        [DISTTerm(temperature, beta, gamma)], iterations, lr, augment, scale)


def function_matching(teacher, student, steps_per_epoch, iterations=64000, temperature=1.0,
                      mixup_alpha=1.0, lr=0.1, augment=None, scale=1.0, mixup_seed=None):
    """Function matching (Beyer et al. 2022, "Knowledge distillation: A
    good teacher is patient and consistent"): the student matches the
    teacher's predictions, `KL(teacher || student)` at `temperature` 1 with
    weight 1 and no label term, on mixed images (`augment` followed by
    `keras_fsp.augment.MixUp(mixup_alpha)`: one `lam ~ Beta(1, 1)` per
    batch, as the authors' big_vision configs, `mixup=dict(p=1.0, n=2)`).
    The distiller augments once per batch and gives the teacher the
    student's view (consistent teaching). The labels only feed the
    training accuracy, which is measured on the mixed images against each
    one's dominant image: a training metric, not the task's.

    Patience: the paper's gains kept growing to thousands of epochs; here
    `iterations` is the other recipes' 64k, so that a table compares methods
    on one budget, and `scale` (`--schedule_scale 4` and more) makes it
    patient. SGD
    momentum 0.9 at `lr` -> `lr/10` -> `lr/100` at 50% and 75%, as every
    recipe here, where the paper ran Adam with a warm-up, a cosine decay and
    gradients clipped to norm 1 (`with_adamw` is the closest).
    """
    mixed = chain(augment, MixUp(mixup_alpha, seed=mixup_seed))
    return single_stage(teacher, student, steps_per_epoch, {"kd": 1.0}, "function_matching",
                        [SoftTargetTerm(temperature)], iterations, lr, mixed, scale)


def _term_and_labels(teacher, student, steps_per_epoch, term, kd_weight, task_weight=1.0,
                     temperature=4.0, iterations=64000, lr=0.1, augment=None, scale=1.0,
                     callbacks=()):
    """One stage of `task_weight` times the labels plus the feature `term`
    (weighted 1: its own weight is its `beta`, RepDistiller's `-b`), and with
    `kd_weight > 0` Hinton's soft targets at `temperature` weighted
    `kd_weight`: RepDistiller's `-r 1 -a 1` combination with KD (T 4)."""
    terms, given = {term.name: 1.0, "task": task_weight}, [term]
    if kd_weight:
        terms["kd"] = kd_weight
        given.append(SoftTargetTerm(temperature))
    return single_stage(teacher, student, steps_per_epoch, terms,
                        f"{term.name}_kd" if kd_weight else term.name, given, iterations, lr,
                        augment, scale, callbacks)


@passes_on(_term_and_labels)
def rkd(teacher, student, steps_per_epoch, distance_weight=25.0, angle_weight=50.0,
        layers="auto", kd_weight=0.0, **kwargs):
    """RKD (Park et al. 2019): the labels plus the distance- and angle-wise
    losses on the penultimate features (`keras_fsp.terms.RKDTerm`; the
    paper's and RepDistiller's weights 25 and 50), one stage on the
    student's usual schedule; `kd_weight > 0` adds KD (`rkd-kd`)."""
    return _term_and_labels(teacher, student, steps_per_epoch,
                            RKDTerm(layers, distance_weight, angle_weight), kd_weight, **kwargs)


@passes_on(_term_and_labels)
def pkt(teacher, student, steps_per_epoch, beta=30000.0, layers="auto", kd_weight=0.0, **kwargs):
    """PKT (Passalis & Tefas 2018): the labels plus `beta` times the KL of
    the cosine-similarity probabilities of the penultimate features
    (`keras_fsp.terms.PKTTerm`; RepDistiller's beta 30000), one stage on the
    student's usual schedule; `kd_weight > 0` adds KD (`pkt-kd`)."""
    return _term_and_labels(teacher, student, steps_per_epoch, PKTTerm(layers, beta), kd_weight,
                            **kwargs)


@passes_on(_term_and_labels)
def similarity_preserving(teacher, student, steps_per_epoch, beta=3000.0, layers="auto",
                          kd_weight=0.0, **kwargs):
    """SP (Tung & Mori 2019): the labels plus `beta` times the distance of
    the normalised batch Gram matrices of the last section's maps
    (`keras_fsp.terms.SimilarityPreservingTerm`; RepDistiller's beta 3000),
    one stage on the student's usual schedule; `kd_weight > 0` adds KD
    (`sp-kd`)."""
    return _term_and_labels(teacher, student, steps_per_epoch,
                            SimilarityPreservingTerm(layers, beta), kd_weight, **kwargs)


@passes_on(_term_and_labels)
def crd(teacher, student, steps_per_epoch, beta=0.8, layers="auto", embedding_dim=128,
        nce_temperature=0.07, queue_size=16384, kd_weight=0.0, **kwargs):
    """CRD (Tian et al. 2020): the labels plus `beta` times the contrastive
    loss of learned 128-d embeddings of the penultimate features against
    queues of `queue_size` negatives at temperature `nce_temperature`
    (`keras_fsp.terms.CRDTerm`; RepDistiller's `-b 0.8`, `--nce_t 0.07`,
    `--nce_k 16384`), one stage on the student's usual schedule;
    `kd_weight > 0` adds KD (`crd-kd`: RepDistiller's `-r 1 -a 1 -b 0.8`,
    KD at `temperature` 4)."""
    term = CRDTerm(layers, beta, embedding_dim, nce_temperature, queue_size)
    return _term_and_labels(teacher, student, steps_per_epoch, term, kd_weight, **kwargs)


@passes_on(crd)
def crd_kd(teacher, student, steps_per_epoch, kd_weight=1.0, **kwargs):
    """CRD with Hinton's soft targets in one stage (RepDistiller's weights)."""
    return crd(teacher, student, steps_per_epoch, kd_weight=kd_weight, **kwargs)


@passes_on(rkd)
def rkd_kd(teacher, student, steps_per_epoch, kd_weight=1.0, **kwargs):
    """RKD with Hinton's soft targets in one stage (RepDistiller's weights)."""
    return rkd(teacher, student, steps_per_epoch, kd_weight=kd_weight, **kwargs)


@passes_on(pkt)
def pkt_kd(teacher, student, steps_per_epoch, kd_weight=1.0, **kwargs):
    """PKT with Hinton's soft targets in one stage (RepDistiller's weights)."""
    return pkt(teacher, student, steps_per_epoch, kd_weight=kd_weight, **kwargs)


@passes_on(similarity_preserving)
def similarity_preserving_kd(teacher, student, steps_per_epoch, kd_weight=1.0, **kwargs):
    """SP with Hinton's soft targets in one stage (RepDistiller's weights)."""
    return similarity_preserving(teacher, student, steps_per_epoch, kd_weight=kd_weight, **kwargs)


@passes_on(_term_and_labels, "callbacks")
def review_kd(teacher, student, steps_per_epoch, beta=1.0, pairs="auto", warmup_epochs=20,
              kd_weight=0.0, **kwargs):
    """ReviewKD (Chen et al. 2021): the labels (weight 1) plus `beta` times
    the hierarchical context loss of the student's levels fused by learned
    ABF modules against the teacher's (`keras_fsp.terms.ReviewKDTerm`; the
    authors' default and ResNet-110 -> ResNet-32 weight 1.0), its weight
    warmed up linearly over the first `warmup_epochs` (20), one stage on
    the student's usual schedule; `kd_weight > 0` adds Hinton's KD at
    `temperature` (`reviewkd-kd`: the authors' `--use-kl`, T 4, weight 1)."""
    return _term_and_labels(teacher, student, steps_per_epoch, ReviewKDTerm(pairs, beta), kd_weight,
                            callbacks=[linear_warmup("reviewkd", warmup_epochs)], **kwargs)


@passes_on(review_kd)
def review_kd_with_kd(teacher, student, steps_per_epoch, kd_weight=1.0, **kwargs):
    """ReviewKD with Hinton's soft targets in one stage (the authors' `--use-kl`)."""
    return review_kd(teacher, student, steps_per_epoch, kd_weight=kd_weight, **kwargs)


@passes_on(fsp_paper, "stage2")
def fsp_kd(teacher, student, steps_per_epoch, **kwargs):
    """FSP stage 1 (`fsp_paper`'s), then KD instead of the task alone."""
    return fsp_paper(teacher, student, steps_per_epoch, stage2="kd", **kwargs)


@passes_on(dense_fsp, "stage2")
def dense_fsp_kd(teacher, student, steps_per_epoch, **kwargs):
    """Dense sequential FSP stage 1 (`dense_fsp`'s), then KD."""
    return dense_fsp(teacher, student, steps_per_epoch, stage2="kd", **kwargs)
