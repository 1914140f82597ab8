"""What the example scripts share: normalisation, training a recipe with a
wall-time guard, and writing `<method>_seed<seed>.json` and `.weights.h5`."""

import json
import os
import time

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
FLAG_OPTIONS = dict(allow_override=True)  # the examples share flag names (absl flags are global)


def define_run_flags(out_dir, batch_size=128, data_file=None, schedules=True, resumable=False):
    """Defines the absl flags the example scripts share (all optional):
    `--seed --batch_size --out_dir --smoke`, with `data_file` `--data_dir`
    (the shared datasets folder), with `schedules` `--scale --max_minutes`,
    with `resumable` `--max_minutes --tag --resume`."""
    from absl import flags

    flags.DEFINE_integer("batch_size", batch_size, "Batch size.", **FLAG_OPTIONS)
    flags.DEFINE_integer("seed", 0, "Random seed.", **FLAG_OPTIONS)
    flags.DEFINE_string("out_dir", out_dir, "Where results and weights go.", **FLAG_OPTIONS)
    flags.DEFINE_bool("smoke", False, "Seconds-long run on random data (for tests).", **FLAG_OPTIONS)
    if data_file:
        flags.DEFINE_string("data_dir", SHARED_DATA,
                            f"Folder of the shared datasets.py and {data_file}.", **FLAG_OPTIONS)
    if schedules:
        flags.DEFINE_float("scale", 1.0, "Multiplies every iteration count of the schedules.", **FLAG_OPTIONS)
    if schedules or resumable:
        flags.DEFINE_float("max_minutes", None, "Stop after the epoch that passes this wall time "
                           "(the result then says completed: false).", **FLAG_OPTIONS)
    if resumable:
        flags.DEFINE_string("tag", "", "Suffix of the result's name: <method><tag>_seed<seed>.", **FLAG_OPTIONS)
        flags.DEFINE_bool("resume", False, "Checkpoint every epoch into <out_dir>/<name>.run/ and "
                          "go on from the latest checkpoint there (a run cut by --max_minutes "
                          "continues).", **FLAG_OPTIONS)


def define_stage1_flags():
    """The FSP recipes' stage-1 options as absl flags (default: the recipe's)."""
    from absl import flags

    flags.DEFINE_bool("restore_kernel_norms", None, "fsp/dense_fsp: rescale the student's "
                      "batch-normalised kernels to their initial norms when stage 2 starts.",
                      **FLAG_OPTIONS)
    flags.DEFINE_enum("stage1_optimizer", None, ["sgd", "adam"],
                      "fsp/dense_fsp: stage 1's optimizer, at the paper's rates.", **FLAG_OPTIONS)
    flags.DEFINE_float("stage1_clipnorm", None, "fsp/dense_fsp: clip stage 1's gradients to "
                       "this global norm (0: no clipping).", **FLAG_OPTIONS)


def stage1_options(restore_kernel_norms=None, stage1_optimizer=None, stage1_clipnorm=None):
    """The recipe keyword arguments for the stage-1 flags that were given
    (`stage1_clipnorm=0` asks for no clipping)."""
    options = {}
    if restore_kernel_norms is not None:
        options["restore_kernel_norms"] = restore_kernel_norms
    if stage1_optimizer is not None:
        options["stage1_optimizer"] = stage1_optimizer
    if stage1_clipnorm is not None:
        options["stage1_clipnorm"] = stage1_clipnorm or None
    return options


def normalizer(x_train):
    """Per-channel standardisation fitted on the training images."""
    channels = x_train.shape[-1]
    mean = x_train.reshape(-1, channels).mean(axis=0)
    std = x_train.reshape(-1, channels).std(axis=0)
    return lambda x: ((x.astype("float32") - mean) / std).astype("float32")


def fit_and_report(recipe, net, train, test, out_dir, method, seed, fields,
                   batch_size=128, max_minutes=None, extra_scores=None,
                   device_data=True, name=None, resume=False):
    """Compiles and fits `recipe`, scores `net` on `test`, writes the results.

    Args:
        recipe: a `keras_fsp.papers.recipes.Recipe`.
        net: the network to score and save (the student, or the teacher).
        train, test: `(x, y)` arrays, already normalised.
        fields: extra entries of the result (the script's settings).
        max_minutes: stop after the epoch that passes this wall time; the
            result then says `completed: false`.
        extra_scores: `{name: (x, y)}` more test sets, e.g. exact pixels.
        device_data: feed the training set from the device
            (`keras_fsp.inputs.DeviceArrays`) instead of host arrays.
        name: file stem of the result (default `<method>_seed<seed>`).
        resume: checkpoint every epoch into `<out_dir>/<name>.run/`
            (`keras_fsp.apps.runs.ResumableRun`) and continue from the latest
            checkpoint there: a run cut by `max_minutes` (or killed) goes on
            where it stopped when the same command runs again. The result's
            history and seconds cover every part: the epochs that
            followed the resumed checkpoint in an earlier part (a part
            killed, or stopped by a NaN loss) are dropped from it.

    Returns:
        the result dict (also written as `<out_dir>/<name>.json`, with the
        weights as `<out_dir>/<name>.weights.h5`).
    """
    import keras
    import numpy as np

    from keras_fsp.inputs import DeviceArrays
    from keras_fsp.kernel_norms import kernel_norms
    from keras_fsp.apps.runs import ResumableRun

    recipe.compile(metrics=["accuracy"])
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name or f"{method}_seed{seed}")
    initial_norms = kernel_norms(net)
    run, initial_epoch = None, 0
    before = {"epoch_logs": [], "train_seconds": 0.0}
    if resume:
        run = ResumableRun(stem + ".run")
        initial_epoch = run.restore(recipe.model)
        if initial_epoch and os.path.exists(stem + ".parts.json"):
            with open(stem + ".parts.json") as f:
                before = json.load(f)

    epoch_logs = []  # one dict per epoch of this part

    class _EpochLogs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            epoch_logs.append({k: float(v) for k, v in (logs or {}).items()})

    class _KernelNorms(keras.callbacks.Callback):
        """Logs how far the batch-normalised kernels are from their initial norms."""

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None and initial_norms:
                ratios = [n / initial_norms[k] for k, n in kernel_norms(net).items()]
                logs["kernel_norm_ratio_median"] = float(np.median(ratios))
                logs["kernel_norm_ratio_max"] = float(np.max(ratios))

    diverged = []

    class _Deadline(keras.callbacks.Callback):
        """Stops at the wall-time limit, and after an epoch whose loss is
        NaN/inf (checked per epoch: a per-batch check syncs the device)."""

        def on_epoch_end(self, epoch, logs=None):
            if max_minutes and time.time() - start > 60 * max_minutes:
                self.model.stop_training = True
            if logs and not np.isfinite(float(logs.get("loss", 0.0))):
                diverged.append(epoch + 1)
                self.model.stop_training = True

    if device_data:  # a resumed part draws new permutations, not the first part's again
        data = dict(x=DeviceArrays(*train, batch_size=batch_size, seed=seed + 1000 * initial_epoch))
    else:
        data = dict(x=train[0], y=train[1], batch_size=batch_size)
    callbacks = [_KernelNorms(), _EpochLogs(), _Deadline()]
    callbacks += [run.checkpoint_callback()] if run else []
    if initial_epoch < recipe.epochs:
        recipe.fit(**data, validation_data=test, initial_epoch=initial_epoch,
                   validation_freq=max(1, recipe.epochs // 8), callbacks=callbacks, verbose=2)
    seconds = time.time() - start + before["train_seconds"]
    # The epochs before the restored checkpoint, then this part's.
    earlier = before["epoch_logs"][:initial_epoch]
    history_complete = len(earlier) == initial_epoch
    all_logs = earlier + epoch_logs
    if resume:
        with open(stem + ".parts.json", "w") as f:
            json.dump({"epoch_logs": all_logs, "train_seconds": seconds}, f)
    history = {}  # per key; validation entries are sparse (validation_freq)
    for logs in all_logs:
        for k, v in logs.items():
            history.setdefault(k, []).append(v)

    def accuracy(x, y):
        return float((net.predict(x, batch_size=1000, verbose=0).argmax(-1) == y).mean())

    epochs_run = initial_epoch + len(epoch_logs)
    result = {
        "method": method, "seed": seed, **fields, "epochs": recipe.epochs,
        "stage_epochs": {str(e): s.name for e, s in recipe.schedule.items()},
        "batch_size": batch_size, "device_data": device_data,
        "train_seconds": round(seconds, 1),
        "test_accuracy": accuracy(*test),
        "epochs_run": epochs_run, "completed": epochs_run == recipe.epochs,
        # a part killed before its end leaves epochs out of the history
        "history_complete": history_complete,
        "diverged_at_epoch": diverged[0] if diverged else None,
        "backend": keras.backend.backend(),
        "history": history,
    }
    for score, (x, y) in (extra_scores or {}).items():
        result[f"{score}_accuracy"] = accuracy(x, y)
    net.save_weights(stem + ".weights.h5")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return result
