"""The `keras-fsp` subcommands, one function each: `train_teacher`,
`distill`, `evaluate`, `export` and `visualize`, each taking the checked
`Config` and the log and returning what the run's `metrics.json` holds.

Before anything is trained or written, the data is checked (finite images,
integer labels in [0, classes), at least two classes, test labels among the
training labels) and the run folder is probed for writing; a full,
read-only or vanished folder ends the command with one line saying what to
free or fix, the last good checkpoint kept.
"""

import contextlib
import errno
import importlib.util
import os
import shlex
import shutil
import time

import numpy as np

from keras_fsp.apps import networks
from keras_fsp.apps.config import TRAINING, CLIError
from keras_fsp.export import deployable, output_name
from keras_fsp.training.run_folder import (CONFIG, EXPORT_FILES, RESULT, FolderBusyError,
                                           ForeignFilesError, RunFolder)

# Flags that may change between the runs of one model_dir (everything else
# must stay as it was for a resumed run to be the same run).
RESUMABLE_CHANGES = ("epochs", "verbose", "overwrite", "data_dir", "model_dir", "num_images",
                     "max_minutes", "tensorboard", "learning_rate_scale", "formats",
                     "checkpoint_seconds", "compilation_cache_dir", "plugins",
                     "allow_weak_teacher", "raw_inputs")
# The resumable flags that change what training computes: config.json's
# "history" lists their values by epoch range, [{"from_epoch": 0,
# "learning_rate_scale": 1.0}, {"from_epoch": 5, "learning_rate_scale": 0.1}].
HISTORY_SETTINGS = ("learning_rate_scale",)
# Training flags added later than a run read as their default when the run's
# config.json has none.
LATER_FLAG_DEFAULTS = {"dtype_policy": "float32", "plugins": [], "allow_weak_teacher": False,
                       "raw_inputs": True, "student": None, "image_size": [],
                       "validation_split": 0.2, "teacher_weights": [], "optimizer": "sgd",
                       "cutout": 0, "teacher_precision": None, "method_options": []}
# What each `--formats` value asks `export_student` for, and the module it
# needs beyond TensorFlow.
EXPORTERS = {"keras": ("keras", None), "saved_model": ("tf_saved_model", None),
             "litert": ("litert", "ai_edge_litert"), "litert_int8": ("litert", "ai_edge_litert"),
             "onnx": ("onnx", "tf2onnx")}
# Training images that calibrate litert_int8's activation ranges.
CALIBRATION_IMAGES = 500
# Test images whose FSP matrices `visualize` averages.
FSP_IMAGES = 256
# Training images a teacher is checked on before it teaches.
TEACHER_CHECK = 512


# -------------------------------------------------------------------- data


def load_data(config):
    """The dataset's arrays and info, checked before anything trains."""
    from keras_fsp.apps import data
    from keras_fsp.data_checks import check_dataset

    name = config.dataset
    try:
        (x_train, y_train), (x_test, y_test), info = data.load_arrays(
            name, data_dir=config.data_dir, image_size=config.image_hw,
            validation_split=config.validation_split)
    except data.DatasetError as e:
        raise CLIError(f"--dataset {name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's input
        raise CLIError(f"--dataset {name}: cannot load it ({type(e).__name__}: {e}).") from None
    if len(x_train) == 0 or len(x_test) == 0:
        raise CLIError(f"--dataset {name}: the training or test split is empty.")
    try:  # before training on it, not after
        check_dataset((x_train, y_train), (x_test, y_test), int(info["num_classes"]))
    except ValueError as e:
        raise CLIError(f"--dataset {name}: {e}") from None
    return (x_train, y_train), (x_test, y_test), info


def normalized(x, info):
    from keras_fsp.apps import data

    return data.normalize(x, info["mean"], info["std"])


# -------------------------------------------------------------- run folder


def io_message(error, model_dir):
    """One line for an `OSError` met writing the run's folder: what failed
    and what to free or fix."""
    where = error.filename or model_dir
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = (f"free space on that disk, or move {model_dir} to a larger one and pass its new "
               "--model_dir")
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"make {model_dir} writable or choose another --model_dir"
    elif error.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST):
        fix = (f"{model_dir} vanished or a part of its path is not a folder: restore it or choose "
               "another --model_dir")
    else:
        fix = f"check the disk holding {model_dir} or choose another --model_dir"
    return f"cannot write {where}: {error.strerror or error}; {fix}"


def check_model_dir(config):
    """Decides between a fresh run, a resumed one (its latest checkpoint is
    returned) and a refusal, before anything is written."""
    folder = RunFolder(config.model_dir)
    if os.path.exists(folder.path) and not os.path.isdir(folder.path):
        raise CLIError(f"--model_dir {folder.path} is a file.")
    latest = folder.checkpoints().latest()
    if config.subcommand not in TRAINING:
        if latest is not None:
            raise CLIError(f"--model_dir {folder.path} holds a training run; {config.subcommand} "
                           f"writes its {CONFIG} and {RESULT}: choose another --model_dir.")
        return None
    if config.overwrite or latest is None:
        return None
    old = folder.read_config()
    if old is None:
        raise CLIError(f"--model_dir {folder.path} has checkpoints but no readable {CONFIG}; "
                       "pass --overwrite to start over or choose another --model_dir.")
    old = {**LATER_FLAG_DEFAULTS, **old}
    now = config.as_json()
    changed = [k for k in now if k not in RESUMABLE_CHANGES and old.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"--{k}={now[k]!r} (was {old.get(k)!r})" for k in changed)
        raise CLIError(f"--model_dir {folder.path} holds a run with other settings: {diffs}; "
                       "pass --overwrite to start over or choose another --model_dir.")
    return latest


def _history(config, latest, log):
    """The HISTORY_SETTINGS of each epoch range. A run resumed at epoch E
    with other values gets an entry from E (entries from E on were for
    epochs that now run again)."""
    now = {k: getattr(config, k) for k in HISTORY_SETTINGS}
    if latest is None:
        return [{"from_epoch": 0, **now}]
    old = RunFolder(config.model_dir).read_config() or {}
    earlier = old.get("history") or [{"from_epoch": 0, **{k: old.get(k) for k in now}}]
    history = [h for h in earlier if h.get("from_epoch", 0) < latest.epoch] or earlier[:1]
    changed = {k: (history[-1].get(k), v) for k, v in now.items() if history[-1].get(k) != v}
    if changed:
        history.append({"from_epoch": latest.epoch, **now})
        log(", ".join(f"--{k} {a} -> {b}" for k, (a, b) in changed.items())
            + f" from epoch {latest.epoch}; {CONFIG}'s history holds the settings of each "
            "epoch range")
    return history


@contextlib.contextmanager
def run_folder(config, log, latest=None, extra=(), info=None):
    """The command's `RunFolder`, held for the body: refused when it holds
    files keras_fsp did not write (`extra`: more names the command writes)
    or another process works in it; then what interrupted writes left is
    cleaned up, the folder probed for writing, an earlier run moved aside
    for --overwrite, the settings written (with the dataset's statistics,
    from `info`) and the log opened there."""
    folder = RunFolder(config.model_dir)
    try:
        folder.check_own(extra)
        lock = folder.lock(f"keras-fsp {config.subcommand}")
        lock.__enter__()
    except (ForeignFilesError, FolderBusyError) as e:
        raise CLIError(f"--model_dir {e}") from None
    except OSError as e:  # cannot create the folder or its lock: read-only, a file in the path
        raise CLIError(io_message(e, folder.path)) from None
    try:
        folder.clean_staging()
        try:
            folder.probe_writable()
        except OSError as e:
            raise CLIError(io_message(e, folder.path)) from None
        settings = config.as_json()
        if info is not None:  # what the exports normalise their raw inputs with
            settings["data"] = {"num_classes": int(info["num_classes"]),
                                "input_shape": list(info["input_shape"]),
                                "mean": [float(v) for v in info["mean"]],
                                "std": [float(v) for v in info["std"]]}
        if config.subcommand in TRAINING:
            if config.overwrite:
                moved, target = folder.move_aside()
                if moved:
                    log(f"--overwrite: the earlier run ({', '.join(moved)}) moved to {target}; "
                        "delete it when it is no longer needed", echo=True)  # even at --verbose 0
            settings["history"] = _history(config, latest, log)
        folder.write_config(settings)
        folder.open_log(log)
        yield folder
    finally:
        lock.__exit__(None, None, None)


def check_space(folder, size, what):
    """Refuses to start a command whose files would not fit on the disk."""
    from keras_fsp.training.files import check_free_space

    check_free_space(folder.path, size, what)


def _bytes(variables):
    return sum(int(np.prod(v.shape)) * 4 for v in variables)


# ---------------------------------------------------------------- training


def train_teacher(config, log, argv):
    """The teacher (`--teacher`, default ResNet-`teacher_depth`) trained on
    the labels."""
    return _train(config, log, argv, "teacher", None)


def distill(config, log, argv):
    """The student (`--student`, default ResNet-`student_depth`) distilled
    from `--teacher` with `--method`."""
    from keras_fsp.papers import methods

    return _train(config, log, argv, "student", methods.get(config.method))


@contextlib.contextmanager
def _dtype_policy(name):
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)  # for the networks built here
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _train(config, log, argv, role, method):
    from keras_fsp import training

    if training.on_accelerator():  # before anything compiles (see use_compilation_cache)
        training.use_compilation_cache(config.compilation_cache_dir)
    with _dtype_policy(config.dtype_policy):
        return _train_network(config, log, argv, role, method)


def _recipe(config, role, method, teacher, network, steps, augment):
    from keras_fsp.optimizers import scale_learning_rate
    from keras_fsp.papers import recipes

    kw = dict(augment=augment, scale=config.schedule_scale)
    if method is None:
        recipe = recipes.supervised(network, steps, **kw)
    else:
        if config.temperature is not None and "temperature" in method.options:
            kw["temperature"] = config.temperature
        kw.update(config.method_settings)
        recipe = method.build(teacher, network, steps, **kw)
    if config.optimizer == "adamw":
        recipe = recipes.with_adamw(recipe, steps)
    optimizers = [recipe.optimizer] + [s.optimizer for s in recipe.schedule.values()]
    for optimizer in {id(o): o for o in optimizers if o is not None}.values():
        scale_learning_rate(optimizer, config.learning_rate_scale)
    return recipe


def _train_network(config, log, argv, role, method):
    import keras

    from keras_fsp import training
    from keras_fsp.augment import Cutout, PadCropFlip, chain
    from keras_fsp.callbacks import NonFiniteLossError

    started = time.time()
    (x_train, y_train), (x_test, y_test), info = load_data(config)
    teacher = teacher_path = None
    if method is not None and method.uses_teacher:
        teacher, teacher_path = _teacher(config, info, normalized(x_train[:TEACHER_CHECK], info),
                                         y_train[:TEACHER_CHECK], log)
    # Built before the folder is touched: a bad --student, or one the
    # method cannot pair with the teacher, is refused here.
    keras.utils.set_random_seed(config.seed)
    network = networks.network(config, role, info)
    pad, flip = int(info["augment"].get("pad", 0)), bool(info["augment"].get("flip", False))
    augment = PadCropFlip(pad=pad, flip=flip, seed=config.seed) if (pad or flip) else None
    if config.cutout:
        if config.cutout >= min(info["input_shape"][:2]):
            raise CLIError(f"--cutout {config.cutout} must be smaller than the images "
                           f"({tuple(info['input_shape'][:2])}).")
        # Its own seed: with PadCropFlip's, the two would draw the same keys
        # (a square's place tied to the crop's offset).
        augment = chain(augment, Cutout(config.cutout, seed=config.seed + 1))
    steps = training.steps_per_epoch(len(x_train), config.batch_size)
    try:
        recipe = _recipe(config, role, method, teacher, network, steps, augment)
    except ValueError as e:
        raise CLIError(f"--method {config.method} cannot distil {networks.describe(config, role)} "
                       f"from {teacher_path}: {e}") from None
    latest = check_model_dir(config)
    # Validated: from here on the run's folder is written.
    with run_folder(config, log, latest, info=info) as folder:
        log(f"keras-fsp {config.subcommand} "
            + " ".join(f"--{k}={v}" for k, v in config.as_json().items() if k != "subcommand"))
        log(f"training on {training.device_name()} ({keras.backend.backend()})")
        log(f"{config.dataset}: {len(x_train)} training and {len(x_test)} test images "
            f"{tuple(info['input_shape'])}, {info['num_classes']} classes")
        log(f"{role} {networks.describe(config, role)}: {network.count_params():,} weights")
        stages = {int(e): s.name for e, s in sorted(recipe.schedule.items())}
        log(f"recipe {recipe.name}: {recipe.epochs} epochs of {steps} steps"
            + (f", stages {stages}" if stages else "")
            + (f"; teacher {teacher_path}" if teacher_path else ""))
        if latest is not None:
            log(f"resuming from {latest.path} (epoch {latest.epoch}, stage {latest.stage!r})")
        # A command that works: the learning rate may change on resume.
        lower = _command(argv, learning_rate_scale=f"{config.learning_rate_scale / 10:g}")
        try:
            # Checkpoints (a few kept, the teacher's weights in them), the
            # network and its export: refused now, not after an epoch.
            student = _bytes(recipe.student.weights)
            check_space(folder, 3 * (_bytes(recipe.model.weights) + student) + 3 * student
                        + (1 << 20), "the run")
            return training.train(
                recipe, (normalized(x_train, info), y_train), (normalized(x_test, info), y_test),
                folder, batch_size=config.batch_size, seed=config.seed, epochs=config.epochs,
                max_minutes=config.max_minutes, log=log, verbose=config.verbose,
                nan_advice=f"to go on at a tenth of the learning rate, run `{lower}`",
                save_name=role, tensorboard=config.tensorboard,
                checkpoint_seconds=config.checkpoint_seconds, saved_model=True,
                started_at=started, inputs_normalization=(info["mean"], info["std"]),
                fields={"subcommand": config.subcommand, "dataset": config.dataset,
                        "method": config.method if method is not None else "supervised"},
            )
        except NonFiniteLossError as e:
            raise CLIError(e, code=1) from None
        except OSError as e:  # disk full, folder not writable or vanished: no traceback
            last = folder.checkpoints().latest()
            kept = (f"the last good checkpoint (epoch {last.epoch}) is kept in {last.path}: then "
                    "run the same command again to continue" if last else "no checkpoint is kept")
            raise CLIError(f"{io_message(e, folder.path)}; {kept}", code=1) from None
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`Terminated`)
            last = folder.checkpoints().latest()
            message = (f"{getattr(e, 'what', 'interrupted')}; the last checkpoint is epoch "
                       f"{last.epoch if last else 0} in {folder.path}: run the same command again "
                       "to continue")
            log(message)
            raise CLIError(message, code=getattr(e, "code", 130)) from None


def _teacher(config, info, x, y, log):
    """`(teacher, what it is)`: each `--teacher` loaded and checked on the
    training images `x` (each must teach); several become their ensemble
    (`keras_fsp.teacher_ensemble`), whose accuracy is logged."""
    loaded = []
    for index in range(len(config.teachers)):
        teacher, path = networks.load_teacher(config, info, index)
        teacher = _in_precision(config, teacher, path)
        _check_teacher(config, teacher, path, x, y, info, log)
        loaded.append((teacher, path))
    if len(loaded) == 1:
        return loaded[0]
    from keras_fsp import teacher_ensemble

    try:
        teacher = teacher_ensemble([t for t, _ in loaded], weights=config.teacher_weights or None)
    except ValueError as e:
        raise CLIError(f"--teacher: {e}") from None
    weights = config.teacher_weights or [1.0] * len(loaded)
    what = " + ".join(f"{w:g} x {p}" for w, (_, p) in zip(weights, loaded))
    log(f"teachers {what}: their ensemble scores {_accuracy(teacher, x, y)[1]:.1%} on {len(x)} "
        "training images")
    return teacher, what


def _in_precision(config, teacher, path):
    """`teacher` in `--teacher_precision` (checked, as it teaches, next)."""
    from keras_fsp.teacher_precision import teacher_in_precision

    try:
        return teacher_in_precision(teacher, config.teacher_precision)
    except ValueError as e:
        raise CLIError(f"--teacher_precision {config.teacher_precision} (--teacher {path}): "
                       f"{e}") from None


def _accuracy(teacher, x, y):
    """`(outputs, accuracy)` of `teacher` on `x`."""
    out = np.asarray(teacher.predict(x, batch_size=256, verbose=0), "float64")
    return out, float(np.mean(np.argmax(out, axis=-1) == np.asarray(y).reshape(-1)))


def _check_teacher(config, teacher, path, x, y, info, log):
    """A teacher checked before it teaches: finite weights, finite outputs,
    and better than chance on some training images (or --allow_weak_teacher)."""
    from keras_fsp.finite import first_non_finite

    bad = first_non_finite(teacher.weights)
    if bad is not None:
        raise CLIError(f"--teacher {path}: weight {bad} is NaN or infinite; the file is damaged: "
                       "train the teacher again or pass another --teacher.")
    out, accuracy = _accuracy(teacher, x, y)
    if not np.all(np.isfinite(out)):
        raise CLIError(f"--teacher {path} gives NaN or infinite outputs on training images: its "
                       "weights are broken (too large?); train it again or pass another --teacher.")
    chance = 1.0 / int(info["num_classes"])
    # Three standard deviations above what guessing scores on len(x) images.
    if accuracy <= chance + 3 * np.sqrt(chance * (1 - chance) / len(x)):
        message = (f"--teacher {path} scores {accuracy:.1%} on {len(x)} training images, no "
                   f"better than chance ({chance:.1%})")
        if not config.allow_weak_teacher:
            untrained = networks.spec_kind(path) != "file"
            raise CLIError(f"{message}: it has nothing to teach; " + (
                f"--teacher {path} names an architecture, built untrained: train it first "
                f"(`keras-fsp train-teacher --teacher {path} --dataset {config.dataset}`) and pass "
                "its run folder" if untrained else
                "pass --allow_weak_teacher to distil from it anyway") + ".")
        log(f"warning: {message} (--allow_weak_teacher)", echo=True)
    precision = f" in {config.teacher_precision}" if config.teacher_precision else ""
    log(f"teacher {path}{precision}: {accuracy:.1%} on {len(x)} training images")


def _command(argv, **flags):
    """`argv` as a keras-fsp command line with `flags` set instead, and
    without --overwrite (which would start over)."""
    words, skip = ["keras-fsp"], False
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        if skip or (arg.startswith("-") and name in ("overwrite", "nooverwrite", *flags)):
            skip = not skip and name in flags and "=" not in arg  # --flag VALUE
            continue
        words.append(arg)
    return " ".join(shlex.quote(w) for w in words + [f"--{k}={v}" for k, v in flags.items()])


# ------------------------------------------------------ trained networks


def evaluate(config, log, argv=None):
    """The test accuracy of `--model`."""
    from keras_fsp.training import accuracy_and_loss

    (_, _), (x_test, y_test), info = load_data(config)
    model, path = networks.load_trained(config, info)
    check_model_dir(config)
    test = accuracy_and_loss(model, normalized(x_test, info), y_test)
    result = {"subcommand": "evaluate", "model": path, "dataset": config.dataset,
              "test_accuracy": test["accuracy"], "test_loss": test["loss"],
              "examples": test["examples"]}
    with run_folder(config, log) as folder:
        folder.write_result(result)
    log(f"{path}: test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} "
        f"on {test['examples']} {config.dataset} images")
    return result


def export(config, log, argv=None):
    """`--model` in each of `--formats`, into `--model_dir`."""
    import keras

    (x_train, _), (_, _), info = load_data(config)
    model, path = networks.load_trained(config, info)
    formats = list(dict.fromkeys(config.formats))
    if keras.backend.backend() != "tensorflow" and formats != ["keras"]:
        raise CLIError(f"--formats {','.join(formats)}: every format but keras needs "
                       "KERAS_BACKEND=tensorflow.")
    needed = {EXPORTERS[f][1] for f in formats} - {None}
    missing = sorted(m for m in needed if importlib.util.find_spec(m) is None)
    if missing:
        raise CLIError(f"--formats {','.join(formats)} needs {', '.join(missing)}: "
                       "pip install 'keras-fsp[export]'.")
    check_model_dir(config)
    raw = config.raw_inputs
    served = deployable(model, info["mean"], info["std"]) if raw else model
    calibration = np.asarray(x_train[:CALIBRATION_IMAGES], "float32")
    with run_folder(config, log, extra=EXPORT_FILES.values(), info=info) as folder:
        # Each format holds about the weights (float32), and its staging copy.
        check_space(folder, 3 * len(formats) * _bytes(model.weights) + (1 << 20), "the export")
        files = {}
        for name in formats:
            kwargs = {"format": EXPORTERS[name][0]}
            if name == "litert_int8":
                kwargs.update(quantize="int8", representative_data=calibration if raw
                              else normalized(calibration, info))
            target = folder.file(EXPORT_FILES[name])
            # (the .keras file stays the network alone: keras_fsp reads it)
            files[name] = str(_exported(model if name == "keras" else served, target, kwargs))
        result = {"subcommand": "export", "model": path, "dataset": config.dataset,
                  "files": files, "output": output_name(model),
                  "inputs": "raw" if raw else "normalised"}
        folder.write_result(result)
    log(f"exported {path} to {', '.join(files.values())}")
    return result


def visualize(config, log, argv=None):
    """Pictures comparing `--teacher` with `--model` (the student)."""
    from keras_fsp.apps import visualize as pictures

    (_, _), (x_test, y_test), info = load_data(config)
    student, path = networks.load_trained(config, info)
    teacher, teacher_path = networks.load_trained(config, info, flag="teacher",
                                                  stems=networks.TEACHER_NETWORKS)
    check_model_dir(config)
    # The FSP matrices are averaged over up to FSP_IMAGES test images; the
    # attribution grid shows the first --num_images.
    raw = np.asarray(x_test[:max(FSP_IMAGES, config.num_images)])
    with run_folder(config, log, extra=pictures.PICTURES) as folder:
        written = pictures.visualize_distillation(
            (teacher, student), normalized(raw, info), np.asarray(y_test[:len(raw)]),
            info.get("class_names"), folder.path, num_images=config.num_images,
            display_images=raw)
        result = {"subcommand": "visualize", "model": path, "teacher": teacher_path,
                  "files": [str(p) for p in written]}
        folder.write_result(result)
    log(f"wrote {', '.join(result['files'])}")
    return result


def _exported(model, path, kwargs):
    """`export_student`, a full disk one `OSError` whatever the exporter
    raised (TensorFlow's SavedModel writer raises its own error)."""
    from keras_fsp import export_student

    try:
        return export_student(model, path, overwrite=True, **kwargs)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        if free < 3 * _bytes(model.weights) + (1 << 20):
            raise OSError(errno.ENOSPC, f"No space left on device: {os.path.basename(path)} "
                          f"needs about {_bytes(model.weights) / 1e6:.1f} MB, "
                          f"{free / 1e6:.1f} MB free", path) from e
        raise


COMMANDS = {"train-teacher": train_teacher, "distill": distill, "evaluate": evaluate,
            "export": export, "visualize": visualize}
