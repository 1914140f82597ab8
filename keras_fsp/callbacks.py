"""Callbacks that drive an `FSPDistiller`'s stages and loss weights in `fit`,
and the guard that stops training on a NaN or infinite loss."""

import math

import keras
import numpy as np

from keras_fsp.kernel_norms import restore_kernel_norms
from keras_fsp.stages import resolve_stage


def _distiller(callback):
    model = callback.model
    if not hasattr(model, "set_stage"):
        raise ValueError(
            f"{type(callback).__name__} drives a keras_fsp.FSPDistiller; it was "
            f"given a {type(model).__name__}."
        )
    return model


def _shows(callback):
    """Whether `callback` prints: its own `verbose`, and `fit`'s (a `fit`
    with `verbose=0` prints nothing)."""
    return bool(callback.verbose) and bool((callback.params or {}).get("verbose", 1))


class StageSchedule(keras.callbacks.Callback):
    """Switches the distiller's stage at given epochs within one `fit`.

    The stage for epoch `e` is the one with the largest start epoch `<= e`,
    so resuming with `fit(initial_epoch=...)` lands in the right stage.

    Args:
        schedule: `{start_epoch: stage}`, stages by name or `Stage`; must
            start at epoch 0.
        verbose: print a line at each switch.

    Example:

    >>> schedule = StageSchedule({0: "fsp", 30: "task"})
    >>> schedule.stage_for_epoch(45)
    'task'
    """

    def __init__(self, schedule, verbose=1):
        super().__init__()
        if not schedule or 0 not in schedule:
            raise ValueError(
                "StageSchedule needs a dict {start_epoch: stage} with an entry "
                f"for epoch 0; got {schedule!r}."
            )
        if any(not isinstance(e, int) or e < 0 for e in schedule):
            raise ValueError(
                f"StageSchedule epochs must be integers >= 0; got {list(schedule)}."
            )
        self.schedule = dict(sorted(schedule.items()))
        self.verbose = verbose

    def stage_for_epoch(self, epoch):
        start = max(e for e in self.schedule if e <= epoch)
        return self.schedule[start]

    def on_train_begin(self, logs=None):
        # Fail before any training, not at the switch, perhaps after a
        # whole earlier stage.
        _distiller(self).check_stages(self.schedule.values())
        self._announced = None

    def on_epoch_begin(self, epoch, logs=None):
        distiller = _distiller(self)
        distiller.set_stage(self.stage_for_epoch(epoch))
        # Announce the first stage of a fit too, then every switch.
        if _shows(self) and distiller.stage is not self._announced:
            print(f"\nEpoch {epoch + 1}: stage {distiller.stage.name!r}")
        self._announced = distiller.stage

    def on_epoch_end(self, epoch, logs=None):
        # The stage's position in the schedule, as a number: TensorBoard and
        # other loggers of numeric logs show which stage each epoch was in.
        if logs is not None:
            names = [resolve_stage(s, _distiller(self).stages).name for s in self.schedule.values()]
            logs["stage_index"] = float(names.index(_distiller(self).stage.name))

    def get_config(self):
        return {"schedule": self.schedule, "verbose": self.verbose}


class RestoreKernelNorms(keras.callbacks.Callback):
    """Rescales the student's batch-normalised kernels to the norms they had
    when the distiller was created, when a given stage starts.

    FSP stage 1 inflates these norms many times over (its loss is a sum of
    squared differences in the thousands), which divides the effective
    learning rate of the following task stage by the square of that factor;
    see `keras_fsp.kernel_norms`. The rescaling does not change what the
    student computes. The target norms are variables of the distiller, so
    they are checkpointed with it. Place this callback after the
    `StageSchedule` in the callback list.

    Args:
        at_stage: name of the stage at whose start the norms are restored.
        start_epoch: the epoch at which that stage starts, if known (the
            recipes pass it): then the norms are restored at that epoch
            even when `fit` resumes there (`initial_epoch`). Without it, at
            the first epoch whose stage is `at_stage` after one that was not.
        verbose: print the range of the factors applied.

    Example:

    ```python
    callbacks = [StageSchedule({0: "fsp", 20: "task"}),
                 RestoreKernelNorms(at_stage="task", start_epoch=20)]
    ```
    """

    def __init__(self, at_stage="task", start_epoch=None, verbose=1):
        super().__init__()
        self.at_stage = at_stage
        self.start_epoch = start_epoch
        self.verbose = verbose
        self.factors = None
        self._last_stage = None

    def on_epoch_begin(self, epoch, logs=None):
        distiller = _distiller(self)
        stage = distiller.stage.name
        if self.start_epoch is not None:
            due = epoch == self.start_epoch
        else:
            due = stage == self.at_stage and self._last_stage not in (None, stage)
        if due:
            self.factors = restore_kernel_norms(distiller.student,
                                                distiller.initial_kernel_norms.values())
            if _shows(self) and self.factors:
                values = list(self.factors.values())
                print(f"\nEpoch {epoch + 1}: kernel norms restored "
                      f"(factors {min(values):.3f} to {max(values):.3f})")
        self._last_stage = stage


class LossWeightSchedule(keras.callbacks.Callback):
    """Sets one loss term's weight at the start of every epoch.

    Args:
        term: the name of one of the distiller's terms, e.g. `"kd"`.
        schedule: `epoch -> weight`, epochs counted from `start_epoch`.
        start_epoch: epoch at which the schedule starts (e.g. the first
            epoch of the stage it belongs to); before it nothing is changed.

    Example, FitNets stage 2 (lambda from 4 down to 1 over 40 epochs):

    >>> cb = LossWeightSchedule.linear("kd", 4.0, 1.0, epochs=40)
    >>> cb.schedule(0), cb.schedule(39)
    (4.0, 1.0)
    """

    def __init__(self, term, schedule, start_epoch=0):
        super().__init__()
        if not isinstance(term, str):
            raise ValueError(f"term must be a term's name, e.g. 'kd'; got {term!r}.")
        self.term = term
        self.schedule = schedule
        self.start_epoch = start_epoch

    @classmethod
    def linear(cls, term, start, end, epochs, start_epoch=0):
        """Linear from `start` (first epoch) to `end` (epoch `epochs - 1`)."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {epochs}.")

        def schedule(epoch):
            frac = min(max(epoch, 0), epochs - 1) / max(epochs - 1, 1)
            return float(start + (end - start) * frac)

        return cls(term, schedule, start_epoch)

    def on_train_begin(self, logs=None):
        distiller = _distiller(self)
        named = {t for stage in distiller.stages.values() for t in stage.terms}
        if self.term not in distiller.terms and self.term not in named:
            raise ValueError(
                f"LossWeightSchedule sets the weight of {self.term!r}, which is not one of the "
                f"distiller's terms {sorted(set(distiller.terms) | named)}."
            )

    def on_epoch_begin(self, epoch, logs=None):
        distiller = _distiller(self)
        if epoch < self.start_epoch:
            return
        if self.term not in distiller.stage.terms:
            raise ValueError(
                f"LossWeightSchedule sets the {self.term!r} weight but the "
                f"active stage {distiller.stage.name!r} has no such term "
                f"{tuple(distiller.stage.terms)}."
            )
        # A variable: the step is not traced again.
        distiller.terms[self.term].stage_weight.assign(float(self.schedule(epoch - self.start_epoch)))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and epoch >= self.start_epoch:
            weight = _distiller(self).terms[self.term].stage_weight
            logs[f"{self.term}_weight"] = float(keras.ops.convert_to_numpy(weight))


class NonFiniteLossError(RuntimeError):
    """A training loss term became NaN or infinite (see `StopOnNonFiniteLoss`)."""


def as_float(value):
    """`value` (a tensor or a number) as a Python float, or None."""
    try:
        return float(np.asarray(keras.ops.convert_to_numpy(value)).reshape(()))
    except (TypeError, ValueError):
        return None


def non_finite_term(logs, terms=None):
    """`(key, value)` of the first NaN/inf training loss in `logs`, or None.

    The terms' own losses (`*_loss`) are looked at before the total `loss`,
    so that a message names the term that went bad.
    """
    logs = logs or {}
    if terms is None:
        terms = sorted(k for k in logs if k.endswith("_loss") and not k.startswith("val_"))
        terms.append("loss")
    for term in terms:
        if term in logs:
            value = as_float(logs[term])
            if value is not None and not math.isfinite(value):
                return term, value
    return None


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` at the first batch where a loss term is NaN or infinite.

    Raises `NonFiniteLossError` naming the term, the stage, the epoch and
    batch (1-based, as Keras prints them) and what to do. `FSPDistiller.fit`
    adds one unless its callbacks already hold one (or a subclass, such as
    `keras_fsp.training.callbacks.NaNGuard`, which also names the kept checkpoint).

    Args:
        advice: what to do, the message's last sentence.
    """

    def __init__(self, advice=None):
        super().__init__()
        self.advice = advice
        self._epoch = 0

    def kept(self):
        """What the message says about saved work; subclasses say more."""
        return ""

    def _advice(self, stage):
        if self.advice:
            return self.advice
        where = f"the optimizer of stage {stage!r}, or compile's" if stage else "the optimizer"
        return (f"lower the learning rate ({where}), clip the gradients "
                "(Stage(global_clipnorm=...) or the optimizer's global_clipnorm), or check "
                "the data for NaN/inf values")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        bad = non_finite_term(logs)
        if bad is None:
            return
        term, value = bad
        kind = "NaN" if math.isnan(value) else "infinite"
        self.stop(f"{term} became {kind}", f"at epoch {self._epoch + 1}, batch {batch + 1}")

    def stop(self, what, when):
        """Stops `fit` with the `NonFiniteLossError` saying `what` happened
        `when`, in which stage, what is kept and what to do."""
        stage = getattr(getattr(self.model, "stage", None), "name", None)
        where = f" in stage {stage!r}" if stage else ""
        kept = self.kept()
        self.model.stop_training = True
        raise NonFiniteLossError(
            f"{what}{where} {when}{'; ' + kept if kept else ''}; {self._advice(stage)}."
        )


def with_nan_guard(args, kwargs):
    """`fit`'s arguments with a `StopOnNonFiniteLoss` among the callbacks."""
    args = list(args)
    # `args` follow x and y: (batch_size, epochs, verbose, callbacks, ...)
    positional = len(args) > 3
    given = args[3] if positional else kwargs.get("callbacks")
    callbacks = list(given or [])
    if not any(isinstance(c, StopOnNonFiniteLoss) for c in callbacks):
        callbacks.append(StopOnNonFiniteLoss())
    if positional:
        args[3] = callbacks
    else:
        kwargs["callbacks"] = callbacks
    return args, kwargs
