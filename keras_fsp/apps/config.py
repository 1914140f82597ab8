"""The command line's settings: one frozen `Config`, one field per flag.

The absl flags are made from the fields (`flag_values`), so a setting is
declared once, with its default and its help; `Config.from_flags` checks
every value before anything is read or written, and `resolved` fills in the
paths a subcommand derives (its run folder, the teacher's, the trained
network's, the dataset a run folder knows).
"""

import dataclasses
import importlib
import importlib.util
import math
import os
import sys
from typing import Optional, Tuple, Union

from keras_fsp import teacher_precision
from keras_fsp.papers import methods
from keras_fsp.training.run_folder import EXPORT_FILES, RunFolder

SUBCOMMANDS = ("train-teacher", "distill", "evaluate", "export", "visualize", "reproduce")
TRAINING = ("train-teacher", "distill")
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "keras_fsp", "jax")


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


def _flag(kind, default, help, **extra):
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, **extra})


def _methods_help():
    return (f"distill: one of {', '.join(methods.METHODS)} (none: the student alone). "
            "Measured best on CIFAR-10 (RESULTS.md): dkd with --method_options beta=0.5 for a "
            "CNN student (0.3 to 0.7 points above kd from a 4x-wide teacher), then ls-kd when "
            "the teacher is far larger than the student, or at-kd; fitnet for a ViT student.")


@dataclasses.dataclass(frozen=True)
class Config:
    """What one `keras-fsp` command was asked to do."""

    subcommand: str = ""
    dataset: str = _flag("string", "digits", "cifar10 | cifar100 | digits | folder:PATH (one "
                         "sub-folder of images per class, in PATH/train/ and PATH/test/ or "
                         "split by --validation_split) | tfds:NAME (any tensorflow-datasets "
                         "image classification set, with --data_dir) | npz:PATH (an .npz "
                         "file with x_train, y_train, x_test, y_test).")
    image_size: Tuple[str, ...] = _flag("list", (), "folder: and tfds: datasets: resize the "
                                        "images to H,W (or S for S,S); default their own size.")
    validation_split: float = _flag("float", 0.2, "folder: without train/ and test/, and tfds: "
                                    "without a test split: the fraction of each class held out "
                                    "as the test split (chosen by a fixed seed).")
    data_dir: Optional[str] = _flag("string", None, "Where tensorflow-datasets keeps its data.")
    model_dir: Optional[str] = _flag("string", None, "The run's folder; default "
                                     "runs/<subcommand>-<dataset> (distill: "
                                     "runs/distill-<method>-<dataset>).")
    method: str = _flag("string", "fsp", _methods_help)
    method_options: Tuple[str, ...] = _flag(
        "list", (), "distill: settings of the method's recipe as NAME=VALUE pairs separated by "
        "commas, each read as its default's type, e.g. --method_options beta=1,warmup_epochs=5 "
        "for dkd (a wrong name is refused with the method's settings and their defaults).")
    teacher_depth: Union[int, Tuple[int, ...]] = _flag(
        "list", 26, "Depth of the teacher CIFAR ResNet (6n+2); with several --teacher, one "
        "value for all or one per teacher (26,26): the depth of each .weights.h5 teacher.",
        per_teacher=True)
    student_depth: int = _flag("integer", 8, "Depth of the student CIFAR ResNet (6n+2).")
    teacher_width: Union[int, Tuple[int, ...]] = _flag(
        "list", 1, "Width multiplier of the teacher CIFAR ResNet (16w, 32w, 64w channels; 4 "
        "makes a ResNet-26 of 5.9M weights); with several --teacher, one value for all or one "
        "per teacher (4,1).", per_teacher=True)
    student_width: int = _flag("integer", 1, "Width multiplier of the student CIFAR ResNet.")
    teacher: Union[None, str, Tuple[str, ...]] = _flag(
        "multi_string", None, "distill/visualize: the trained teacher, a .keras file, a "
        "train-teacher run folder, or a .weights.h5 file of a "
        "ResNet-<teacher_depth>x<teacher_width>; default the train-teacher-<dataset> folder "
        "beside --model_dir. distill: repeat it (--teacher A --teacher B) or give A,B to distil "
        "from several teachers at once, through their ensemble (keras_fsp.teacher_ensemble: "
        "the weighted mean of their logits, --teacher_weights; feature methods read the first "
        "teacher); config.json then lists them. train-teacher: the network to train, as "
        "--student takes it; default ResNet-<teacher_depth>")  # absl adds "; repeat ..."
    teacher_weights: Tuple[float, ...] = _flag(
        "list", (), "distill with several --teacher: the weight of each teacher's logits in "
        "their mean, one per teacher (e.g. 0.7,0.3); default equal.")
    student: Optional[str] = _flag("string", None, "distill: the student, a .keras file (its "
                                   "architecture and starting weights), a keras.applications "
                                   "name (e.g. MobileNetV3Small, built with weights=None for "
                                   "the data) or module:function (or file.py:function) "
                                   "returning a Keras model, called with input_shape and "
                                   "num_classes; default ResNet-<student_depth>.")
    model: Optional[str] = _flag("string", None, "evaluate/export/visualize: the trained network, "
                                 "a .keras file or a run folder; default the "
                                 "distill-fsp-<dataset> folder beside --model_dir.")
    schedule_scale: float = _flag("float", 1.0, "Multiplies every iteration count of the recipe "
                                  "(the papers' schedules): 0.01 trains 1% as long.")
    epochs: Optional[int] = _flag("integer", None, "Stop after this many epochs in all (default: "
                                  "the whole schedule); run again without it to continue.")
    max_minutes: Optional[float] = _flag("float", None, "Stop after the epoch that passes this many "
                                         "minutes (run the same command again to continue).")
    checkpoint_seconds: Optional[float] = _flag(
        "float", None, "Write an epoch's checkpoint only when this many seconds have passed "
        "since the last one (and at the end); default: every epoch on the CPU, every 30 s on "
        "a GPU.")
    batch_size: int = _flag("integer", 128, "Training batch size.")
    compilation_cache_dir: str = _flag(
        "string", DEFAULT_COMPILATION_CACHE, "JAX on a GPU or TPU: keep compiled programs "
        "here, so that later runs of the same networks skip compilation; empty: no cache.")
    dtype_policy: str = _flag("enum", "float32", "Keras dtype policy of teacher and student while "
                              "training (variables, terms and FSP matrices stay float32); "
                              "mixed_bfloat16 is the faster setting on recent GPUs.",
                              choices=DTYPE_POLICIES)
    teacher_precision: Optional[str] = _flag(
        "enum", None, "distill: run the frozen teacher in a lower precision than the student "
        "(keras_fsp.teacher_precision): bfloat16 or float16 (its weights stored and its layers "
        "computing in that dtype, its batch-norm statistics in float32), or int8 (Keras' int8 "
        "quantization of its Dense, EinsumDense and Embedding layers, the rest in bfloat16: for "
        "transformer teachers; a convolutional teacher is refused). The student, its training "
        "and its export are unchanged; default: the teacher as --dtype_policy builds it.",
        choices=teacher_precision.PRECISIONS)
    optimizer: str = _flag("enum", "sgd", "The optimizer of every stage: sgd (the papers': "
                           "momentum 0.9, their piecewise-constant rates) or adamw (rate 1e-3 "
                           "times --learning_rate_scale, weight decay 0.05 but not on biases, "
                           "normalisations and embeddings, a 5-epoch warm-up then a cosine "
                           "decay to 0 in each stage, gradients clipped to norm 1): the usual "
                           "recipe of Vision Transformers on small data.",
                           choices=("sgd", "adamw"))
    cutout: int = _flag("integer", 0, "Also zero a random square of this many pixels in each "
                        "training image (Cutout; 16 on CIFAR-10), the same for teacher and "
                        "student; 0: none.")
    seed: int = _flag("integer", 0, "Seed of the weights, the data order and the augmentation.")
    temperature: Optional[float] = _flag("float", None, "Soft-target temperature of the methods "
                                         "with soft targets (kd: default 4, fitnet: default 3).")
    learning_rate_scale: float = _flag("float", 1.0, "Multiplies every learning rate of the "
                                       "recipe (each stage's schedule).")
    weight_decay: float = _flag("float", 1e-4, "L2 weight decay of the CIFAR ResNets keras-fsp "
                                "builds (other networks keep their own regularisers).")
    overwrite: bool = _flag("boolean", False, "Start over instead of continuing: the run's "
                            "checkpoints and outputs move to <model_dir>/overwritten/ (replacing "
                            "what an earlier --overwrite put there).")
    formats: Tuple[str, ...] = _flag("list", ("keras", "saved_model"), "export: any of "
                                     f"{', '.join(EXPORT_FILES)} (litert_int8: integer weights "
                                     "and activations, calibrated on training images; litert "
                                     "and onnx need pip install 'keras-fsp[export]').")
    raw_inputs: bool = _flag("boolean", True, "export: the SavedModel, LiteRT and ONNX files "
                             "take raw images (the values the dataset holds, e.g. 0-255 pixels "
                             "as float32) and normalise them with the training set's channel "
                             "statistics (the run's config.json has them); --noraw_inputs: "
                             "normalised inputs, as in training.")
    num_images: int = _flag("integer", 6, "visualize: how many test images.")
    verbose: Optional[int] = _flag("integer", None, "1: a progress bar within each epoch; 2: a "
                                   "line per epoch; 0: nothing but errors (the run's log.txt "
                                   "has every line at every level); default 1 on a terminal, "
                                   "2 otherwise.")
    tensorboard: bool = _flag("boolean", False, "Also write TensorBoard logs (every term's loss "
                              "and the stage) into <model_dir>/tensorboard; needs the tensorboard "
                              "package (pip install 'keras-fsp[tensorboard]').")
    allow_weak_teacher: bool = _flag("boolean", False, "distill: train from a teacher that "
                                     "scores no better than chance on the training images "
                                     "(refused otherwise: it has nothing to teach).")
    plugins: Tuple[str, ...] = _flag("list", (), "Python files or modules to import first: "
                                     "methods, terms or datasets of your own (they register "
                                     "themselves, e.g. keras_fsp.papers.methods.register_method).")

    # -------------------------------------------------------------- making

    @classmethod
    def from_flags(cls, values, subcommand):
        """The `Config` of parsed absl `values`, checked.

        Raises:
            CLIError: naming the flag and what it takes.
        """
        given = {f.name: values[f.name].value for f in _flag_fields()}
        for name in ("formats", "plugins", "image_size", "method_options"):
            given[name] = tuple(given[name] or ())
        teachers = tuple(t for v in given["teacher"] or () for t in v.split(",") if t)
        given["teacher"] = teachers[0] if len(teachers) == 1 else (teachers or None)
        for f in _flag_fields():
            if f.metadata.get("per_teacher"):
                numbers = _numbers(f.name, given[f.name], int)
                given[f.name] = numbers[0] if len(numbers) == 1 else numbers
        given["teacher_weights"] = _numbers("teacher_weights", given["teacher_weights"], float)
        config = cls(subcommand=subcommand, **given)
        config.check()
        return config

    def check(self):
        if self.subcommand not in SUBCOMMANDS:
            raise CLIError(f"unknown subcommand {self.subcommand!r}; choose one of "
                           f"{', '.join(SUBCOMMANDS)}.")
        try:
            methods.get(self.method)
        except ValueError as e:
            raise CLIError(e) from None
        settings = self.method_settings
        if "temperature" in settings and self.temperature is not None:
            raise CLIError("--temperature and --method_options temperature=...: give the "
                           "temperature once.")
        for name in ("schedule_scale", "learning_rate_scale", "weight_decay", "max_minutes",
                     "temperature", "checkpoint_seconds"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise CLIError(f"--{name} must be a finite number; got {value}.")
        for name in ("schedule_scale", "learning_rate_scale", "max_minutes", "temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise CLIError(f"--{name} must be > 0; got {value}.")
        if self.verbose not in (None, 0, 1, 2):
            raise CLIError(f"--verbose must be 0, 1 or 2; got {self.verbose}.")
        for name, least in (("batch_size", 1), ("epochs", 1), ("weight_decay", 0),
                            ("checkpoint_seconds", 0), ("cutout", 0)):
            value = getattr(self, name)
            if value is not None and not value >= least:
                raise CLIError(f"--{name} must be >= {least}; got {value}.")
        self._check_teachers()
        for name in ("teacher_width", "student_width"):
            for width in _values(getattr(self, name)):
                if width < 1:
                    raise CLIError(f"--{name} must be >= 1; got {width}.")
        for name in ("teacher_depth", "student_depth"):
            for depth in _values(getattr(self, name)):
                if depth < 8 or (depth - 2) % 6:
                    raise CLIError(f"--{name} must be 6n+2 (8, 14, 20, 26, 32, 56, 110, ...); "
                                   f"got {depth}.")
        if self.image_size:
            if (len(self.image_size) > 2 or not all(v.strip().isdigit() and int(v) > 0
                                                     for v in self.image_size)):
                raise CLIError(f"--image_size {','.join(self.image_size)}: give H,W (or S), "
                               "positive integers, e.g. --image_size 64,64.")
            if self.dataset.partition(":")[0] not in ("folder", "tfds"):
                raise CLIError(f"--image_size resizes the images of folder: and tfds: datasets "
                               f"only; --dataset {self.dataset} has one size.")
        if not 0 < self.validation_split < 1:
            raise CLIError(f"--validation_split must be between 0 and 1; got "
                           f"{self.validation_split}.")
        unknown = [f for f in self.formats if f not in EXPORT_FILES]
        if unknown or not self.formats:
            raise CLIError(f"--formats {','.join(self.formats)}: choose one or more of "
                           f"{', '.join(EXPORT_FILES)}.")

    def _check_teachers(self):
        """One --teacher but for distill; per-teacher settings, one value or
        one per teacher; teacher weights positive."""
        n = max(1, len(self.teachers))
        if n > 1 and self.subcommand != "distill":
            raise CLIError(f"--teacher: {self.subcommand} takes one network; got {n} "
                           f"({', '.join(self.teachers)}).")
        for name in ("teacher_depth", "teacher_width", "teacher_weights"):
            count = len(_values(getattr(self, name)))
            weights = name == "teacher_weights"  # (none: equal; a setting: one for all)
            if count not in (0 if weights else 1, n):
                raise CLIError(f"--{name} gives {count} values for {n} teacher(s): give one per "
                               "teacher" + ("." if weights else " or one for all."))
        if not all(math.isfinite(w) and w > 0 for w in self.teacher_weights):
            raise CLIError(f"--teacher_weights must be positive numbers; got "
                           f"{','.join(f'{w:g}' for w in self.teacher_weights)}.")

    @property
    def teachers(self):
        """`--teacher` as a tuple of specs (empty when there is none)."""
        if self.teacher is None:
            return ()
        return (self.teacher,) if isinstance(self.teacher, str) else tuple(self.teacher)

    def of_teacher(self, name, index):
        """The value of a per-teacher setting (`teacher_depth`, `teacher_width`)
        for teacher `index`: its own, or the one value given for all."""
        value = getattr(self, name)
        return value if isinstance(value, int) else value[index]

    def resolved(self, given):
        """The config with the paths the subcommand derives filled in;
        `given` are the names of the flags given on the command line.

        evaluate, export and visualize take from `--model`'s run folder what
        it was trained on (dataset, data_dir, image_size, validation_split:
        the flags are needed only to change them) and, for visualize, its
        teacher."""
        changes = {}
        if self.verbose is None:  # as Keras' "auto": a bar where someone watches
            changes["verbose"] = 1 if sys.stdout.isatty() else 2
        trained = self.subcommand in ("evaluate", "export", "visualize")
        if trained and self.model is not None:
            changes.update(_from_run(self.model, given))
        slug = dataset_slug(changes.get("dataset", self.dataset))
        model_dir = self.model_dir
        if model_dir is None:
            name = (f"distill-{self.method}-{slug}" if self.subcommand == "distill"
                    else f"{self.subcommand}-{slug}")
            model_dir = changes["model_dir"] = os.path.join("runs", name)
        parent = os.path.dirname(os.path.abspath(model_dir))
        if trained and self.model is None:
            changes["model"] = os.path.join(parent, f"distill-fsp-{slug}")
            changes.update(_from_run(changes["model"], given))
        if self.subcommand == "distill" and not methods.get(self.method).uses_teacher:
            changes["teacher"] = None  # the student alone has no teacher
        elif self.subcommand in ("distill", "visualize") and self.teacher is None:
            changes["teacher"] = changes.pop("run_teacher", None) or os.path.join(
                parent, f"train-teacher-{dataset_slug(changes.get('dataset', self.dataset))}")
        changes.pop("run_teacher", None)
        return dataclasses.replace(self, **changes)

    @property
    def method_settings(self):
        """`--method_options` as the recipe's keyword arguments.

        Raises:
            CLIError: naming what was wrong and the method's settings.
        """
        try:
            return methods.get(self.method).parse_settings(self.method_options)
        except ValueError as e:
            raise CLIError(f"--method_options for --method {self.method}: {e}") from None

    @property
    def image_hw(self):
        """`--image_size` as `(height, width)`, or None."""
        if not self.image_size:
            return None
        sizes = [int(v) for v in self.image_size]
        return (sizes[0], sizes[-1])

    def as_json(self):
        """The settings as config.json holds them."""
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# The subcommands each flag is for (`keras-fsp SUBCOMMAND --help` lists
# those); a flag not named here is for every subcommand.
_TRAINING_FLAGS = ("schedule_scale", "epochs", "max_minutes", "checkpoint_seconds", "batch_size",
                   "compilation_cache_dir", "dtype_policy", "seed", "learning_rate_scale",
                   "weight_decay", "overwrite", "tensorboard", "optimizer", "cutout")
FLAG_SUBCOMMANDS = {
    **{name: TRAINING for name in _TRAINING_FLAGS},
    **{name: ("distill",) for name in ("method", "method_options", "student_depth",
                                       "student_width", "student", "temperature",
                                       "allow_weak_teacher")},
    **{name: TRAINING for name in ("teacher_depth", "teacher_width")},
    "teacher_weights": ("distill",), "teacher_precision": ("distill",),
    "teacher": (*TRAINING, "visualize"),
    "model": ("evaluate", "export", "visualize"),
    "formats": ("export",), "raw_inputs": ("export",),
    "num_images": ("visualize",),
}


def flags_of(subcommand):
    """The names of the flags `subcommand` reads, or of every flag for None."""
    return [name for name in flag_names()
            if subcommand is None or subcommand in FLAG_SUBCOMMANDS.get(name, SUBCOMMANDS)]


def _flag_fields():
    return [f for f in dataclasses.fields(Config) if "kind" in f.metadata]


def flag_names():
    return [f.name for f in _flag_fields()]


def flag_values():
    """A fresh set of absl flags made from `Config`'s fields (no global
    state: the command can run again in one process)."""
    from absl import flags

    fv = flags.FlagValues()
    for f in _flag_fields():
        kind, help = f.metadata["kind"], f.metadata["help"]
        help = help() if callable(help) else help
        define = getattr(flags, f"DEFINE_{kind}")
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        if kind == "list" and isinstance(default, int):  # a per-teacher setting's one value
            default = [str(default)]
        extra = {"enum_values": list(f.metadata["choices"])} if kind == "enum" else {}
        define(f.name, default, help=help, flag_values=fv, **extra)
    return fv


def _numbers(name, values, kind):
    """The values of the list flag `name` as `kind` numbers, a tuple."""
    try:
        return tuple(kind(v) for v in values or ())
    except ValueError:
        raise CLIError(f"--{name} {','.join(values)}: give {'whole ' if kind is int else ''}"
                       "numbers separated by commas.") from None


def _values(value):
    """A setting of one value or one per teacher, as a tuple."""
    return value if isinstance(value, tuple) else (value,)


# What evaluate, export and visualize take from the run folder of --model.
_DATA_SETTINGS = ("data_dir", "image_size", "validation_split")


def _from_run(model, given):
    """What the run folder holding `model` (a folder, or a .keras file in
    one) says of its data, for the flags not `given`, and its teacher (as
    `run_teacher`, where that path exists)."""
    folder = model if os.path.isdir(model) else os.path.dirname(model)
    run = RunFolder(folder or ".").read_config()
    if not (run and "subcommand" in run and isinstance(run.get("dataset"), str)):
        return {}
    found = {}
    if "dataset" not in given:
        found["dataset"] = run["dataset"]
        for name in _DATA_SETTINGS:
            if name not in given and name in run:
                value = run[name]
                found[name] = tuple(value) if isinstance(value, list) else value
    teacher = run.get("teacher")
    if isinstance(teacher, list) and teacher:  # several: visualize shows the first, whose
        teacher = teacher[0]                    # features the feature methods distilled
    if isinstance(teacher, str) and os.path.exists(teacher):
        found["run_teacher"] = teacher
    return found


def import_code(where, prefix):
    """The module `where` names: a `.py` file (imported once, as
    `<prefix>_<stem>`; FileNotFoundError when it does not exist) or a module
    name. The user's code: plugins, and the networks of `--teacher` and
    `--student`."""
    if not where.endswith(".py"):
        return importlib.import_module(where)
    path = os.path.abspath(where)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    name = f"{prefix}_{os.path.splitext(os.path.basename(path))[0]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def dataset_slug(dataset):
    """`dataset` as a folder-name part: `npz:data/x.npz` -> `npz-x`."""
    prefix, _, argument = dataset.partition(":")
    if not _:
        return dataset
    base = os.path.basename(argument.rstrip("/\\")) or "data"
    return f"{prefix}-" + (base[:-4] if base.endswith(".npz") else base)
