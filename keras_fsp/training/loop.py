"""The one training loop: the command line, the examples, the demo, the
recipes' users and the benchmarks all train through `train`.

    result = keras_fsp.training.train(recipe, (x_train, y_train), (x_test, y_test),
                                      "runs/kd-seed0", batch_size=128, seed=0)

A run lives in its folder (`keras_fsp.training.RunFolder`): checkpoints,
`metrics.csv`, `log.txt` and, once `train` returns, `metrics.json` (the
result) and the trained network. Calling `train` again on the same folder
continues from the last checkpoint and ends with the weights an
uninterrupted run would have.

Data: arrays already normalised. On JAX accelerators the training set is
held on the device (`keras_fsp.inputs.DeviceArrays`) and each epoch runs in
one compiled loop (`keras_fsp.jax_steps`); elsewhere `epoch_stream` feeds
it. Either way epoch `e`'s order depends on `(seed, e)` only.
"""

import math
import time

import keras
import numpy as np

from keras_fsp.callbacks import NonFiniteLossError
from keras_fsp.export import deployable, export_student, float32_copy
from keras_fsp.teacher_precision import precision_of
from keras_fsp.training import callbacks as run_callbacks
from keras_fsp.training.device import device_name, on_accelerator
from keras_fsp.training.curves import draw_curves
from keras_fsp.training.files import write_weights
from keras_fsp.training.run_folder import (CURVES, SAVED_MODEL, TENSORBOARD, RunFolder,
                                           keras_file, weights_file)
from keras_fsp.training.scores import accuracy_and_loss

# Default least time between two checkpoints on a GPU or TPU (see `train`).
ACCELERATOR_CHECKPOINT_SECONDS = 30.0


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


def _tensorboard(folder):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError(
            "TensorBoard logs need the tensorboard package (TensorFlow 2.21 does not bring "
            "it): pip install 'keras-fsp[tensorboard]'."
        ) from None
    return keras.callbacks.TensorBoard(folder.file(TENSORBOARD))


def _saved_model(net, folder, normalization):
    """`{"saved_model": path}` of the network as a SavedModel (TensorFlow
    only; taking raw inputs with `normalization`), replacing an earlier one
    only once the new one is complete."""
    if keras.backend.backend() != "tensorflow":
        return {}
    if normalization is not None:
        net = deployable(net, *normalization)
    return {"saved_model": export_student(net, folder.file(SAVED_MODEL), overwrite=True)}


def _fingerprint(model):
    """A cheap summary of a model's weights, to see whether they changed."""
    return [float(np.sum(np.abs(keras.ops.convert_to_numpy(v)), dtype="float64"))
            for v in model.weights]


def _teaching(teacher):
    """The teacher as its accuracy is reported: in float32 (a mixed policy's
    float32 variables lose nothing), or in the lower precision it teaches in
    (`keras_fsp.teacher_precision`: its weights are rounded or quantized)."""
    return teacher if precision_of(teacher) else float32_copy(teacher)


def train(recipe, train_data, test_data, run_dir, batch_size=128, seed=0, epochs=None,
          max_minutes=None, validation_every=None, extra_tests=None, save_name="student",
          log=None, verbose=2, nan_advice=None, callbacks=(), record_kernel_norms=False,
          tensorboard=False, fields=None, compile_kwargs=None, checkpoint_seconds=None,
          saved_model=False, started_at=None, scores=None, inputs_normalization=None):
    """Trains a `keras_fsp.papers.recipes.Recipe` resumably in `run_dir`.

    Args:
        recipe: the recipe (its model, epochs, stages and callbacks).
        train_data, test_data: `(x, y)` arrays, already normalised.
        run_dir: the run's folder, a path or a `RunFolder` (created); an
            earlier part's checkpoint there is resumed.
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
        scores: `scores(network) -> dict`, more entries of the result
            computed from the trained network (float32) at the end.
        save_name: file stem of the trained network (`student`, `teacher`).
        log: a `keras_fsp.training.Log` (default: one writing the folder's
            `log.txt`; a log with no file yet is opened there).
        verbose: 1: a progress bar per epoch; 2: a line per epoch; 0:
            nothing shown (every epoch's line is in the log at every level).
        nan_advice: the last sentence of the message when a loss turns NaN.
        callbacks: more callbacks, after the recipe's.
        record_kernel_norms: log the student's kernel-norm ratios per epoch.
        tensorboard: also write TensorBoard logs (needs `tensorboard`).
        fields: more entries of the result.
        compile_kwargs: more arguments of `recipe.compile`.
        checkpoint_seconds: write an epoch's checkpoint only when this many
            seconds have passed since the last one (and always at the end):
            an interruption loses at most this much training. Default: every
            epoch on the CPU, every `ACCELERATOR_CHECKPOINT_SECONDS` on a GPU
            or TPU, where an epoch of CIFAR takes under a second and writing
            and verifying a checkpoint would take longer.
        saved_model: also export the complete network as a SavedModel
            (TensorFlow only).
        inputs_normalization: `(mean, std)` the data was normalised with:
            the SavedModel then takes raw inputs and normalises them itself
            (`keras_fsp.export.deployable`), and the result records them.
        started_at: `time.time()` when the work of the run began (loading
            data, building networks), for the result's `seconds`; default
            now.

    Returns:
        the result dict, also written to the folder's `metrics.json` (once):
        `test_accuracy`, `test_loss`, `test_errors`, `epochs_done`,
        `epochs_total`, `complete`, `train_seconds` (every part), `seconds`
        (this call, end to end), `history` (per epoch), `stages`,
        `teacher_test_accuracy`, `files`, ...

    Raises:
        keras_fsp.callbacks.NonFiniteLossError: a loss term became NaN or
            infinite; `metrics.json` then says so (`"diverged"`), and the
            last good checkpoint is kept.
        OSError: the run's folder cannot be written (disk full, not
            writable, vanished); the last good checkpoint is kept.
        keras_fsp.training.run_folder.FolderBusyError: another process
            trains in `run_dir`.
    """
    started_at = time.time() if started_at is None else started_at
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    with folder.lock("keras_fsp.training.train"):  # one process at a time in a run folder
        log = folder.open_log(log)
        x_train, y_train = train_data
        steps = steps_per_epoch(len(x_train), batch_size)
        compile_kwargs = dict(compile_kwargs or {})
        if on_accelerator():  # one compiled loop per epoch
            compile_kwargs.setdefault("steps_per_execution", steps)
        recipe.compile(metrics=["accuracy"], **compile_kwargs)

        checkpoints = folder.checkpoints(log=log)  # skipped checkpoints are logged
        teacher = getattr(recipe.model, "teacher", None)
        given = _fingerprint(teacher) if teacher is not None and checkpoints.latest() else None
        initial_epoch = checkpoints.restore(recipe.model)
        if given is not None and initial_epoch and _fingerprint(teacher) != given:
            log("the teacher's weights come from the checkpoint: the teacher given differs from "
                "the one this run started with")
        total = recipe.epochs
        end = total if epochs is None else min(int(epochs), total)
        earlier_seconds = folder.earlier_train_seconds() if initial_epoch else 0.0
        folder.keep_metrics_before(initial_epoch)
        if initial_epoch:
            log(f"resuming at epoch {initial_epoch} of {total}")

        deadline = run_callbacks.Deadline(max_minutes)
        every = validation_every or max(1, total // 8)
        validated = [e for e in range(1, end + 1) if e % every == 0 or e == total]
        all_callbacks = ([run_callbacks.Validation(recipe.student, test_data, validated)]
                         + list(recipe.callbacks) + list(callbacks))
        if record_kernel_norms:
            all_callbacks.append(run_callbacks.KernelNormLog(recipe.student))
        if tensorboard:
            all_callbacks.append(_tensorboard(folder))
        if checkpoint_seconds is None:
            checkpoint_seconds = ACCELERATOR_CHECKPOINT_SECONDS if on_accelerator() else 0.0
        all_callbacks += [run_callbacks.MetricsCSV(folder),
                          run_callbacks.EpochLog(log, total, verbose), deadline,
                          run_callbacks.NaNGuard(checkpoints, advice=nan_advice),
                          run_callbacks.CheckpointCallback(checkpoints, checkpoint_seconds)]
        if verbose == 1:
            all_callbacks.append(run_callbacks.ProgressBar(total))
        start = time.time()
        diverged = None
        if initial_epoch < end:
            if on_accelerator():
                from keras_fsp.inputs import DeviceArrays

                data = dict(x=DeviceArrays(x_train, y_train, batch_size=batch_size, seed=seed,
                                           initial_epoch=initial_epoch,
                                           drop_remainder=len(x_train) >= batch_size))
            else:
                stream, _ = epoch_stream(x_train, y_train, batch_size, seed, initial_epoch, end)
                data = dict(x=stream, steps_per_epoch=steps)
            try:
                recipe.model.fit(
                    **data, epochs=end, initial_epoch=initial_epoch, shuffle=False,
                    callbacks=all_callbacks, verbose=0,  # EpochLog and ProgressBar show it
                )
            except NonFiniteLossError as e:
                diverged = str(e)
        seconds = earlier_seconds + time.time() - start
        folder.write_train_seconds(seconds)

        history = folder.history()
        done = max(len(history.get("epoch", [])), initial_epoch)
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
            "steps_per_epoch": steps,
            "batch_size": batch_size,
            "parameters": int(net.count_params()),
            "train_seconds": round(seconds, 1),
            "backend": keras.backend.backend(),
            "device": device_name(),
            "history": history,
            "inputs_normalization": None if inputs_normalization is None else {
                "mean": [float(v) for v in np.ravel(inputs_normalization[0])],
                "std": [float(v) for v in np.ravel(inputs_normalization[1])]},
            **(fields or {}),
        }
        result["teacher_test_accuracy"] = (
            None if teacher is None else accuracy_and_loss(_teaching(teacher), *test_data)["accuracy"])
        for name, (x, y) in (extra_tests or {}).items():
            result[f"{name}_accuracy"] = accuracy_and_loss(scored, x, y)["accuracy"]
        if scores is not None:
            result.update(scores(scored))
        weights = folder.file(weights_file(save_name))
        write_weights(net, weights)  # not save_weights: h5py must not meet a full disk
        result["files"] = {"weights": weights}
        if result["complete"]:  # replaced only once complete; a failed write leaves nothing
            result["files"]["keras"] = export_student(
                net, folder.file(keras_file(save_name)), format="keras", overwrite=True)
            if saved_model:
                result["files"].update(_saved_model(net, folder, inputs_normalization))
        curves = draw_curves(history, folder.file(CURVES), result["teacher_test_accuracy"],
                             title=f"{recipe.name}: test accuracy {test['accuracy']:.4f}")
        if curves is not None:
            result["files"]["curves"] = curves
        result["seconds"] = round(time.time() - started_at, 1)
        folder.write_result(result)
        log(f"test accuracy {result['test_accuracy']:.4f} ({result['test_errors']} errors) after "
            f"{done}/{total} epochs, {seconds:.0f} s; outputs in {folder.path}")
        if diverged is not None:
            log(f"error: {diverged}")
            raise NonFiniteLossError(diverged)
        return result
