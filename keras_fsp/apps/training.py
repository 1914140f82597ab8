"""The training harness that the command line, the examples and the demo
share: resumable per-epoch checkpoints, a wall-time deadline, a NaN stop,
per-epoch metrics (CSV and JSON), a log file, and the result files.

    result = training.train(recipe, (x_train, y_train), (x_test, y_test),
                            "runs/kd-seed0", batch_size=128, seed=0)

A run lives in its folder: `checkpoints/` (the latest intact epochs),
`metrics.csv` (one row per epoch, every stage's terms), `log.txt`, and, once
`train` returns, `metrics.json` (the result below) and the trained network's
weights (`<name>.weights.h5`, and `<name>.keras` when complete). Calling
`train` again on the same folder continues from the last checkpoint and ends
with the weights an uninterrupted run would have.

Data: arrays already normalised. On JAX accelerators the training set is
held on the device (`keras_fsp.inputs.DeviceArrays`) and each epoch runs in
one compiled loop (`keras_fsp.jax_steps`); elsewhere `runs.epoch_stream`
feeds it. Either way epoch `e`'s order depends on `(seed, e)` only.
"""

import csv
import json
import os
import time

import keras
import numpy as np

from keras_fsp.apps import runs
from keras_fsp.callbacks import NonFiniteLossError
from keras_fsp.export import export_student, float32_copy

RESULT_FILE = "metrics.json"
METRICS_FILE = "metrics.csv"
LOG_FILE = "log.txt"
# Default least time between two checkpoints on a GPU or TPU (see `train`).
ACCELERATOR_CHECKPOINT_SECONDS = 30.0


class Log:
    """Lines to stdout and, once a file is opened, to that file too."""

    def __init__(self, path=None, echo=True):
        self.path, self.echo, self.pending = None, echo, []
        if path is not None:
            self.open(path)

    def open(self, path):
        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for line in self.pending:
            self._write(line)
        self.pending = []

    def _write(self, line):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def __call__(self, message, echo=None):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        if self.echo if echo is None else echo:
            print(message, flush=True)
        if self.path is None:
            self.pending.append(line)
        else:
            self._write(line)


class _EpochLog(keras.callbacks.Callback):
    def __init__(self, log, total, echo):
        super().__init__()
        self.log, self.total, self.echo = log, total, echo

    def on_epoch_end(self, epoch, logs=None):
        stage = getattr(getattr(self.model, "stage", None), "name", None)
        values = " ".join(
            f"{k}={float(v):.4g}" for k, v in sorted((logs or {}).items())
            if isinstance(v, (int, float)) or hasattr(v, "__float__")
        )
        where = f" [{stage}]" if stage else ""
        self.log(f"epoch {epoch + 1}/{self.total}{where} {values}", echo=self.echo)


class _Validation(keras.callbacks.Callback):
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


class _Deadline(keras.callbacks.Callback):
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
        from keras_fsp.kernel_norms import kernel_norms

        self.net, self.norms, self.initial = net, kernel_norms, kernel_norms(net)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.initial:
            ratios = [n / self.initial[k] for k, n in self.norms(self.net).items()]
            logs["kernel_norm_ratio_median"] = float(np.median(ratios))
            logs["kernel_norm_ratio_max"] = float(np.max(ratios))


def device_name():
    """The accelerator training runs on, e.g. "NVIDIA H100 80GB HBM3", or "cpu"."""
    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        return device.device_kind if device.platform != "cpu" else "cpu"
    return "cpu"


def on_accelerator():
    """Whether training runs on JAX with a GPU or TPU."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() != "cpu"


def use_compilation_cache(path):
    """On JAX, keeps XLA's compiled programs in `path` (JAX's persistent
    compilation cache), so that a later run of the same networks (another
    seed, a resumed run, the next method of a table) loads them instead of
    compiling again: on a GPU compilation is a sizeable part of a short
    run (BENCHMARKS.md). A cache the user configured is left as it is. Call
    it before anything is compiled: JAX decides at the first compilation
    whether the process uses a cache.

    Returns the cache folder in use, or None."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current or not path:
        return current or None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program, not only those over JAX's default second: the many small
    # ones (weight initialisers, one per shape) add up to seconds on a GPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def read_history(path):
    """`{column: [values per epoch]}` from a run's metrics.csv (floats; an
    epoch without a value in a column has None there)."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    history = {}
    for key in (rows[0] if rows else {}):
        values = []
        for row in rows:
            raw = row.get(key, "")
            if key == "stage":
                values.append(raw or None)
                continue
            try:
                values.append(float(raw))
            except ValueError:
                values.append(None)
        history[key] = values
    return history


def accuracy_and_loss(model, x, y, batch_size=1000):
    """Test accuracy and mean cross-entropy of a model returning logits (or
    probabilities, from a final softmax)."""
    from keras_fsp import taps

    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype="float64")
    y = np.asarray(y).reshape(-1)
    if taps.ends_in_softmax(model):
        log_probs = np.log(np.clip(out, 1e-30, 1.0))
    else:
        shifted = out - out.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {
        "accuracy": float(np.mean(np.argmax(out, axis=1) == y)),
        "loss": float(-np.mean(log_probs[np.arange(len(y)), y])),
        "errors": int(np.sum(np.argmax(out, axis=1) != y)),
        "examples": int(len(y)),
    }


def _write_json(path, obj):
    runs.atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_result(run_dir, result):
    """Writes `result` as the run's `metrics.json` (atomically)."""
    _write_json(os.path.join(run_dir, RESULT_FILE), result)


def train(recipe, train_data, test_data, run_dir, batch_size=128, seed=0, epochs=None,
          max_minutes=None, validation_every=None, extra_tests=None, save_name="student",
          log=None, verbose=2, nan_advice=None, callbacks=(), record_kernel_norms=False,
          tensorboard=False, fields=None, compile_kwargs=None, checkpoint_seconds=None):
    """Trains a `keras_fsp.papers.recipes.Recipe` resumably in `run_dir`.

    Args:
        recipe: the recipe (its model, epochs, stages and callbacks).
        train_data, test_data: `(x, y)` arrays, already normalised.
        run_dir: the run's folder (created); an earlier part's checkpoint
            there is resumed.
        batch_size: training batch size (each epoch drops the last partial
            batch: one batch shape, one compiled step).
        seed: seed of the data order (the model's weights are made by the
            caller).
        epochs: stop after this many epochs in all (default: the recipe's);
            calling again without it continues.
        max_minutes: stop after the epoch that passes this wall time.
        validation_every: score the trained network alone on `test_data`
            every this many epochs (`val_accuracy`, and `val_loss`: mean
            cross-entropy; default about eight times per run, and at the end).
        extra_tests: `{name: (x, y)}` more test sets to score at the end.
        save_name: file stem of the trained network's weights.
        log: a `Log` (default: one writing `log.txt` in `run_dir`).
        verbose: Keras `fit` verbosity.
        nan_advice: the last sentence of the message when a loss turns NaN.
        callbacks: more callbacks, after the recipe's.
        record_kernel_norms: log the student's kernel-norm ratios per epoch.
        tensorboard: also write TensorBoard logs into `run_dir/tensorboard`
            (needs the `tensorboard` package).
        fields: more entries of the result.
        compile_kwargs: more arguments of `recipe.compile`.
        checkpoint_seconds: write an epoch's checkpoint only when this many
            seconds have passed since the last one (and always at the end):
            an interruption loses at most this much training. Default: every
            epoch on the CPU, every `ACCELERATOR_CHECKPOINT_SECONDS` on a GPU
            or TPU, where an epoch of CIFAR takes under a second and writing
            and verifying a checkpoint would take longer.

    Returns:
        the result dict, also written to `run_dir/metrics.json`:
        `test_accuracy`, `test_loss`, `test_errors`, `epochs_done`,
        `epochs_total`, `complete`, `train_seconds` (every part),
        `history` (per epoch), `stages`, `teacher_test_accuracy`, ...

    Raises:
        keras_fsp.callbacks.NonFiniteLossError: a loss term became NaN or
            infinite; `metrics.json` then says so (`"diverged"`), and the
            last good checkpoint is kept.
        OSError: the run's folder cannot be written (disk full, not
            writable, vanished); the last good checkpoint is kept.
    """
    os.makedirs(run_dir, exist_ok=True)
    log = log or Log(os.path.join(run_dir, LOG_FILE))
    x_train, y_train = train_data
    steps_per_epoch = runs.steps_per_epoch(len(x_train), batch_size)
    compile_kwargs = dict(compile_kwargs or {})
    if on_accelerator():  # one compiled loop per epoch
        compile_kwargs.setdefault("steps_per_execution", steps_per_epoch)
    recipe.compile(metrics=["accuracy"], **compile_kwargs)

    run = runs.ResumableRun(run_dir, log=log)  # skipped checkpoints are logged
    initial_epoch = run.restore(recipe.model)
    total = recipe.epochs
    end = total if epochs is None else min(int(epochs), total)
    state_path = os.path.join(run_dir, ".parts.json")
    earlier_seconds = 0.0
    if initial_epoch and os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            earlier_seconds = float(json.load(f).get("train_seconds", 0.0))
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    runs.truncate_csv(metrics_path, initial_epoch)
    if initial_epoch:
        log(f"resuming at epoch {initial_epoch} of {total}")

    deadline = _Deadline(max_minutes)
    every = validation_every or max(1, total // 8)
    validated = [e for e in range(1, end + 1) if e % every == 0 or e == total]
    all_callbacks = ([_Validation(recipe.student, test_data, validated)]
                     + list(recipe.callbacks) + list(callbacks))
    if record_kernel_norms:
        all_callbacks.append(KernelNormLog(recipe.student))
    if tensorboard:
        all_callbacks.append(_tensorboard(run_dir))
    if checkpoint_seconds is None:
        checkpoint_seconds = ACCELERATOR_CHECKPOINT_SECONDS if on_accelerator() else 0.0
    all_callbacks += [runs.MetricsCSV(metrics_path), _EpochLog(log, total, echo=not verbose),
                      deadline, run.nan_guard(nan_advice),
                      run.checkpoint_callback(checkpoint_seconds)]
    start = time.time()
    diverged = None
    if initial_epoch < end:
        if on_accelerator():
            from keras_fsp.inputs import DeviceArrays

            data = dict(x=DeviceArrays(x_train, y_train, batch_size=batch_size, seed=seed,
                                       initial_epoch=initial_epoch,
                                       drop_remainder=len(x_train) >= batch_size))
        else:
            stream, _ = runs.epoch_stream(x_train, y_train, batch_size, seed, initial_epoch, end)
            data = dict(x=stream, steps_per_epoch=steps_per_epoch)
        try:
            recipe.model.fit(
                **data, epochs=end, initial_epoch=initial_epoch, shuffle=False,
                callbacks=all_callbacks, verbose=verbose,
            )
        except NonFiniteLossError as e:
            diverged = str(e)
    seconds = earlier_seconds + time.time() - start
    _write_json(state_path, {"train_seconds": seconds})

    history = read_history(metrics_path)
    done = len(history.get("epoch", [])) if history else initial_epoch
    done = max(done, initial_epoch)
    net = recipe.student
    # Scored as exported: in float32 whatever the dtype policy it trained under.
    scored = float32_copy(net)
    test = accuracy_and_loss(scored, *test_data)
    result = {
        "name": recipe.name,
        "seed": seed,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_errors": test["errors"],
        "test_examples": test["examples"],
        "epochs_done": done,
        "epochs_total": total,
        "complete": done >= total and diverged is None,
        "initial_epoch": initial_epoch,
        "stopped_by_deadline": deadline.reached,
        "diverged": diverged,
        "stages": {str(e): s.name for e, s in sorted(recipe.schedule.items())},
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        "parameters": int(net.count_params()),
        "train_seconds": round(seconds, 1),
        "backend": keras.backend.backend(),
        "device": device_name(),
        "history": history,
        **(fields or {}),
    }
    teacher = getattr(recipe.model, "teacher", None)
    result["teacher_test_accuracy"] = (
        None if teacher is None else accuracy_and_loss(float32_copy(teacher), *test_data)["accuracy"])
    for name, (x, y) in (extra_tests or {}).items():
        result[f"{name}_accuracy"] = accuracy_and_loss(scored, x, y)["accuracy"]
    weights = os.path.join(run_dir, f"{save_name}.weights.h5")
    runs.write_weights(net, weights)  # not save_weights: h5py must not meet a full disk
    result["files"] = {"weights": weights}
    if result["complete"]:  # replaced only once complete; a failed write leaves nothing
        result["files"]["keras"] = export_student(
            net, os.path.join(run_dir, f"{save_name}.keras"), format="keras", overwrite=True)
    write_result(run_dir, result)
    log(f"test accuracy {result['test_accuracy']:.4f} ({result['test_errors']} errors) after "
        f"{done}/{total} epochs, {seconds:.0f} s; outputs in {run_dir}")
    if diverged is not None:
        log(f"error: {diverged}")
        raise NonFiniteLossError(diverged)
    return result


def _tensorboard(run_dir):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError(
            "TensorBoard logs need the tensorboard package (TensorFlow 2.21 does not bring "
            "it): pip install 'keras-fsp[tensorboard]'."
        ) from None
    return keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"))
