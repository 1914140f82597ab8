"""The `keras-fsp` command: train a teacher, distil a student, evaluate,
export and visualise, with runs that resume after an interruption.

    keras-fsp SUBCOMMAND [--flag=value ...]
    python -m keras_fsp.apps.cli SUBCOMMAND [--flag=value ...]

Subcommands:
    train-teacher   train the teacher (ResNet-<teacher_depth>) on the labels
    distill         distil a student (ResNet-<student_depth>) from a teacher:
                    --method fsp | dense-fsp | fitnet | kd | at | dkd | fsp-kd |
                    dense-fsp-kd | at-kd | none (none: the student alone)
    evaluate        test accuracy of a trained model (--model)
    export          a trained model (--model) as .keras, SavedModel, LiteRT
                    (float or int8) or ONNX files (--formats)
    visualize       pictures comparing the teacher and a student

A training run writes into --model_dir: config.json (every flag's value),
log.txt, metrics.csv (one row per epoch), checkpoints/ (one per epoch,
written atomically), metrics.json (test accuracy etc.) and, once the run is
complete, export/ (the trained network as a SavedModel) and teacher.keras or
student.keras. Running the same
command again continues from the last checkpoint and ends with the weights an
uninterrupted run would have. `--epochs N` stops after N epochs in all (run
again without it to continue); `--learning_rate_scale` may change when a run
continues (e.g. after a NaN stop, whose message gives the command), and
config.json's "history" records the settings of each epoch range.
`--overwrite` starts over and moves the earlier run into
<model_dir>/overwritten/ rather than deleting it.

Before anything is trained or written, the data is checked (finite images,
integer labels in [0, classes), at least two classes, test labels among the
training labels) and --model_dir is probed for writing; a damaged newest
checkpoint costs an epoch (the newest intact one is resumed, with a line
saying which one was skipped and why); a full, read-only or vanished
--model_dir ends the run with one line saying what to free or fix, the last
good checkpoint kept.

Examples (the digits data set is bundled with scikit-learn, no download):

    keras-fsp train-teacher --dataset digits --teacher_depth 14 --schedule_scale 0.01
    keras-fsp distill --method fsp --dataset digits --teacher_depth 14 --schedule_scale 0.01
    keras-fsp evaluate --dataset digits --model runs/distill-fsp-digits

`run(argv)` does the work and returns a dict; `main` maps errors to one-line
messages and exit codes (2: bad input, 1: training failed, 130: interrupted).
"""

import errno
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time

SUBCOMMANDS = ("train-teacher", "distill", "evaluate", "export", "visualize", "reproduce")
TRAINING = ("train-teacher", "distill")
# --method -> keras_fsp.papers.recipes name ("none": the student alone).
METHODS = {
    "fsp": "fsp",
    "dense-fsp": "dense_fsp",
    "fitnet": "fitnet",
    "kd": "kd",
    "at": "at",
    "dkd": "dkd",
    "fsp-kd": "fsp_kd",
    "dense-fsp-kd": "dense_fsp_kd",
    "at-kd": "at_kd",
    "none": "student_alone",
}
# Methods whose recipe takes a soft-target temperature.
WITH_TEMPERATURE = ("kd", "fitnet", "dkd", "fsp-kd", "dense-fsp-kd", "at-kd")
TEACHER_RECIPE = "supervised"
# Flags that may change between the runs of one model_dir (everything else
# must stay as it was for a resumed run to be the same run).
RESUMABLE_CHANGES = ("epochs", "verbose", "overwrite", "data_dir", "model_dir", "num_images",
                     "max_minutes", "tensorboard", "learning_rate_scale", "formats",
                     "checkpoint_seconds", "compilation_cache_dir")
# The resumable flags that change what training computes: config.json's
# "history" lists their values by epoch range, [{"from_epoch": 0,
# "learning_rate_scale": 1.0}, {"from_epoch": 5, "learning_rate_scale": 0.1}].
HISTORY_SETTINGS = ("learning_rate_scale",)
# Where --overwrite moves the earlier run (inside --model_dir).
OVERWRITTEN = "overwritten"
# What `export --formats` writes into --model_dir: format -> (file,
# `export_student` format, the module that format needs beyond TensorFlow).
EXPORTS = {"keras": ("model.keras", "keras", None),
           "saved_model": ("export", "tf_saved_model", None),
           "litert": ("model.tflite", "litert", "ai_edge_litert"),
           "litert_int8": ("model_int8.tflite", "litert", "ai_edge_litert"),
           "onnx": ("model.onnx", "onnx", "tf2onnx")}
EXPORT_FORMATS = tuple(EXPORTS)
# Training images that calibrate litert_int8's activation ranges.
CALIBRATION_IMAGES = 500
# Model files of a run folder, in the order they are looked for.
MODEL_FILES = ("student.keras", "teacher.keras", "model.keras")
TEACHER_FILES = ("teacher.keras", "model.keras")
FSP_IMAGES = 256
# --dtype_policy values; training flags added later than a run read as their
# default when the run's config.json has none.
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
LATER_FLAG_DEFAULTS = {"dtype_policy": "float32"}
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "keras_fsp", "jax")

USAGE = f"""Usage: keras-fsp SUBCOMMAND [--flag=value ...]

Subcommands: {", ".join(SUBCOMMANDS)}
  train-teacher  train the teacher ResNet-<teacher_depth> on the labels
  distill        distil ResNet-<student_depth> from --teacher with --method
                 ({", ".join(METHODS)}; none = the student alone)
  evaluate       test accuracy of --model (a .keras file or a run folder)
  export         --model as --formats (.keras, SavedModel, LiteRT, int8 LiteRT, ONNX)
                 into --model_dir
  visualize      pictures of --teacher vs --model (student) into --model_dir
  reproduce      every run of a results table, then the table
                 (keras-fsp reproduce TABLE --help; see keras_fsp.apps.reproduce)

Run `keras-fsp --help` for every flag."""


class CLIError(SystemExit):
    """A one-line error for the user; `main` prints it without a traceback.

    A `SystemExit`, so that an uncaught one also ends the program with its
    message and no traceback.
    """

    def __init__(self, message, code=2):
        super().__init__(code)
        self.message = " ".join(str(message).split())

    def __str__(self):
        return self.message


# -------------------------------------------------------------------- flags


def _flag_values():
    """A fresh set of flags (no global state: `run` can be called again)."""
    from absl import flags

    fv = flags.FlagValues()
    d = dict(flag_values=fv)
    flags.DEFINE_string("dataset", "digits", "cifar10 | cifar100 | digits | npz:PATH "
                        "(an .npz file with x_train, y_train, x_test, y_test).", **d)
    flags.DEFINE_string("data_dir", None, "Where tensorflow-datasets keeps its data.", **d)
    flags.DEFINE_string("model_dir", None, "The run's folder; default "
                        "runs/<subcommand>-<dataset> (distill: runs/distill-<method>-<dataset>).", **d)
    flags.DEFINE_string("method", "fsp", f"distill: one of {', '.join(METHODS)}.", **d)
    flags.DEFINE_integer("teacher_depth", 26, "Depth of the teacher CIFAR ResNet (6n+2).", **d)
    flags.DEFINE_integer("student_depth", 8, "Depth of the student CIFAR ResNet (6n+2).", **d)
    flags.DEFINE_string("teacher", None, "distill/visualize: the teacher, a .keras or "
                        ".weights.h5 file or a train-teacher run folder; default the "
                        "train-teacher-<dataset> folder beside --model_dir.", **d)
    flags.DEFINE_string("model", None, "evaluate/export/visualize: the trained network, "
                        "a .keras file or a run folder; default the distill-fsp-<dataset> "
                        "folder beside --model_dir.", **d)
    flags.DEFINE_float("schedule_scale", 1.0, "Multiplies every iteration count of the "
                       "recipe (the papers' schedules): 0.01 trains 1% as long.", **d)
    flags.DEFINE_integer("epochs", None, "Stop after this many epochs in all (default: "
                         "the whole schedule); run again without it to continue.", **d)
    flags.DEFINE_float("max_minutes", None, "Stop after the epoch that passes this many minutes "
                       "(run the same command again to continue).", **d)
    flags.DEFINE_float("checkpoint_seconds", None, "Write an epoch's checkpoint only when this "
                       "many seconds have passed since the last one (and at the end); default: "
                       "every epoch on the CPU, every 30 s on a GPU.", **d)
    flags.DEFINE_integer("batch_size", 128, "Training batch size.", **d)
    flags.DEFINE_string("compilation_cache_dir", DEFAULT_COMPILATION_CACHE, "JAX on a GPU or TPU: "
                        "keep compiled programs here, so that later runs of the same networks "
                        "skip compilation; empty: no cache.", **d)
    flags.DEFINE_enum("dtype_policy", "float32", list(DTYPE_POLICIES), "Keras dtype policy "
                      "of teacher and student while training (variables, terms and FSP "
                      "matrices stay float32); mixed_bfloat16 is the faster setting on "
                      "recent GPUs.", **d)
    flags.DEFINE_integer("seed", 0, "Seed of the weights, the data order and the augmentation.", **d)
    flags.DEFINE_float("temperature", None, "Soft-target temperature (kd: default 4, "
                       "fitnet: default 3); other methods have none.", **d)
    flags.DEFINE_float("learning_rate_scale", 1.0, "Multiplies every learning rate of "
                       "the recipe (each stage's schedule).", **d)
    flags.DEFINE_float("weight_decay", 1e-4, "L2 weight decay of the ResNets.", **d)
    flags.DEFINE_boolean("overwrite", False, "Start over instead of continuing: the run's "
                         f"checkpoints and outputs move to <model_dir>/{OVERWRITTEN}/ (replacing "
                         "what an earlier --overwrite put there).", **d)
    flags.DEFINE_list("formats", list(EXPORT_FORMATS[:2]), "export: any of "
                      f"{', '.join(EXPORT_FORMATS)} (litert_int8: integer weights and "
                      "activations, calibrated on training images; litert and onnx need "
                      "pip install 'keras-fsp[export]').", **d)
    flags.DEFINE_integer("num_images", 6, "visualize: how many test images.", **d)
    flags.DEFINE_integer("verbose", 2, "Keras fit verbosity (0, 1, 2).", **d)
    flags.DEFINE_boolean("tensorboard", False, "Also write TensorBoard logs (every term's loss "
                         "and the stage) into <model_dir>/tensorboard; needs the tensorboard "
                         "package (pip install 'keras-fsp[tensorboard]').", **d)
    return fv


def _help():
    import textwrap

    fv = _flag_values()
    lines = [USAGE.rsplit("\n\n", 1)[0], "", "Flags (--name=value; booleans --name / --noname):"]
    for name in sorted(fv):
        flag = fv[name]
        if name in ("flagfile", "undefok") or flag.help is None:
            continue
        default = "" if flag.default is None else f" (default: {flag.default})"
        lines.append(textwrap.fill(f"--{name}: {flag.help}{default}", width=79,
                                   initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def _slug(dataset):
    if dataset.startswith("npz:"):
        base = os.path.basename(dataset[4:])
        return "npz-" + (base[:-4] if base.endswith(".npz") else base)
    return dataset


def _parse(argv):
    from absl import flags

    argv = list(argv)
    if not argv:
        argv = ["keras-fsp"]
    fv = _flag_values()
    try:
        rest = fv(argv)[1:]
    except flags.Error as e:
        raise CLIError(f"{e}. Run `keras-fsp --help` for the flags.") from None
    if not rest:
        raise CLIError(f"no subcommand; choose one of {', '.join(SUBCOMMANDS)}.")
    if len(rest) > 1:
        raise CLIError(f"unexpected arguments {rest[1:]}: flags take the form --name=value.")
    sub = rest[0]
    if sub not in SUBCOMMANDS:
        raise CLIError(f"unknown subcommand {sub!r}; choose one of {', '.join(SUBCOMMANDS)}.")
    cfg = {name: fv[name].value for name in fv}
    cfg = {k: cfg[k] for k in sorted(cfg) if k not in ("help", "helpfull", "helpshort",
                                                      "helpxml", "flagfile", "undefok")}
    cfg["subcommand"] = sub
    if cfg["method"] not in METHODS:
        raise CLIError(f"unknown method {cfg['method']!r}; choose one of {', '.join(METHODS)}.")
    if not cfg["schedule_scale"] > 0:
        raise CLIError(f"--schedule_scale must be > 0; got {cfg['schedule_scale']}.")
    for flag in ("schedule_scale", "learning_rate_scale", "weight_decay", "max_minutes",
                 "temperature", "checkpoint_seconds"):
        value = cfg[flag]
        if value is not None and not math.isfinite(value):
            raise CLIError(f"--{flag} must be a finite number; got {value}.")
    if not cfg["learning_rate_scale"] > 0:
        raise CLIError(f"--learning_rate_scale must be > 0; got {cfg['learning_rate_scale']}.")
    if cfg["weight_decay"] < 0:
        raise CLIError(f"--weight_decay must be >= 0; got {cfg['weight_decay']}.")
    if cfg["checkpoint_seconds"] is not None and not cfg["checkpoint_seconds"] >= 0:
        raise CLIError(f"--checkpoint_seconds must be >= 0; got {cfg['checkpoint_seconds']}.")
    if cfg["max_minutes"] is not None and not cfg["max_minutes"] > 0:
        raise CLIError(f"--max_minutes must be > 0; got {cfg['max_minutes']}.")
    if cfg["batch_size"] < 1:
        raise CLIError(f"--batch_size must be >= 1; got {cfg['batch_size']}.")
    if cfg["epochs"] is not None and cfg["epochs"] < 1:
        raise CLIError(f"--epochs must be >= 1; got {cfg['epochs']}.")
    if cfg["temperature"] is not None and not cfg["temperature"] > 0:
        raise CLIError(f"--temperature must be > 0; got {cfg['temperature']}.")
    for flag in ("teacher_depth", "student_depth"):
        depth = cfg[flag]
        if depth < 8 or (depth - 2) % 6:
            raise CLIError(f"--{flag} must be 6n+2 (8, 14, 20, 26, 32, 56, 110, ...); got {depth}.")
    slug = _slug(cfg["dataset"])
    if cfg["model_dir"] is None:
        name = f"distill-{cfg['method']}-{slug}" if sub == "distill" else f"{sub}-{slug}"
        cfg["model_dir"] = os.path.join("runs", name)
    parent = os.path.dirname(os.path.abspath(cfg["model_dir"]))
    if sub == "distill" and cfg["method"] == "none":
        cfg["teacher"] = None  # the student alone has no teacher
    elif sub in ("distill", "visualize") and cfg["teacher"] is None:
        cfg["teacher"] = os.path.join(parent, f"train-teacher-{slug}")
    if sub in ("evaluate", "export", "visualize") and cfg["model"] is None:
        cfg["model"] = os.path.join(parent, f"distill-fsp-{slug}")
    if sub in ("evaluate", "export", "visualize") and not fv["dataset"].present:
        # A run folder knows its data set: --dataset is needed only to change it.
        # (a .keras file inside a run folder counts as the folder)
        folder = cfg["model"] if os.path.isdir(cfg["model"]) else os.path.dirname(cfg["model"])
        run_config = _read_config(folder or ".")
        if run_config and "subcommand" in run_config and isinstance(run_config.get("dataset"), str):
            cfg["dataset"] = run_config["dataset"]
            if not fv["data_dir"].present:
                cfg["data_dir"] = run_config.get("data_dir")
    unknown = [f for f in cfg["formats"] if f not in EXPORT_FORMATS]
    if unknown or not cfg["formats"]:
        raise CLIError(f"--formats {','.join(cfg['formats'])}: choose one or more of "
                       f"{', '.join(EXPORT_FORMATS)}.")
    return cfg


# -------------------------------------------------------------------- data


def _load_data(cfg):
    from keras_fsp.apps import data

    name = cfg["dataset"]
    try:
        (x_train, y_train), (x_test, y_test), info = data.load_arrays(name, data_dir=cfg["data_dir"])
    except data.DatasetError as e:
        raise CLIError(f"--dataset {name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's input
        raise CLIError(f"--dataset {name}: cannot load it ({type(e).__name__}: {e}).") from None
    if len(x_train) == 0 or len(x_test) == 0:
        raise CLIError(f"--dataset {name}: the training or test split is empty.")
    from keras_fsp.data_checks import check_dataset

    try:  # before training on it, not after
        check_dataset((x_train, y_train), (x_test, y_test), int(info["num_classes"]))
    except ValueError as e:
        raise CLIError(f"--dataset {name}: {e}") from None
    return (x_train, y_train), (x_test, y_test), info


def _normalized(x, info):
    from keras_fsp.apps import data

    return data.normalize(x, info["mean"], info["std"])


# ------------------------------------------------------------------ models


def _resnet(cfg, depth, info, name):
    from keras_fsp.papers import cifar_resnet

    return cifar_resnet(depth, num_classes=int(info["num_classes"]),
                        input_shape=tuple(info["input_shape"]),
                        weight_decay=cfg["weight_decay"], name=name)


def _count_h5_variables(path_or_file):
    import h5py

    count = []
    with h5py.File(path_or_file, "r") as f:
        f.visititems(lambda k, v: count.append(k) if isinstance(v, h5py.Dataset) else None)
    return len(count)


def _variables_in_file(path):
    """How many variables a .keras or .weights.h5 file holds."""
    if path.endswith(".keras"):
        import io
        import zipfile

        with zipfile.ZipFile(path) as z:
            with z.open("model.weights.h5") as f:
                return _count_h5_variables(io.BytesIO(f.read()))
    return _count_h5_variables(path)


def _resolve_model_file(path, names, flag):
    if os.path.isdir(path):
        for name in names:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise CLIError(f"--{flag} {path}: the folder has none of {', '.join(names)}.")
    if not os.path.exists(path):
        raise CLIError(f"--{flag} {path}: no such file or folder.")
    if not (path.endswith(".keras") or path.endswith(".h5")):
        raise CLIError(f"--{flag} {path}: expected a .keras or .weights.h5 file or a run folder.")
    return path


def _load_into(model, path, flag, what):
    """Loads `path` into `model`, turning any mismatch into a CLIError."""
    try:
        n = _variables_in_file(path)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--{flag} {path}: unreadable ({type(e).__name__}: {e}).") from None
    if n != len(model.weights):
        raise CLIError(f"--{flag} {path} does not match {what}: the file has {n} variables, "
                       f"the model {len(model.weights)}.")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CLIError(f"--{flag} {path} does not match {what}: {first}") from None
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()]
    if skipped:  # Keras loads what it can and warns about the rest
        raise CLIError(f"--{flag} {path} does not match {what}: {skipped[0]}")
    return model


def _load_teacher(cfg, info):
    missing = (
        f"--teacher {cfg['teacher']}: no such file or folder; train one with `keras-fsp "
        f"train-teacher --dataset {cfg['dataset']} --teacher_depth {cfg['teacher_depth']} "
        f"--model_dir {cfg['teacher']}` or pass --teacher PATH (a .keras or .weights.h5 "
        "file, or a train-teacher run folder)."
    )
    if not os.path.exists(cfg["teacher"]):
        raise CLIError(missing)
    path = _resolve_model_file(cfg["teacher"], TEACHER_FILES, "teacher")
    teacher = _resnet(cfg, cfg["teacher_depth"], info, "teacher")
    what = (f"a ResNet-{cfg['teacher_depth']} (--teacher_depth) for {cfg['dataset']} "
            f"({tuple(info['input_shape'])}, {info['num_classes']} classes)")
    return _load_into(teacher, path, "teacher", what), path


def _load_trained(cfg, info, flag="model", names=MODEL_FILES):
    """A trained network from a .keras file or a run folder (any depth)."""
    import keras

    path = _resolve_model_file(cfg[flag], names, flag)
    if not path.endswith(".keras"):
        raise CLIError(f"--{flag} {path}: evaluate/export/visualize need a .keras file or a run folder.")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--{flag} {path}: cannot load it ({type(e).__name__}: {e}).") from None
    shape, classes = tuple(model.input_shape[1:]), model.output_shape[-1]
    want_shape = tuple(info["input_shape"])
    if (len(shape) != len(want_shape) or shape[-1] != want_shape[-1]
            or classes != int(info["num_classes"])):
        raise CLIError(f"--{flag} {path} takes {shape} images and has {classes} classes; "
                       f"--dataset {cfg['dataset']} has {want_shape} and {info['num_classes']}.")
    return model, path


# ---------------------------------------------------------------- run folder


def _outputs():
    return ["config.json", "log.txt", "metrics.csv", "metrics.json", ".parts.json", "checkpoints",
            "export", "tensorboard", "student.weights.h5", "teacher.weights.h5", *MODEL_FILES]


def _read_config(model_dir):
    """The run's config.json as a dict, or None when missing or unreadable."""
    try:
        with open(os.path.join(model_dir, "config.json"), "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _check_model_dir(cfg):
    """Decides between a fresh run, a resumed one, and a refusal (before
    anything is written)."""
    from keras_fsp.apps.runs import ResumableRun

    model_dir = cfg["model_dir"]
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise CLIError(f"--model_dir {model_dir} is a file.")
    latest = ResumableRun(model_dir).latest()
    if cfg["subcommand"] not in TRAINING:
        if latest is not None:
            raise CLIError(f"--model_dir {model_dir} holds a training run; {cfg['subcommand']} "
                           "writes its config.json and metrics.json: choose another --model_dir.")
        return None
    if cfg["overwrite"] or latest is None:
        return None
    old = _read_config(model_dir)
    if old is None:
        raise CLIError(f"--model_dir {model_dir} has checkpoints but no readable config.json; "
                       "pass --overwrite to start over or choose another --model_dir.")
    old = {**LATER_FLAG_DEFAULTS, **old}
    changed = [k for k in cfg if k not in RESUMABLE_CHANGES and old.get(k) != cfg[k]]
    if changed:
        diffs = ", ".join(f"--{k}={cfg[k]!r} (was {old.get(k)!r})" for k in changed)
        raise CLIError(f"--model_dir {model_dir} holds a run with other settings: {diffs}; "
                       "pass --overwrite to start over or choose another --model_dir.")
    return latest


def _io_message(error, model_dir):
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


def _probe_writable(model_dir):
    """Fails fast, before anything is moved or trained, when --model_dir
    cannot be created or written (read-only disk, no permission, a file in
    its path, a full disk)."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=model_dir)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise CLIError(_io_message(e, model_dir)) from None


def _move_aside(model_dir, log):
    """--overwrite: moves the earlier run's outputs into
    <model_dir>/overwritten/ (what an earlier --overwrite put there is
    deleted), and says so: a checkpoint that a message said was kept is
    never deleted unannounced."""
    present = [n for n in _outputs() if os.path.lexists(os.path.join(model_dir, n))]
    if not present:
        return
    aside = os.path.join(model_dir, OVERWRITTEN)
    replaced = os.path.lexists(aside)
    if replaced:
        shutil.rmtree(aside)
    os.mkdir(aside)
    for name in present:
        os.replace(os.path.join(model_dir, name), os.path.join(aside, name))
    log(f"--overwrite: the earlier run ({', '.join(present)}) moved to {aside}"
        + ("; what an earlier --overwrite had moved there was deleted" if replaced else "")
        + "; delete it when it is no longer needed")


def _history(cfg, latest, log):
    """config.json's "history": the HISTORY_SETTINGS of each epoch range. A
    run resumed at epoch E with other values gets an entry from E (entries
    from E on were for epochs that now run again)."""
    now = {k: cfg[k] for k in HISTORY_SETTINGS}
    if latest is None:
        return [{"from_epoch": 0, **now}]
    old = _read_config(cfg["model_dir"]) or {}
    earlier = old.get("history") or [{"from_epoch": 0, **{k: old.get(k) for k in now}}]
    history = [h for h in earlier if h.get("from_epoch", 0) < latest.epoch] or earlier[:1]
    changed = {k: (history[-1].get(k), v) for k, v in now.items() if history[-1].get(k) != v}
    if changed:
        history.append({"from_epoch": latest.epoch, **now})
        log(", ".join(f"--{k} {a} -> {b}" for k, (a, b) in changed.items())
            + f" from epoch {latest.epoch}; config.json's history holds the settings of each "
            "epoch range")
    return history


def _prepare_model_dir(cfg, log, latest=None):
    model_dir = cfg["model_dir"]
    _probe_writable(model_dir)
    config = dict(cfg)
    if cfg["subcommand"] in TRAINING:
        if cfg["overwrite"]:
            _move_aside(model_dir, log)
        config["history"] = _history(cfg, latest, log)
    from keras_fsp.apps.runs import atomic_write_text

    atomic_write_text(os.path.join(model_dir, "config.json"),
                      json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.open(os.path.join(model_dir, "log.txt"))


def _saved_model(model, model_dir):
    """`export/` (a SavedModel; TensorFlow only), replacing an earlier one
    only once the new one is complete; `{}` on other backends."""
    import keras

    from keras_fsp import export_student

    if keras.backend.backend() != "tensorflow":
        return {}
    return {"saved_model": export_student(model, os.path.join(model_dir, "export"),
                                          overwrite=True)}


def _write_result(model_dir, result):
    from keras_fsp.apps.training import write_result

    write_result(model_dir, result)


# ------------------------------------------------------------ subcommands


def _scale_learning_rates(recipe, factor):
    import keras

    if factor == 1.0:
        return
    optimizers = [recipe.optimizer] + [s.optimizer for s in recipe.schedule.values()]
    seen = set()
    for opt in optimizers:
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        from keras_fsp import compat

        lr = compat.learning_rate(opt)
        schedules = keras.optimizers.schedules
        if isinstance(lr, schedules.PiecewiseConstantDecay):
            opt.learning_rate = schedules.PiecewiseConstantDecay(
                list(lr.boundaries), [float(v) * factor for v in lr.values])
        else:
            opt.learning_rate = float(keras.ops.convert_to_numpy(lr)) * factor


def _recipe(cfg, teacher, student, steps, augment):
    from keras_fsp.papers import recipes

    kw = dict(augment=augment, scale=cfg["schedule_scale"])
    if cfg["subcommand"] == "train-teacher":
        return recipes.supervised(student, steps, **kw)
    if cfg["method"] == "none":
        return recipes.student_alone(student, steps, **kw)
    if cfg["temperature"] is not None and cfg["method"] in WITH_TEMPERATURE:
        kw["temperature"] = cfg["temperature"]
    return recipes.get(METHODS[cfg["method"]])(teacher, student, steps, **kw)


def _train(cfg, log, argv):
    import keras

    from keras_fsp.apps import training

    if training.on_accelerator():  # before anything compiles (see use_compilation_cache)
        training.use_compilation_cache(cfg["compilation_cache_dir"])
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(cfg["dtype_policy"])  # for the networks built here
    try:
        return _train_networks(cfg, log, argv)
    finally:
        keras.config.set_dtype_policy(previous)


def _train_networks(cfg, log, argv):
    import keras

    from keras_fsp.apps import training
    from keras_fsp.augment import PadCropFlip
    from keras_fsp.callbacks import NonFiniteLossError

    started = time.time()
    sub = cfg["subcommand"]
    (x_train, y_train), (x_test, y_test), info = _load_data(cfg)
    teacher = teacher_path = None
    if sub == "distill" and cfg["method"] != "none":
        teacher, teacher_path = _load_teacher(cfg, info)
    latest = _check_model_dir(cfg)
    # Validated: from here on the run's folder is written.
    _prepare_model_dir(cfg, log, latest)
    log(f"keras-fsp {sub} " + " ".join(f"--{k}={v}" for k, v in cfg.items() if k != "subcommand"))
    log(f"{cfg['dataset']}: {len(x_train)} training and {len(x_test)} test images "
        f"{tuple(info['input_shape'])}, {info['num_classes']} classes")

    keras.utils.set_random_seed(cfg["seed"])
    depth = cfg["teacher_depth"] if sub == "train-teacher" else cfg["student_depth"]
    network = _resnet(cfg, depth, info, "teacher" if sub == "train-teacher" else "student")
    aug = dict(info.get("augment") or {})
    pad, flip = int(aug.get("pad", 0)), bool(aug.get("flip", False))
    augment = PadCropFlip(pad=pad, flip=flip, seed=cfg["seed"]) if (pad or flip) else None
    from keras_fsp.apps.runs import steps_per_epoch

    steps = steps_per_epoch(len(x_train), cfg["batch_size"])
    recipe = _recipe(cfg, teacher, network, steps, augment)
    _scale_learning_rates(recipe, cfg["learning_rate_scale"])
    stages = {int(e): s.name for e, s in sorted(recipe.schedule.items())}
    log(f"recipe {recipe.name}: {recipe.epochs} epochs of {steps} steps"
        + (f", stages {stages}" if stages else "")
        + (f"; teacher {teacher_path}" if teacher_path else ""))
    if latest is not None:
        log(f"resuming from {latest.path} (epoch {latest.epoch}, stage {latest.stage!r})")
    # A command that works: the learning rate may change on resume.
    lower = _command(argv, learning_rate_scale=f"{cfg['learning_rate_scale'] / 10:g}")
    advice = f"to go on at a tenth of the learning rate, run `{lower}`"
    save_name = "teacher" if sub == "train-teacher" else "student"
    try:
        result = training.train(
            recipe, (_normalized(x_train, info), y_train), (_normalized(x_test, info), y_test),
            cfg["model_dir"], batch_size=cfg["batch_size"], seed=cfg["seed"], epochs=cfg["epochs"],
            max_minutes=cfg["max_minutes"],
            log=log, verbose=cfg["verbose"], nan_advice=advice, save_name=save_name,
            tensorboard=cfg["tensorboard"], checkpoint_seconds=cfg["checkpoint_seconds"],
            fields={"subcommand": sub, "dataset": cfg["dataset"],
                    "method": cfg["method"] if sub == "distill" else "supervised"},
        )
        if result["complete"]:  # only the finished network is exported
            # the harness wrote <save_name>.keras already
            result["files"].update(_saved_model(recipe.student, cfg["model_dir"]))
        result["seconds"] = round(time.time() - started, 1)
        _write_result(cfg["model_dir"], result)
    except NonFiniteLossError as e:
        raise CLIError(e, code=1) from None
    except OSError as e:  # disk full, folder not writable or vanished: no traceback
        from keras_fsp.apps.runs import ResumableRun

        last = ResumableRun(cfg["model_dir"]).latest()
        kept = (f"the last good checkpoint (epoch {last.epoch}) is kept in {last.path}: then run "
                "the same command again to continue" if last else "no checkpoint is kept")
        raise CLIError(f"{_io_message(e, cfg['model_dir'])}; {kept}", code=1) from None
    except KeyboardInterrupt:
        from keras_fsp.apps.runs import ResumableRun

        last = ResumableRun(cfg["model_dir"]).latest()
        message = (f"interrupted; the last checkpoint is epoch {last.epoch if last else 0} in "
                   f"{cfg['model_dir']}: run the same command again to continue")
        log(message)
        raise CLIError(message, code=130) from None
    return result


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


def _evaluate_cmd(cfg, log):
    from keras_fsp.apps.training import accuracy_and_loss

    (_, _), (x_test, y_test), info = _load_data(cfg)
    model, path = _load_trained(cfg, info)
    _check_model_dir(cfg)
    _prepare_model_dir(cfg, log)
    test = accuracy_and_loss(model, _normalized(x_test, info), y_test)
    result = {"subcommand": "evaluate", "model": path, "dataset": cfg["dataset"],
              "test_accuracy": test["accuracy"], "test_loss": test["loss"],
              "examples": test["examples"]}
    _write_result(cfg["model_dir"], result)
    log(f"{path}: test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} "
        f"on {test['examples']} {cfg['dataset']} images")
    return result


def _export_cmd(cfg, log):
    import keras

    (x_train, _), (_, _), info = _load_data(cfg)
    model, path = _load_trained(cfg, info)
    formats = list(dict.fromkeys(cfg["formats"]))
    if keras.backend.backend() != "tensorflow" and formats != ["keras"]:
        raise CLIError(f"--formats {','.join(formats)}: every format but keras needs "
                       "KERAS_BACKEND=tensorflow.")
    import importlib.util

    needed = {EXPORTS[f][2] for f in formats} - {None}
    missing = sorted(m for m in needed if importlib.util.find_spec(m) is None)
    if missing:
        raise CLIError(f"--formats {','.join(formats)} needs {', '.join(missing)}: "
                       "pip install 'keras-fsp[export]'.")
    _check_model_dir(cfg)
    _prepare_model_dir(cfg, log)
    from keras_fsp import export_student

    files = {}
    for name in formats:
        filename, export_format, _ = EXPORTS[name]
        target = os.path.join(cfg["model_dir"], filename)
        kwargs = {"format": export_format}
        if name == "litert_int8":
            kwargs.update(quantize="int8",
                          representative_data=_normalized(x_train[:CALIBRATION_IMAGES], info))
        files[name] = str(export_student(model, target, overwrite=True, **kwargs))
    result = {"subcommand": "export", "model": path, "dataset": cfg["dataset"], "files": files}
    _write_result(cfg["model_dir"], result)
    log(f"exported {path} to {', '.join(files.values())}")
    return result


def _visualize_cmd(cfg, log):
    import numpy as np

    from keras_fsp.apps import visualize

    (_, _), (x_test, y_test), info = _load_data(cfg)
    student, path = _load_trained(cfg, info)
    teacher, teacher_path = _load_trained(cfg, info, flag="teacher", names=TEACHER_FILES)
    _check_model_dir(cfg)
    _prepare_model_dir(cfg, log)
    # The FSP matrices are averaged over up to FSP_IMAGES test images; the
    # attribution grid shows the first --num_images.
    raw = np.asarray(x_test[:max(FSP_IMAGES, cfg["num_images"])])
    images = _normalized(raw, info)
    written = visualize.visualize_distillation(
        (teacher, student), images, np.asarray(y_test[:len(raw)]), info.get("class_names"),
        cfg["model_dir"], num_images=cfg["num_images"], display_images=raw)
    result = {"subcommand": "visualize", "model": path, "teacher": teacher_path,
              "files": [str(p) for p in written]}
    _write_result(cfg["model_dir"], result)
    log(f"wrote {', '.join(result['files'])}")
    return result


def run(argv):
    """Runs the command line `argv` (`argv[0]` is the program name).

    Returns:
        the run's result as a dict (what metrics.json holds).

    Raises:
        CLIError: bad input (exit code 2, nothing trained or overwritten),
            a NaN/inf loss (1) or an interruption (130), with a one-line
            message.
    """
    if list(argv[1:2]) == ["reproduce"]:  # its own flags (keras_fsp.apps.reproduce)
        from keras_fsp.apps import reproduce

        return reproduce.main(list(argv[1:]))
    cfg = _parse(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from keras_fsp.apps.training import Log

    log = Log()
    if cfg["subcommand"] in TRAINING:
        return _train(cfg, log, argv)
    handlers = {"evaluate": _evaluate_cmd, "export": _export_cmd, "visualize": _visualize_cmd}
    return handlers[cfg["subcommand"]](cfg, log)


def main(argv=None):
    """The `keras-fsp` console script."""
    argv = sys.argv if argv is None else argv
    if argv[1:2] != ["reproduce"] and any(
            a in ("-h", "--help", "-help", "--helpfull", "help") for a in argv[1:]):
        print(_help())
        return 0
    try:
        run(argv)
    except CLIError as e:
        print(f"keras-fsp: error: {e.message}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
