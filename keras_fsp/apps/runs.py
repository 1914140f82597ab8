"""Training runs that survive interruption: atomic per-epoch checkpoints,
exact resumption, and a guard against NaN/inf losses.

    run = ResumableRun("runs/fsp")
    recipe.compile()
    history, initial_epoch = run.fit(recipe.model, x_train, y_train,
                                     epochs=recipe.epochs, batch_size=128, seed=0,
                                     callbacks=recipe.callbacks)

Running the same code again after a crash (or Ctrl-C) restores the last
checkpoint and continues with `fit(initial_epoch=...)`; on the CPU it ends
with exactly the weights of an uninterrupted run. What makes that hold:

- the checkpoint holds every variable that training changes: the model's
  weights (`save_weights`: for an `FSPDistiller` the student, the hint
  regressor, the FSP projections and the loss-term weights), the states of
  the random generators inside the model (the in-step augmentation's
  `SeedGenerator`, which `save_weights` leaves out), and the variables of the
  optimizer of the active stage (step count, momentum), with the epoch and
  the stage's name;
- the training stream's order depends on `(seed, epoch)` only
  (`epoch_stream`): epoch `e` is the same batches whether the run started at
  epoch 0 or resumed at `e`;
- random augmentation runs inside the step (`keras_fsp.augment.PadCropFlip`),
  from the saved generator state.

Checkpoints are written atomically: made in memory, the free space
checked, written into a temporary folder beside the final one with a
`manifest.json` (each file's size and sha256) last, read back and verified,
then renamed; the previous checkpoint is deleted only after the new one is
complete (renamed to a temporary name first), so a kill or a full disk at
any moment leaves a loadable checkpoint, and whatever a kill left half done
(`.tmp-*`) is deleted at the next start. Resumption takes the newest
checkpoint that verifies against its manifest, saying which ones it skipped
and why: a damaged file costs an epoch, not the run.

The checkpoint files are backend-agnostic (Keras weights, NumPy arrays,
JSON); `epoch_stream` builds a `tf.data` pipeline (TensorFlow is imported when
it is called), which Keras' TensorFlow and JAX trainers both accept.
"""

import errno
import hashlib
import functools
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
import zipfile
import zlib

import keras
import numpy as np

from keras_fsp import compat
from keras_fsp.callbacks import NonFiniteLossError, StopOnNonFiniteLoss, non_finite_term  # noqa: F401

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
WEIGHTS_FILE = "model.weights.h5"
STATE_FILE = "state.npz"
INFO_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: with MANIFEST_FILE; 1 (no manifest) is still read, unverified
# Prefix of what a write or deletion in progress owns; left over, it is deleted.
TMP = ".tmp-"
# Kept free beyond a file's bytes (file-system blocks, directory entries).
SPARE_BYTES = 1 << 16

# The clock of checkpoint intervals (a name of its own, so tests can replace it).
_clock = time.monotonic

_NAME = re.compile(r"^epoch-(\d{6,})$")
# What a damaged file raises when it is loaded (a model that does not fit the
# checkpoint raises ValueError instead, which is not a damaged checkpoint).
_DAMAGED = (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


# --------------------------------------------------------------- filesystem


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _mb(size):
    return f"{size / 1e6:.1f} MB"


def check_free_space(folder, size, what):
    """Raises `OSError(ENOSPC)` naming both sizes when `size` bytes (and a
    little to spare) do not fit on the disk holding `folder`, before anything
    is written: a write that fills the disk halfway fails later and less
    clearly (inside h5py it can even crash the interpreter)."""
    free = shutil.disk_usage(folder).free
    if free < size + SPARE_BYTES:
        raise OSError(errno.ENOSPC, f"No space left on device: {what} needs {_mb(size)}, "
                      f"{_mb(free)} free", folder)


def _write_new(path, data):
    """Writes `data` (bytes) into a new file, flushed to disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path, data):
    """Writes `data` to `path` atomically (temporary file, fsync, rename).

    The folder must exist: a run folder that vanished is an error, not
    silently created again empty."""
    folder = os.path.dirname(os.path.abspath(path))
    check_free_space(folder, len(data), os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP, dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 otherwise
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(path, text):
    """Writes `text` to `path` atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_weights(model, path):
    """`model.save_weights(path)`, atomically and with the free space checked
    first (h5py never writes into a full disk)."""
    atomic_write_bytes(path, compat.weights_h5_bytes(model))


def _to_float(value):
    try:
        return float(np.asarray(keras.ops.convert_to_numpy(value)).reshape(()))
    except (TypeError, ValueError):
        return None


def _finite_logs(logs):
    """JSON-ready copy of the scalar logs."""
    out = {}
    for k, v in (logs or {}).items():
        f = _to_float(v)
        if f is not None:
            out[k] = f if math.isfinite(f) else str(f)
    return out


def _non_finite_weight(model):
    """The path of the first weight holding a NaN/inf, or None. A loss can
    stay finite while batch-norm statistics are already NaN (XLA's
    max(NaN, 0) is 0, so the ReLUs hide them)."""
    teacher = getattr(model, "teacher", None)  # frozen: never changes
    frozen = {id(v) for v in teacher.weights} if teacher is not None else set()
    checked = [v for v in model.weights if id(v) not in frozen]
    if not checked:
        return None
    bad = np.flatnonzero(~_finite_flags([v.value for v in checked]))
    return checked[bad[0]].path if len(bad) else None


def _all_finite(values):
    return keras.ops.stack([keras.ops.all(keras.ops.isfinite(v)) for v in values])


@functools.cache
def _jitted_all_finite():
    import jax

    return jax.jit(_all_finite)


def _finite_flags(values):
    """Whether each array is finite, computed on the device and read back at
    once: reading every weight back took 25 ms per epoch on a GPU (a transfer
    and a wait each), one compiled call on JAX takes a few."""
    if keras.backend.backend() == "jax":
        return np.asarray(_jitted_all_finite()(values))
    return keras.ops.convert_to_numpy(_all_finite(values))


def _stage_name(model):
    stage = getattr(model, "stage", None)
    return getattr(stage, "name", None)


def _seed_states(model):
    """The `SeedGenerator` states inside `model` (not in `model.weights`)."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _learning_rates(optimizer):
    """The constant learning rates (variables) of an optimizer and of the
    one a `LossScaleOptimizer` wraps; a schedule is none."""
    optimizers = (optimizer, getattr(optimizer, "inner_optimizer", None))
    rates = [compat.learning_rate(o) for o in optimizers if o is not None]
    return [r for r in rates if isinstance(r, keras.Variable)]


def _optimizer_of(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "Compile the model before saving or restoring a checkpoint: "
            "the checkpoint holds its optimizer's state."
        )
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    return optimizer


# -------------------------------------------------------------- checkpoints


def _read_json(path):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def verify_checkpoint(path):
    """`(info, None)` for an intact checkpoint folder (its `state.json`), or
    `(None, why)`: every file must have the size and sha256 that its
    `manifest.json`, written last, recorded."""
    try:
        manifest = _read_json(os.path.join(path, MANIFEST_FILE))
        listed = {name: (int(f["size"]), str(f["sha256"])) for name, f in manifest["files"].items()}
    except FileNotFoundError:
        try:  # format 1, before manifests: complete if its files are there
            info = _read_json(os.path.join(path, INFO_FILE))
            if info.get("format") == 1 and all(
                    os.path.isfile(os.path.join(path, n)) for n in (WEIGHTS_FILE, STATE_FILE)):
                return info, None
        except (OSError, ValueError, AttributeError):
            pass
        return None, f"it has no {MANIFEST_FILE} (its write did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"its {MANIFEST_FILE} is unreadable ({type(e).__name__})"
    for name in (WEIGHTS_FILE, STATE_FILE, INFO_FILE):
        if name not in listed:
            return None, f"its {MANIFEST_FILE} does not list {name}"
    for name, (size, sha256) in listed.items():
        try:
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
        except OSError as e:
            return None, f"{name} is unreadable ({e.strerror or type(e).__name__})"
        if len(data) != size:
            return None, f"{name} has {len(data)} bytes, {size} were written (truncated or damaged)"
        if _sha256(data) != sha256:
            return None, f"{name} does not match its sha256 checksum (damaged)"
    try:
        info = _read_json(os.path.join(path, INFO_FILE))
        int(info["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its {INFO_FILE} is unreadable ({type(e).__name__})"
    return info, None


class Checkpoint:
    """A complete checkpoint on disk: `epoch` epochs done, in `stage`."""

    def __init__(self, path, info):
        self.path = path
        self.info = info
        self.epoch = int(info["epoch"])
        self.stage = info.get("stage")

    @property
    def name(self):
        return os.path.basename(self.path)

    def __repr__(self):
        return f"Checkpoint(epoch={self.epoch}, stage={self.stage!r}, path={self.path!r})"


class ResumableRun:
    """Per-epoch atomic checkpoints in `model_dir/checkpoints/`, and resumption.

    Args:
        model_dir: the run's folder.
        keep: how many of the latest checkpoints to keep (at least 1; the
            previous one is deleted only once the new one is complete).
        log: called with a line for each checkpoint that `restore` skips
            (damaged or incomplete) and why; default `warnings.warn`.

    Layout: `checkpoints/epoch-000007/` holds `model.weights.h5`,
    `state.npz` (optimizer variables, random-generator states),
    `state.json` (epoch, stage, logs) and, written last, `manifest.json`
    (each file's size and sha256); `checkpoints/latest` names the newest,
    for people: resumption takes the newest checkpoint that verifies, so a
    damaged one or a damaged pointer costs an epoch, not the run.
    """

    def __init__(self, model_dir, keep=2, log=None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}.")
        self.model_dir = str(model_dir)
        self.checkpoint_dir = os.path.join(self.model_dir, CHECKPOINT_DIR)
        self.keep = int(keep)
        self.log = log or (lambda message: warnings.warn(message, stacklevel=3))

    # ---------------------------------------------------------------- lookup

    def _folders(self):
        """`(epoch, path)` of the folders named like checkpoints, newest first."""
        try:
            names = os.listdir(self.checkpoint_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = [(int(m.group(1)), os.path.join(self.checkpoint_dir, n))
                 for n in names if (m := _NAME.match(n))]
        return sorted(found, reverse=True)

    def _intact(self, report=False):
        """The checkpoints that verify, newest first; with `report`, each
        one skipped is logged with the reason."""
        for _, path in self._folders():
            info, why = verify_checkpoint(path)
            if info is not None:
                yield Checkpoint(path, info)
            elif report:
                self.log(f"checkpoint {os.path.basename(path)} skipped: {why}; "
                         "trying the one before")

    def checkpoints(self):
        """The intact checkpoints, oldest first."""
        return list(self._intact())[::-1]

    def latest(self):
        """The newest intact checkpoint (see `verify_checkpoint`), or None."""
        return next(self._intact(), None)

    def _remove_partial(self):
        """Deletes what killed writes and deletions left (`.tmp-*`)."""
        try:
            names = os.listdir(self.checkpoint_dir)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if name.startswith(TMP):
                path = os.path.join(self.checkpoint_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.remove(path)
                    except OSError:
                        pass

    def _aside(self, path):
        """Renames a checkpoint folder to a `.tmp-` name; returns the name."""
        tmp = tempfile.mkdtemp(prefix=f"{TMP}old-{os.path.basename(path)}-", dir=self.checkpoint_dir)
        os.rmdir(tmp)
        os.replace(path, tmp)
        return tmp

    def _discard(self, path):
        """Deletes a checkpoint folder. Renamed first: a kill halfway through
        leaves a `.tmp-` folder, which the next start deletes, not a
        half-deleted checkpoint."""
        shutil.rmtree(self._aside(path), ignore_errors=True)

    def _prune(self, epoch):
        """Deletes the folders before `epoch` but the newest `keep - 1`
        intact ones (damaged ones go too). Later folders stay until training
        gets there again and replaces them."""
        kept = 1  # the checkpoint of `epoch`
        for folder_epoch, path in self._folders():
            if folder_epoch >= epoch:
                continue
            if kept < self.keep and verify_checkpoint(path)[0] is not None:
                kept += 1
            else:
                self._discard(path)

    # ------------------------------------------------------------------ save

    def save(self, model, epoch, logs=None, extra=None):
        """Writes the checkpoint for `epoch` completed epochs, atomically.

        The files are made in memory, the free space is checked, then they
        are written into a temporary folder, read back and checked against
        their sha256, and the folder is renamed into place. A failure
        (`OSError`: disk full, folder not writable or vanished) deletes the
        temporary folder and leaves the earlier checkpoints as they were.

        Args:
            model: the compiled model (an `FSPDistiller` or any Keras model).
                `model_dir` must exist (`fit` creates it).
            epoch: the number of completed epochs (the next run's
                `initial_epoch`).
            logs: the epoch's logs, kept in `state.json`.
            extra: more JSON-serialisable facts for `state.json`.

        Returns:
            the `Checkpoint` written.
        """
        epoch = int(epoch)
        if not os.path.isdir(self.checkpoint_dir):
            os.mkdir(self.checkpoint_dir)  # not makedirs: a vanished model_dir is an error
        self._remove_partial()
        optimizer = _optimizer_of(model)
        seeds = _seed_states(model)
        arrays = {}
        for i, v in enumerate(optimizer.variables):
            arrays[f"optimizer/{i}"] = np.asarray(keras.ops.convert_to_numpy(v))
        for i, v in enumerate(seeds):
            arrays[f"seed/{i}"] = np.asarray(keras.ops.convert_to_numpy(v))
        state = io.BytesIO()
        np.savez(state, **arrays)
        info = {
            "format": FORMAT_VERSION,
            "epoch": epoch,
            "stage": _stage_name(model),
            "optimizer": type(optimizer).__name__,
            "optimizer_variables": len(optimizer.variables),
            "seed_states": [v.path for v in seeds],
            "weights": len(model.weights),
            "backend": keras.backend.backend(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "logs": _finite_logs(logs),
            **(extra or {}),
        }
        files = {
            WEIGHTS_FILE: compat.weights_h5_bytes(model),
            STATE_FILE: state.getvalue(),
            INFO_FILE: json.dumps(info, indent=2).encode("utf-8"),
        }
        manifest = {"format": FORMAT_VERSION,
                    "files": {n: {"size": len(d), "sha256": _sha256(d)} for n, d in files.items()}}
        files[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode("utf-8")  # last
        name = f"epoch-{epoch:06d}"
        check_free_space(self.checkpoint_dir, sum(len(d) for d in files.values()),
                         f"checkpoint {name}")
        final = os.path.join(self.checkpoint_dir, name)
        tmp = tempfile.mkdtemp(prefix=f"{TMP}{name}-", dir=self.checkpoint_dir)
        old = None
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 otherwise
            for file, data in files.items():
                _write_new(os.path.join(tmp, file), data)
            _, why = verify_checkpoint(tmp)  # what reached the disk
            if why is not None:
                raise OSError(errno.EIO, f"checkpoint {name} read back damaged: {why}", tmp)
            _fsync_dir(tmp)
            if os.path.exists(final):  # the same epoch again (e.g. after a damaged one)
                old = self._aside(final)
            os.replace(tmp, final)
            _fsync_dir(self.checkpoint_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not os.path.exists(final):
                os.replace(old, final)
            raise
        atomic_write_text(os.path.join(self.checkpoint_dir, LATEST), name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(epoch)
        return Checkpoint(final, info)

    # --------------------------------------------------------------- restore

    def restore(self, model, checkpoint=None):
        """Restores the newest intact (or the given) checkpoint into `model`.

        `model` must be built and compiled as it was when the checkpoint was
        written. An `FSPDistiller` is put in the checkpoint's stage
        (`set_stage`) and that stage's optimizer gets its saved state. A
        checkpoint that does not verify or load is skipped, with a line to
        `log` saying why, for the one before. Leftovers of killed writes are
        deleted first.

        The optimizers' learning rates are not restored: like a schedule, a
        constant learning rate is a setting of the code that builds the
        optimizer, so a run may resume with another one.

        Returns:
            the number of completed epochs (`initial_epoch` for `fit`), 0
            when there is no checkpoint.
        """
        self._remove_partial()
        for candidate in [checkpoint] if checkpoint is not None else self._intact(report=True):
            try:
                return self._load(model, candidate)
            except _DAMAGED as e:
                if checkpoint is not None:
                    raise
                self.log(f"checkpoint {candidate.name} skipped: it does not load "
                         f"({type(e).__name__}: {str(e)[:200]}); trying the one before")
        return 0

    def _load(self, model, checkpoint):
        info = checkpoint.info
        if info.get("stage") is not None:
            if not hasattr(model, "set_stage"):
                raise ValueError(
                    f"{checkpoint.path} was written by a distiller in stage "
                    f"{info['stage']!r}; got a {type(model).__name__}."
                )
            model.set_stage(info["stage"])
        if len(model.weights) != info.get("weights", len(model.weights)):
            raise ValueError(
                f"{checkpoint.path} holds {info['weights']} weights; this model "
                f"has {len(model.weights)}: it is not the model that wrote it."
            )
        with np.load(os.path.join(checkpoint.path, STATE_FILE)) as state:
            arrays = {k: state[k] for k in state.files}
        optimizer = _optimizer_of(model)
        # A constant learning rate is a setting, as a schedule is: the
        # optimizer's own (a run may resume with another), not the
        # checkpoint's, which load_weights (it holds the compiled optimizer
        # too) and the optimizer's variables below would restore.
        rates = [(v, keras.ops.convert_to_numpy(v)) for v in _learning_rates(optimizer)]
        model.load_weights(os.path.join(checkpoint.path, WEIGHTS_FILE))
        seeds = _seed_states(model)
        saved_seeds = sorted(
            (int(k.split("/")[1]), v) for k, v in arrays.items() if k.startswith("seed/")
        )
        if len(saved_seeds) != len(seeds):
            raise ValueError(
                f"{checkpoint.path} holds {len(saved_seeds)} random-generator "
                f"states; the model has {len(seeds)}."
            )
        for variable, (_, value) in zip(seeds, saved_seeds):
            variable.assign(value)
        saved = sorted(
            (int(k.split("/")[1]), v)
            for k, v in arrays.items()
            if k.startswith("optimizer/")
        )
        if len(saved) != len(optimizer.variables):
            raise ValueError(
                f"{checkpoint.path} holds {len(saved)} optimizer variables; the "
                f"optimizer of stage {_stage_name(model)!r} has "
                f"{len(optimizer.variables)}: the model or its stages differ "
                "from the run that wrote the checkpoint."
            )
        for variable, (_, value) in zip(optimizer.variables, saved):
            if tuple(variable.shape) != tuple(value.shape):
                raise ValueError(
                    f"{checkpoint.path}: optimizer variable {variable.path} has "
                    f"shape {tuple(variable.shape)}, saved {tuple(value.shape)}."
                )
            variable.assign(value)
        for variable, value in rates:
            variable.assign(value)
        return checkpoint.epoch

    # ------------------------------------------------------------- callbacks

    def checkpoint_callback(self, min_interval_seconds=0.0):
        return CheckpointCallback(self, min_interval_seconds)

    def nan_guard(self, advice=None):
        return NaNGuard(self, advice=advice)

    # ------------------------------------------------------------------- fit

    def fit(self, model, x, y, epochs, batch_size, seed=0, callbacks=(),
            validation_data=None, preprocess=None, stop_after=None, verbose=2,
            nan_advice=None, drop_remainder=True):
        """Restores the latest checkpoint and trains to `epochs`.

        The training data is `epoch_stream(x, y, batch_size, seed, ...)`;
        the checkpoint callback and the NaN guard come after `callbacks`.

        Args:
            model: the compiled model.
            x, y: the training arrays.
            epochs: the run's total epochs.
            stop_after: stop after this many epochs in all (an interrupted
                run, on purpose); default `epochs`.
            preprocess, drop_remainder: see `epoch_stream`.
            nan_advice: the last sentence of the NaN guard's message.

        Returns:
            `(history or None, initial_epoch)`: None when the checkpoint
            already had every epoch.
        """
        os.makedirs(self.model_dir, exist_ok=True)
        initial_epoch = self.restore(model)
        end = epochs if stop_after is None else min(int(stop_after), epochs)
        if initial_epoch >= end:
            return None, initial_epoch
        stream, steps = epoch_stream(
            x, y, batch_size, seed, initial_epoch, end, preprocess=preprocess,
            drop_remainder=drop_remainder,
        )
        history = model.fit(
            stream,
            epochs=end,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            validation_data=validation_data,
            shuffle=False,
            callbacks=list(callbacks)
            + [self.nan_guard(nan_advice), self.checkpoint_callback()],
            verbose=verbose,
        )
        return history, initial_epoch


class CheckpointCallback(keras.callbacks.Callback):
    """Saves a `ResumableRun` checkpoint at the end of epochs, unless a
    training loss of the epoch or a weight is NaN/inf (the last good one is
    kept).

    Args:
        run: the `ResumableRun`.
        min_interval_seconds: with epochs of a fraction of a second (a GPU),
            writing and verifying a checkpoint every epoch costs more than
            the epoch: then an epoch's checkpoint is written only when this
            many seconds have passed since the last one, and always after
            the last epoch of `fit` (also one stopped early by a callback).
            An interruption then loses at most this much training. 0 (the
            default): every epoch.
    """

    def __init__(self, run, min_interval_seconds=0.0):
        super().__init__()
        if not min_interval_seconds >= 0:
            raise ValueError(f"min_interval_seconds must be >= 0; got {min_interval_seconds}.")
        self.run = run
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
        weight = _non_finite_weight(self.model)  # only when writing: it reads every weight
        if weight is not None:
            self._skip(f"weight {weight} is not finite", epoch)
            return
        self.last = self.run.save(self.model, epoch + 1, logs)
        self._last_time = _clock()


class NaNGuard(StopOnNonFiniteLoss):
    """`keras_fsp.callbacks.StopOnNonFiniteLoss` that also names the run's
    last good checkpoint, which is left untouched: nothing is saved after
    the bad batch; it also stops at the end of an epoch that leaves a weight
    or the validation loss NaN or infinite (with every training loss finite,
    the last update can).

    Args:
        run: the `ResumableRun` whose checkpoints the message names (optional).
        advice: the message's last sentence.
    """

    def __init__(self, run=None, advice=None):
        super().__init__(advice=advice)
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        # The last update of an epoch can leave weights NaN, or so large that
        # the validation loss is NaN, while every training loss was finite:
        # stop here (before the checkpoint callback), or the run would end
        # "complete" with a broken network.
        weight = _non_finite_weight(self.model)
        bad = non_finite_term(logs, ["val_loss"])
        if weight is not None:
            self.stop(f"weight {weight} became NaN or infinite", f"at the end of epoch {epoch + 1}")
        if bad is not None:
            self.stop(f"val_loss became {bad[1]}", f"at the end of epoch {epoch + 1}")

    def kept(self):
        ckpt = self.run.latest() if self.run is not None else None
        if ckpt is not None:
            return f"the last good checkpoint (epoch {ckpt.epoch}) is kept in {ckpt.path}"
        if self.run is not None:
            return f"no checkpoint had been written yet in {self.run.checkpoint_dir}"
        return "no checkpoint was written"


# -------------------------------------------------------------------- data


def steps_per_epoch(num_examples, batch_size, drop_remainder=True):
    """Batches per epoch of `epoch_stream`."""
    if drop_remainder and num_examples >= batch_size:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def epoch_stream(x, y, batch_size, seed, initial_epoch, epochs, preprocess=None,
                 drop_remainder=True):
    """The training batches of epochs `initial_epoch .. epochs - 1`.

    Epoch `e` visits the examples in a permutation that depends only on
    `(seed, e)` (a stateless random draw), so a run resumed at epoch `e`
    sees exactly the batches the uninterrupted run saw. Use with
    `fit(stream, epochs=epochs, initial_epoch=initial_epoch,
    steps_per_epoch=steps)`; Keras then keeps one iterator over all epochs.

    Args:
        x, y: arrays with the same first dimension.
        batch_size: examples per batch; the last batch of an epoch may be
            smaller.
        seed: the run's seed.
        preprocess: optional TensorFlow function applied to each `x` batch
            (e.g. normalisation).
        drop_remainder: leave out each epoch's last, smaller batch (another
            example is left out each epoch), as `keras_fsp.inputs.DeviceArrays`
            does: one batch shape, so the train step is traced once. Ignored
            when there are fewer examples than `batch_size`.

    Returns:
        `(dataset, steps_per_epoch)`.
    """
    import tensorflow as tf

    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples and y {len(y)}.")
    if n == 0:
        raise ValueError("No training examples.")
    steps = steps_per_epoch(n, batch_size, drop_remainder)
    drop = steps * batch_size <= n
    x_t = tf.constant(x)
    y_t = tf.constant(y)

    def one_epoch(epoch):
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
        order = tf.argsort(tf.random.stateless_uniform([n], seed=key), stable=True)
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop)

    def gather(index):
        xb = tf.gather(x_t, index)
        if preprocess is not None:
            xb = preprocess(xb)
        return xb, tf.gather(y_t, index)

    dataset = (
        tf.data.Dataset.range(int(initial_epoch), int(epochs))
        .flat_map(one_epoch)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(2)
    )
    return dataset, steps


class MetricsCSV(keras.callbacks.Callback):
    """Per-epoch logs in a CSV file, one row per epoch, safe across stages and
    resumption.

    Keras' `CSVLogger` fixes its columns at the first epoch, so the columns
    of a later stage (the task stage's `accuracy` after an FSP stage) are
    dropped, and rows appended after a resume in another stage fall under the
    wrong header. This callback rewrites the file (atomically) at each epoch
    end with the union of the columns seen, a `stage` column, and the rows of
    earlier epochs only: an epoch that runs again after a resume replaces
    its row.
    """

    def __init__(self, path):
        super().__init__()
        self.path = str(path)

    def _read(self):
        import csv

        if not os.path.isfile(self.path):
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def on_epoch_end(self, epoch, logs=None):
        import csv
        import io

        rows = []
        for row in self._read():
            try:
                if int(row.get("epoch", "")) < epoch:
                    rows.append(row)
            except ValueError:
                continue
        row = {"epoch": epoch}
        stage = _stage_name(self.model)
        if stage is not None:
            row["stage"] = stage
        for k, v in sorted((logs or {}).items()):
            f = _to_float(v)
            if f is not None:
                row[k] = repr(f)
        rows.append(row)
        columns = ["epoch"]
        for r in rows:
            columns += [k for k in r if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())


def truncate_csv(path, epochs_done):
    """Keeps the header and the rows of epochs `< epochs_done` of a Keras
    `CSVLogger` file (rows of an epoch that was re-run after a resume go)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        return
    kept = [lines[0]]
    for line in lines[1:]:
        head = line.split(",", 1)[0]
        try:
            if int(head) < epochs_done:
                kept.append(line)
        except ValueError:
            continue
    atomic_write_text(path, "\n".join(kept) + "\n")
