"""The callbacks of a training run (`keras_fsp.training.train` adds them):
checkpoints at a least interval, a NaN guard that names the kept
checkpoint, `metrics.csv`, the epoch's line in the log, a progress bar, the
trained network scored alone, a wall-time deadline, and kernel-norm ratios."""

import time
import warnings

import keras
import numpy as np

from keras_fsp.callbacks import StopOnNonFiniteLoss, as_float, non_finite_term
from keras_fsp.finite import first_non_finite
from keras_fsp.kernel_norms import kernel_norms
from keras_fsp.training.scores import accuracy_and_loss

# The clock of checkpoint intervals (a name of its own, so tests can replace it).
_clock = time.monotonic


def non_finite_weight(model):
    """The path of the first weight of `model` holding a NaN/inf, or None;
    an `FSPDistiller`'s frozen teacher is not read (it never changes). A
    loss can stay finite while batch-norm statistics are already NaN (XLA's
    max(NaN, 0) is 0, so the ReLUs hide them)."""
    teacher = getattr(model, "teacher", None)
    frozen = {id(v) for v in teacher.weights} if teacher is not None else set()
    return first_non_finite([v for v in model.weights if id(v) not in frozen])


class CheckpointCallback(keras.callbacks.Callback):
    """Saves a checkpoint at the end of epochs, unless a training loss of the
    epoch or a weight is NaN/inf (the last good one is kept).

    Args:
        checkpoints: the run's `keras_fsp.training.checkpoints.Checkpoints`.
        min_interval_seconds: with epochs of a fraction of a second (a GPU),
            writing and verifying a checkpoint every epoch costs more than
            the epoch: then an epoch's checkpoint is written only when this
            many seconds have passed since the last one, and always after
            the last epoch of `fit` (also one stopped early by a callback).
            An interruption then loses at most this much training. 0 (the
            default): every epoch.
    """

    def __init__(self, checkpoints, min_interval_seconds=0.0):
        super().__init__()
        if not min_interval_seconds >= 0:
            raise ValueError(f"min_interval_seconds must be >= 0; got {min_interval_seconds}.")
        self.checkpoints = checkpoints
        self.min_interval_seconds = float(min_interval_seconds)
        self.last = None
        self._last_time = None
        self._pending = None  # (epoch, logs) of an epoch not saved yet

    def on_train_begin(self, logs=None):
        self._last_time = _clock()
        self._pending = None

    def on_epoch_begin(self, epoch, logs=None):
        self._pending = None  # the weights move on: that epoch's state is gone

    def on_epoch_end(self, epoch, logs=None):
        bad = non_finite_term(logs)
        if bad is not None:
            self._skip(f"{bad[0]} is {bad[1]}", epoch)
        elif _clock() - self._last_time < self.min_interval_seconds:
            self._pending = (epoch, logs)
        else:
            self._save(epoch, logs)

    def on_train_end(self, logs=None):
        if self._pending is not None:
            self._save(*self._pending)

    def _skip(self, what, epoch):
        self._pending = None
        warnings.warn(f"{what} at the end of epoch {epoch + 1}: no checkpoint written; "
                      "the last good one is kept.", stacklevel=3)

    def _save(self, epoch, logs):
        self._pending = None
        weight = non_finite_weight(self.model)  # only when writing: it reads every weight
        if weight is not None:
            self._skip(f"weight {weight} is not finite", epoch)
            return
        self.last = self.checkpoints.save(self.model, epoch + 1, logs)
        self._last_time = _clock()


class NaNGuard(StopOnNonFiniteLoss):
    """`keras_fsp.callbacks.StopOnNonFiniteLoss` that also names the run's
    last good checkpoint, which is left untouched: nothing is saved after
    the bad batch; it also stops at the end of an epoch that leaves a weight
    or the validation loss NaN or infinite (with every training loss finite,
    the last update can).

    Args:
        checkpoints: the `Checkpoints` whose latest the message names.
        advice: the message's last sentence.
    """

    def __init__(self, checkpoints=None, advice=None):
        super().__init__(advice=advice)
        self.checkpoints = checkpoints

    def on_epoch_end(self, epoch, logs=None):
        # The last update of an epoch can leave weights NaN, or so large that
        # the validation loss is NaN, while every training loss was finite:
        # stop here (before the checkpoint callback), or the run would end
        # "complete" with a broken network.
        weight = non_finite_weight(self.model)
        bad = non_finite_term(logs, ["val_loss"])
        if weight is not None:
            self.stop(f"weight {weight} became NaN or infinite", f"at the end of epoch {epoch + 1}")
        if bad is not None:
            self.stop(f"val_loss became {bad[1]}", f"at the end of epoch {epoch + 1}")

    def kept(self):
        ckpt = self.checkpoints.latest() if self.checkpoints is not None else None
        if ckpt is not None:
            return f"the last good checkpoint (epoch {ckpt.epoch}) is kept in {ckpt.path}"
        if self.checkpoints is not None:
            return f"no checkpoint had been written yet in {self.checkpoints.path}"
        return "no checkpoint was written"


class MetricsCSV(keras.callbacks.Callback):
    """Per-epoch logs in the run's `metrics.csv`, one row per epoch, safe
    across stages and resumption.

    Keras' `CSVLogger` fixes its columns at the first epoch, so the columns
    of a later stage (the task stage's `accuracy` after an FSP stage) are
    dropped, and rows appended after a resume in another stage fall under the
    wrong header. This rewrites the file (atomically) at each epoch end with
    the union of the columns seen, a `stage` column, and the rows of earlier
    epochs only: an epoch that runs again after a resume replaces its row.

    Args:
        folder: the `keras_fsp.training.RunFolder`.
    """

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def on_epoch_end(self, epoch, logs=None):
        rows = self.folder.keep_metrics_before(epoch)
        row = {"epoch": epoch}
        stage = getattr(getattr(self.model, "stage", None), "name", None)
        if stage is not None:
            row["stage"] = stage
        for k, v in sorted((logs or {}).items()):
            f = as_float(v)
            if f is not None:
                row[k] = repr(f)
        self.folder.write_metrics_rows(rows + [row])


def _shown(logs):
    """The numeric logs as shown: the stage's number (`stage_index`, for
    TensorBoard) is left out, the stage's name is shown instead."""
    return [(k, float(v)) for k, v in sorted((logs or {}).items())
            if k != "stage_index" and (isinstance(v, (int, float)) or hasattr(v, "__float__"))]


def _stage_of(model):
    stage = getattr(getattr(model, "stage", None), "name", None)
    return f" [{stage}]" if stage else ""


class EpochLog(keras.callbacks.Callback):
    """The epoch's line (with its stage's name) into the log, shown at
    `verbose=2` (a line per epoch, as Keras' own)."""

    def __init__(self, log, total, verbose):
        super().__init__()
        self.log, self.total, self.verbose = log, total, verbose

    def on_epoch_end(self, epoch, logs=None):
        values = " ".join(f"{k}={v:.4g}" for k, v in _shown(logs))
        self.log(f"epoch {epoch + 1}/{self.total}{_stage_of(self.model)} {values}",
                 echo=self.verbose == 2)


class ProgressBar(keras.callbacks.Callback):
    """Keras' progress bar within each epoch (`verbose=1`), headed by the
    epoch and its stage. Only added at that level: a batch hook makes Keras
    bring every step's logs to the host."""

    def __init__(self, total):
        super().__init__()
        self.total, self.bar, self.seen = total, None, 0

    def on_epoch_begin(self, epoch, logs=None):
        print(f"epoch {epoch + 1}/{self.total}{_stage_of(self.model)}", flush=True)
        # Shown as they come: the values are running means already.
        self.bar = keras.utils.Progbar(self.params.get("steps"), stateless_metrics=())
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen = batch + 1
        self.bar.update(self.seen, _shown(logs), finalize=False)

    def on_epoch_end(self, epoch, logs=None):
        self.bar.update(self.params.get("steps") or self.seen, _shown(logs), finalize=True)


class Validation(keras.callbacks.Callback):
    """Scores the trained network alone on the test set at the end of the
    given epochs, as `val_accuracy` and `val_loss` (mean cross-entropy, as
    the final `test_loss`), for the callbacks after it.

    Why not `fit(validation_data=...)`: a distiller's evaluation passes the
    teacher's variables too and is compiled again at every stage switch; the
    network's own `predict` compiles once, and the final score reuses it."""

    def __init__(self, net, test_data, epochs):
        super().__init__()
        self.net, self.test_data, self.epochs = net, test_data, set(epochs)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and epoch + 1 in self.epochs:
            test = accuracy_and_loss(self.net, *self.test_data)
            logs["val_accuracy"], logs["val_loss"] = test["accuracy"], test["loss"]


class Deadline(keras.callbacks.Callback):
    """Stops after the epoch that passes `minutes` of wall time."""

    def __init__(self, minutes):
        super().__init__()
        self.minutes, self.start, self.reached = minutes, time.time(), False

    def on_epoch_end(self, epoch, logs=None):
        if self.minutes and time.time() - self.start > 60 * self.minutes:
            self.reached = True
            self.model.stop_training = True


class KernelNormLog(keras.callbacks.Callback):
    """Logs how far the student's batch-normalised kernels are from their
    norms at the start (median and max ratio; see `keras_fsp.kernel_norms`)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.initial = net, kernel_norms(net)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.initial:
            ratios = [n / self.initial[k] for k, n in kernel_norms(self.net).items()]
            logs["kernel_norm_ratio_median"] = float(np.median(ratios))
            logs["kernel_norm_ratio_max"] = float(np.max(ratios))
