"""The package's layout holds: the library never imports the applications,
every file name of a run folder (and of a checkpoint) is written in one
module, and the distiller's constructor stays small."""

import ast
import inspect
import os

import keras_fsp
from keras_fsp import FSPDistiller
from keras_fsp.training import checkpoints, run_folder

PACKAGE = os.path.dirname(os.path.abspath(keras_fsp.__file__))


def _modules():
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, PACKAGE), ast.parse(open(path, encoding="utf-8").read())


def test_the_library_never_imports_the_applications():
    for name, tree in _modules():
        if name.startswith("apps"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            else:
                continue
            assert not any(i.startswith("keras_fsp.apps") or i == "keras_fsp.apps" for i in imported), name
    assert not {"apps", "compat", "jax_steps"} & set(keras_fsp.__all__)


def _strings(tree):
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_each_file_name_of_a_run_folder_is_written_in_one_module():
    owners = {name: "training/run_folder.py" for name in (
        run_folder.CONFIG, run_folder.LOG, run_folder.METRICS, run_folder.RESULT, run_folder.PARTS,
        run_folder.CHECKPOINTS, run_folder.OVERWRITTEN, run_folder.PROCESS_LOG,
        *(f for f in run_folder.EXPORT_FILES.values() if "." in f))}
    # ("export", the SavedModel's folder, is also a subcommand's name, and
    # "tensorboard" a flag's.)
    owners.update({name: "training/checkpoints.py" for name in (
        checkpoints.WEIGHTS_FILE, checkpoints.STATE_FILE, checkpoints.INFO_FILE,
        checkpoints.MANIFEST_FILE, checkpoints.LATEST)})
    found = {name: [] for name in owners}
    for module, tree in _modules():
        for name in _strings(tree) & set(owners):
            found[name].append(module)
    assert found == {name: [owner] for name, owner in owners.items()}


def test_the_distiller_takes_few_arguments():
    parameters = inspect.signature(FSPDistiller.__init__).parameters
    assert list(parameters)[1:] == ["teacher", "student", "terms", "stages", "stage", "augment",
                                    "name", "kwargs"]
