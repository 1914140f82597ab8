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

Checkpoints are written atomically: into a temporary folder beside the
final one, every file flushed to disk, then renamed; the previous checkpoint
is deleted only after the new one is complete, so a kill at any moment
leaves a loadable checkpoint.

The checkpoint files are backend-agnostic (Keras weights, NumPy arrays,
JSON); `epoch_stream` builds a `tf.data` pipeline (TensorFlow is imported when
it is called), which Keras' TensorFlow and JAX trainers both accept.
"""

import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings

import keras
import numpy as np

from keras_fsp.callbacks import NonFiniteLossError, StopOnNonFiniteLoss, non_finite_term  # noqa: F401

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
WEIGHTS_FILE = "model.weights.h5"
STATE_FILE = "state.npz"
INFO_FILE = "state.json"
FORMAT_VERSION = 1

_NAME = re.compile(r"^epoch-(\d{6,})$")


# --------------------------------------------------------------- filesystem


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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


def atomic_write_text(path, text):
    """Writes `text` to `path` atomically (temporary file, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 otherwise
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


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
    for variable in model.weights:
        if not np.all(np.isfinite(keras.ops.convert_to_numpy(variable))):
            return variable.path
    return None


def _stage_name(model):
    stage = getattr(model, "stage", None)
    return getattr(stage, "name", None)


def _seed_states(model):
    """The `SeedGenerator` states inside `model` (not in `model.weights`)."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


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


class Checkpoint:
    """A complete checkpoint on disk: `epoch` epochs done, in `stage`."""

    def __init__(self, path, info):
        self.path = path
        self.info = info
        self.epoch = int(info["epoch"])
        self.stage = info.get("stage")

    def __repr__(self):
        return f"Checkpoint(epoch={self.epoch}, stage={self.stage!r}, path={self.path!r})"


class ResumableRun:
    """Per-epoch atomic checkpoints in `model_dir/checkpoints/`, and resumption.

    Args:
        model_dir: the run's folder.
        keep: how many of the latest checkpoints to keep (at least 1; the
            previous one is deleted only once the new one is complete).

    Layout: `checkpoints/epoch-000007/` holds `model.weights.h5`,
    `state.npz` (optimizer variables, random-generator states) and
    `state.json` (epoch, stage, logs); `checkpoints/latest` names the newest.
    """

    def __init__(self, model_dir, keep=2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}.")
        self.model_dir = str(model_dir)
        self.checkpoint_dir = os.path.join(self.model_dir, CHECKPOINT_DIR)
        self.keep = int(keep)

    # ---------------------------------------------------------------- lookup

    def _load_info(self, path):
        try:
            with open(os.path.join(path, INFO_FILE), encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or "epoch" not in info:
            return None
        for name in (WEIGHTS_FILE, STATE_FILE):
            if not os.path.isfile(os.path.join(path, name)):
                return None
        return info

    def checkpoints(self):
        """The complete checkpoints, oldest first."""
        if not os.path.isdir(self.checkpoint_dir):
            return []
        found = []
        for name in os.listdir(self.checkpoint_dir):
            if _NAME.match(name):
                path = os.path.join(self.checkpoint_dir, name)
                info = self._load_info(path)
                if info is not None:
                    found.append(Checkpoint(path, info))
        return sorted(found, key=lambda c: c.epoch)

    def latest(self):
        """The newest complete checkpoint, or None.

        Follows `checkpoints/latest`; if that is missing or names a folder
        that is not a complete checkpoint, the newest complete one found.
        """
        pointer = os.path.join(self.checkpoint_dir, LATEST)
        try:
            with open(pointer, encoding="utf-8") as f:
                name = f.read().strip()
        except OSError:
            name = None
        if name and _NAME.match(name):
            path = os.path.join(self.checkpoint_dir, name)
            info = self._load_info(path)
            if info is not None:
                return Checkpoint(path, info)
        found = self.checkpoints()
        return found[-1] if found else None

    def _remove_partial(self):
        """Deletes temporary folders left by writes that were killed."""
        if not os.path.isdir(self.checkpoint_dir):
            return
        for name in os.listdir(self.checkpoint_dir):
            if name.startswith(".tmp-"):
                path = os.path.join(self.checkpoint_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.remove(path)
                    except OSError:
                        pass

    # ------------------------------------------------------------------ save

    def save(self, model, epoch, logs=None, extra=None):
        """Writes the checkpoint for `epoch` completed epochs, atomically.

        Args:
            model: the compiled model (an `FSPDistiller` or any Keras model).
            epoch: the number of completed epochs (the next run's
                `initial_epoch`).
            logs: the epoch's logs, kept in `state.json`.
            extra: more JSON-serialisable facts for `state.json`.

        Returns:
            the `Checkpoint` written.
        """
        epoch = int(epoch)
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        self._remove_partial()
        name = f"epoch-{epoch:06d}"
        final = os.path.join(self.checkpoint_dir, name)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.checkpoint_dir)
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 otherwise
            optimizer = _optimizer_of(model)
            seeds = _seed_states(model)
            model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
            arrays = {}
            for i, v in enumerate(optimizer.variables):
                arrays[f"optimizer/{i}"] = np.asarray(keras.ops.convert_to_numpy(v))
            for i, v in enumerate(seeds):
                arrays[f"seed/{i}"] = np.asarray(keras.ops.convert_to_numpy(v))
            with open(os.path.join(tmp, STATE_FILE), "wb") as f:
                np.savez(f, **arrays)
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
            with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2)
            for entry in os.listdir(tmp):
                _fsync_file(os.path.join(tmp, entry))
            _fsync_dir(tmp)
            old = None
            if os.path.exists(final):  # the same epoch again (e.g. re-run)
                old = tempfile.mkdtemp(prefix=f".tmp-old-{name}-", dir=self.checkpoint_dir)
                os.rmdir(old)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.checkpoint_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(os.path.join(self.checkpoint_dir, LATEST), name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoints()[: -self.keep]:
            if stale.path != final:
                shutil.rmtree(stale.path, ignore_errors=True)
        return Checkpoint(final, info)

    # --------------------------------------------------------------- restore

    def restore(self, model, checkpoint=None):
        """Restores the latest (or the given) checkpoint into `model`.

        `model` must be built and compiled as it was when the checkpoint was
        written. An `FSPDistiller` is put in the checkpoint's stage
        (`set_stage`) and that stage's optimizer gets its saved state.

        Returns:
            the number of completed epochs (`initial_epoch` for `fit`), 0
            when there is no checkpoint.
        """
        self._remove_partial()
        checkpoint = checkpoint or self.latest()
        if checkpoint is None:
            return 0
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
        model.load_weights(os.path.join(checkpoint.path, WEIGHTS_FILE))
        with np.load(os.path.join(checkpoint.path, STATE_FILE)) as state:
            arrays = {k: state[k] for k in state.files}
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
        optimizer = _optimizer_of(model)
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
        return checkpoint.epoch

    # ------------------------------------------------------------- callbacks

    def checkpoint_callback(self):
        return CheckpointCallback(self)

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
    """Saves a `ResumableRun` checkpoint at the end of every epoch, unless a
    training loss of the epoch or a weight is NaN/inf (the last good one is
    kept)."""

    def __init__(self, run):
        super().__init__()
        self.run = run
        self.last = None

    def on_epoch_end(self, epoch, logs=None):
        bad = non_finite_term(logs)
        what = None if bad is None else f"{bad[0]} is {bad[1]}"
        if what is None:
            weight = _non_finite_weight(self.model)
            what = None if weight is None else f"weight {weight} is not finite"
        if what is not None:
            warnings.warn(
                f"{what} at the end of epoch {epoch + 1}: no checkpoint written; "
                "the last good one is kept.",
                stacklevel=2,
            )
            return
        self.last = self.run.save(self.model, epoch + 1, logs)


class NaNGuard(StopOnNonFiniteLoss):
    """`keras_fsp.callbacks.StopOnNonFiniteLoss` that also names the run's
    last good checkpoint, which is left untouched: nothing is saved after
    the bad batch.

    Args:
        run: the `ResumableRun` whose checkpoints the message names (optional).
        advice: the message's last sentence.
    """

    def __init__(self, run=None, advice=None):
        super().__init__(advice=advice)
        self.run = run

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
            example is left out each epoch), as
            `keras_fsp.apps.data.make_dataset` does in training: one batch shape,
            so the train step is traced once. Ignored when there are fewer
            examples than `batch_size`.

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
