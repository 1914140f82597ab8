"""Small models and data shared by the tests, and the fault worker."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_fsp.papers import cifar_resnet
from keras_fsp.training import RunFolder

SHAPE = (16, 16, 3)


def small_pair(weight_decay=0.0, seed=0):
    keras.utils.set_random_seed(seed)
    teacher = cifar_resnet(14, input_shape=SHAPE, weight_decay=weight_decay, name="teacher")
    student = cifar_resnet(8, input_shape=SHAPE, weight_decay=weight_decay, name="student")
    return teacher, student


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + SHAPE).astype("float32"), rng.integers(0, 10, n)


def h5_contents(source):
    """Every group and dataset of an HDF5 file (a path or its bytes): name ->
    (the dataset's value, or None for a group; its attributes)."""
    import io

    import h5py

    contents = {}
    with h5py.File(io.BytesIO(source) if isinstance(source, bytes) else source, "r") as f:
        f.visititems(lambda name, obj: contents.__setitem__(name, (
            obj[()] if isinstance(obj, h5py.Dataset) else None, dict(obj.attrs))))
    return contents


def weights_of(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


class CallCounter(keras.layers.Layer):
    """Counts how often its call is traced or run (eagerly), in `CallCounter.calls`."""

    calls = 0

    def call(self, x):
        type(self).calls += 1
        return x


def run_litert(path, x):
    """`(outputs, tensor dtypes, input details)` of a .tflite file run on `x`
    by LiteRT's interpreter (skips the test without ai-edge-litert)."""
    interpreter = pytest.importorskip("ai_edge_litert.interpreter").Interpreter(
        model_path=str(path))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    dtypes = {t["dtype"] for t in interpreter.get_tensor_details()}
    return interpreter.get_tensor(out["index"]), dtypes, inp


def checkpoints_of(folder, **kwargs):
    """The `Checkpoints` of the run folder `folder`."""
    return RunFolder(folder).checkpoints(**kwargs)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_fault_worker(*args, fault="", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE):
    """`keras-fsp args` started in a subprocess (tests/fault_worker.py) with
    the fault `fault` injected."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3", FAULT=fault)
    return subprocess.Popen([sys.executable, "-m", "tests.fault_worker", *args], cwd=ROOT,
                            env=env, stdout=stdout, stderr=stderr, text=True)
