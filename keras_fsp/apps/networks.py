"""The command line's networks: the CIFAR ResNets it builds, and trained
networks loaded from files or run folders, every mismatch one line."""

import io
import os
import warnings
import zipfile

from keras_fsp.apps.config import CLIError
from keras_fsp.training.run_folder import NETWORKS, RunFolder

TEACHER_NETWORKS = ("teacher", "model")


def resnet(config, role, info):
    """The CIFAR ResNet of `role` ("teacher" or "student": its depth and
    width flags) for the dataset `info` describes."""
    from keras_fsp.papers import cifar_resnet

    return cifar_resnet(getattr(config, f"{role}_depth"), num_classes=int(info["num_classes"]),
                        input_shape=tuple(info["input_shape"]), weight_decay=config.weight_decay,
                        width_multiplier=getattr(config, f"{role}_width"), name=role)


def describe(config, role):
    """`ResNet-26` or `ResNet-26x4` (depth, and width when it is not 1)."""
    width = getattr(config, f"{role}_width")
    return f"ResNet-{getattr(config, f'{role}_depth')}" + (f"x{width}" if width != 1 else "")


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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CLIError(f"--{flag} {path} does not match {what}: {first}") from None
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()]
    if skipped:  # Keras loads what it can and warns about the rest
        raise CLIError(f"--{flag} {path} does not match {what}: {skipped[0]}")
    return model


def load_teacher(config, info):
    """`(teacher, path)`: a ResNet-`teacher_depth` with `--teacher`'s weights."""
    if not os.path.exists(config.teacher):
        raise CLIError(
            f"--teacher {config.teacher}: no such file or folder; train one with `keras-fsp "
            f"train-teacher --dataset {config.dataset} --teacher_depth {config.teacher_depth} "
            f"--model_dir {config.teacher}` or pass --teacher PATH (a .keras or .weights.h5 "
            "file, or a train-teacher run folder)."
        )
    path = resolve_file(config.teacher, TEACHER_NETWORKS, "teacher")
    teacher = resnet(config, "teacher", info)
    what = (f"a {describe(config, 'teacher')} (--teacher_depth, --teacher_width) for "
            f"{config.dataset} ({tuple(info['input_shape'])}, {info['num_classes']} classes)")
    return load_weights_into(teacher, path, "teacher", what), path


def load_trained(config, info, flag="model", stems=NETWORKS):
    """`(network, path)`: a trained network from a .keras file or a run
    folder (any depth), checked against the dataset."""
    import keras

    path = resolve_file(getattr(config, flag), stems, flag)
    if not path.endswith(".keras"):
        raise CLIError(f"--{flag} {path}: evaluate/export/visualize need a .keras file or a "
                       "run folder.")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--{flag} {path}: cannot load it ({type(e).__name__}: {e}).") from None
    shape, classes = tuple(model.input_shape[1:]), model.output_shape[-1]
    want_shape = tuple(info["input_shape"])
    if (len(shape) != len(want_shape) or shape[-1] != want_shape[-1]
            or classes != int(info["num_classes"])):
        raise CLIError(f"--{flag} {path} takes {shape} images and has {classes} classes; "
                       f"--dataset {config.dataset} has {want_shape} and {info['num_classes']}.")
    return model, path
