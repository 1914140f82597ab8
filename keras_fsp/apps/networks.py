"""The command line's networks: the CIFAR ResNets it builds, the networks
`--teacher` and `--student` name, and trained networks loaded from files or
run folders, every mismatch one line.

A network spec (`--teacher`, `--student`) is one of:
- a `.keras` file (its architecture and weights), or for a teacher also a
  `.weights.h5` file of a CIFAR ResNet (`--teacher_depth`, `--teacher_width`;
  with several teachers, one value for all or one per teacher: `--teacher A
  --teacher B --teacher_width 4,1`) or a run folder holding `teacher.keras`;
- a keras.applications name (`MobileNetV3Small`, `ResNet50`, ...), built with
  `weights=None` for the data's image shape and classes, logits out (no
  softmax) and without its own input preprocessing where it has an option
  for that (keras-fsp normalises the images itself);
- `module:function` or `path/to/file.py:function`, a function returning a
  Keras model, called with the keyword arguments it accepts among
  `input_shape` (the images' `(height, width, channels)`) and `num_classes`.
"""

import dataclasses
import inspect
import io
import os
import re
import warnings
import zipfile

from keras_fsp.apps.config import CLIError, import_code
from keras_fsp.training.run_folder import NETWORKS, RunFolder

TEACHER_NETWORKS = ("teacher", "model")


def _architecture(config, role, index):
    """`(depth, width)` of the CIFAR ResNet of `role`'s flags (teacher
    `index`'s, where several are given)."""
    return tuple(config.of_teacher(f"{role}_{k}", index) if role == "teacher"
                 else getattr(config, f"{role}_{k}") for k in ("depth", "width"))


def resnet(config, role, info, index=0):
    """The CIFAR ResNet of `role` ("teacher" or "student": its depth and
    width flags; teacher `index`'s) for the dataset `info` describes."""
    from keras_fsp.papers import cifar_resnet

    depth, width = _architecture(config, role, index)
    return cifar_resnet(depth, num_classes=int(info["num_classes"]),
                        input_shape=tuple(info["input_shape"]), weight_decay=config.weight_decay,
                        width_multiplier=width, name=role)


def resnet_name(config, role, index=0):
    """`ResNet-26` or `ResNet-26x4`: the CIFAR ResNet the depth and width
    flags of `role` (teacher `index`) describe."""
    depth, width = _architecture(config, role, index)
    return f"ResNet-{depth}" + (f"x{width}" if width != 1 else "")


def describe(config, role):
    """What `--teacher`/`--student` names, or the CIFAR ResNet built when
    it names nothing."""
    spec = getattr(config, role)
    return spec if spec is not None else resnet_name(config, role)


def spec_kind(spec):
    """`"file"` (a path, existing or meant as one), `"function"`
    (`module:function`) or `"application"` (a keras.applications name)."""
    if os.path.exists(spec):
        return "file"
    if ":" in spec:
        return "function"
    return "file" if spec.endswith((".keras", ".h5")) or os.sep in spec else "application"


def application_names():
    import keras

    return sorted(n for n in dir(keras.applications)
                  if n[:1].isupper() and callable(getattr(keras.applications, n)))


def _application(name, flag, info):
    import keras

    make = getattr(keras.applications, name, None)
    if name not in application_names():
        raise CLIError(f"--{flag} {name}: not a file, a module:function or a keras.applications "
                       f"network (one of {', '.join(application_names())}).")
    accepted = inspect.signature(make).parameters
    kwargs = {"weights": None, "input_shape": tuple(info["input_shape"]),
              "classes": int(info["num_classes"])}
    if "classifier_activation" in accepted:
        kwargs["classifier_activation"] = None  # logits, as every term expects
    if "include_preprocessing" in accepted:
        kwargs["include_preprocessing"] = False  # the images come normalised
    try:
        return make(**kwargs)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"--{flag} {name} cannot be built for {tuple(info['input_shape'])} images "
                       f"and {info['num_classes']} classes: {first}") from None


def _function(spec, flag, info):
    import keras

    where, _, name = spec.rpartition(":")
    try:
        module = import_code(where, "keras_fsp_network")
    except FileNotFoundError:
        raise CLIError(f"--{flag} {spec}: no such file {where}.") from None
    except Exception as e:  # noqa: BLE001 - the module is the user's code
        raise CLIError(f"--{flag} {spec}: cannot import {where} ({type(e).__name__}: "
                       f"{e}).") from None
    make = getattr(module, name, None)
    if not callable(make):
        raise CLIError(f"--{flag} {spec}: {where} has no function {name!r}.")
    offered = {"input_shape": tuple(info["input_shape"]), "num_classes": int(info["num_classes"])}
    try:
        accepted = inspect.signature(make).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
        model = make(**{k: v for k, v in offered.items() if takes_any or k in accepted})
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--{flag} {spec} failed ({type(e).__name__}: {e}); it is called with "
                       "the keyword arguments it accepts among input_shape and "
                       "num_classes.") from None
    if not isinstance(model, keras.Model):
        raise CLIError(f"--{flag} {spec} returned a {type(model).__name__}, not a Keras model.")
    return model


def _load_keras(path, flag):
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--{flag} {path}: cannot load it ({type(e).__name__}: {e}).") from None


def check_fits(model, info, flag, source):
    """Refuses a network that does not take the dataset's images or does not
    have one output per class."""
    shape, want = tuple(model.input_shape[1:]), tuple(info["input_shape"])
    classes = model.output_shape[-1]
    fits = (len(shape) == len(want) and shape[-1] == want[-1]
            and all(a in (None, b) for a, b in zip(shape, want)))
    if not fits or classes != int(info["num_classes"]):
        raise CLIError(f"--{flag} {source} takes {shape} images and has {classes} outputs; the "
                       f"dataset has {want} images and {info['num_classes']} classes.")
    return model


def network(config, role, info):
    """The network to train as `role` ("teacher" for train-teacher, or
    "student"): what `--teacher`/`--student` names (see the module's
    docstring), by default the CIFAR ResNet of the depth and width flags."""
    spec = getattr(config, role)
    if spec is None:
        return resnet(config, role, info)
    kind = spec_kind(spec)
    if kind == "file":
        if not os.path.isfile(spec) or not spec.endswith(".keras"):
            raise CLIError(f"--{role} {spec}: expected a .keras file, a keras.applications name "
                           "or module:function.")
        model = _load_keras(spec, role)
    elif kind == "function":
        model = _function(spec, role, info)
    else:
        model = _application(spec, role, info)
    return check_fits(model, info, role, spec)


def _count_h5_variables(path_or_file):
    import h5py

    count = []
    with h5py.File(path_or_file, "r") as f:
        f.visititems(lambda k, v: count.append(k) if isinstance(v, h5py.Dataset) else None)
    return len(count)


def _variables_in_file(path):
    """How many variables a .keras or .weights.h5 file holds."""
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as z:  # Keras' archive: the weights are one .weights.h5
            weights = next(n for n in z.namelist() if n.endswith(".weights.h5"))
            with z.open(weights) as f:
                return _count_h5_variables(io.BytesIO(f.read()))
    return _count_h5_variables(path)


def resolve_file(path, stems, flag):
    """The model file `--flag path` means: the file, or the first of the
    networks `stems` a run folder holds."""
    if os.path.isdir(path):
        found = RunFolder(path).trained_network(stems)
        if found is None:
            names = ", ".join(f"{s}.keras" for s in stems)
            raise CLIError(f"--{flag} {path}: the folder has none of {names}.")
        return found
    if not os.path.exists(path):
        raise CLIError(f"--{flag} {path}: no such file or folder.")
    if not (path.endswith(".keras") or path.endswith(".h5")):
        raise CLIError(f"--{flag} {path}: expected a .keras or .weights.h5 file or a run folder.")
    return path


def _load_error(error):
    """The reason in Keras' message for weights that do not load: which
    variable, its shape in the model and in the file (the message's first
    line names only a layer; the shapes come after a dump of its values)."""
    text = str(error).strip()
    shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", text)
    where = re.search(r"Target variable: <Variable path=([^,>]+)", text)
    count = re.search(r"A total of (\d+) objects could not be loaded", text)
    if shapes and where:
        layers = f"{count.group(1)} layer(s) do not fit; e.g. " if count else ""
        return (f"{layers}{where.group(1)} has shape {shapes.group(1)} in the model and "
                f"{shapes.group(2)} in the file.")
    return text.splitlines()[0] if text else type(error).__name__


def load_weights_into(model, path, flag, what):
    """Loads `path` into `model`, turning any mismatch into a `CLIError`."""
    try:
        n = _variables_in_file(path)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--{flag} {path}: unreadable ({type(e).__name__}: {e}).") from None
    if n != len(model.weights):
        raise CLIError(f"--{flag} {path} does not match {what}: the file has {n} variables, "
                       f"the model {len(model.weights)}.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"--{flag} {path} does not match {what}: {_load_error(e)}") from None
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()]
    if skipped:  # Keras loads what it can and warns about the rest
        raise CLIError(f"--{flag} {path} does not match {what}: {skipped[0]}")
    return model


def load_teacher(config, info, index=0):
    """`(teacher, path)` of `--teacher` number `index`: the network of a
    `.keras` file or run folder, or a ResNet of the teacher's depth and
    width flags (its own of lists: `--teacher_width 4,1`) with a
    `.weights.h5` file's weights."""
    spec = config.teachers[index]
    if spec_kind(spec) != "file":  # untrained: the teacher check refuses it
        return network(dataclasses.replace(config, teacher=spec), "teacher", info), spec
    if not os.path.exists(spec):
        raise CLIError(
            f"--teacher {spec}: no such file or folder; train one with `keras-fsp "
            f"train-teacher --dataset {config.dataset} --teacher_depth "
            f"{config.of_teacher('teacher_depth', index)} --model_dir {spec}` or pass --teacher "
            "PATH (a .keras or .weights.h5 file, or a train-teacher run folder)."
        )
    path = resolve_file(spec, TEACHER_NETWORKS, "teacher")
    if path.endswith(".keras"):
        return check_fits(_load_keras(path, "teacher"), info, "teacher", path), path
    teacher = resnet(config, "teacher", info, index)
    what = (f"a {resnet_name(config, 'teacher', index)} (--teacher_depth, --teacher_width) for "
            f"{config.dataset} ({tuple(info['input_shape'])}, {info['num_classes']} classes)")
    return load_weights_into(teacher, path, "teacher", what), path


def load_trained(config, info, flag="model", stems=NETWORKS):
    """`(network, path)`: a trained network from a .keras file or a run
    folder (any depth), checked against the dataset."""
    path = resolve_file(getattr(config, flag), stems, flag)
    if not path.endswith(".keras"):
        raise CLIError(f"--{flag} {path}: evaluate/export/visualize need a .keras file or a "
                       "run folder.")
    return check_fits(_load_keras(path, flag), info, flag, path), path
