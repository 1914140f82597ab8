"""keras_fsp: knowledge distillation for Keras 3 with the FSP matrix
(Yim et al., CVPR 2017), dense sequential FSP, FitNets hints, Hinton soft
targets, attention transfer and decoupled KD.

The library (this package): `FSPDistiller`, the loss `terms` (one module per
method, registered by name), `stages`, `callbacks`, `taps` and automatic
`pairing`, `losses` and `keras_distillation` (adapters for Keras' loss APIs),
`teacher_cache`, `ensemble` (several teachers as one), `teacher_precision`
(the frozen teacher in bfloat16, float16 or int8), `augment`,
`inputs`, `kernel_norms`, `export`, `replica_batch_norm`, `training` (run
folders, checkpoints and the one training loop) and `papers` (the papers' networks, recipes and the method
table). `keras_fsp.apps` holds the applications built on it (the
`keras-fsp` command line, datasets, the demo, pictures); the library never
imports them.

keras_fsp never imports TensorFlow at import time (on the TensorFlow backend
Keras does): on JAX it runs without TensorFlow installed, and the
TensorFlow-only parts (SavedModel, LiteRT and ONNX export, tfds datasets)
import it when used.
"""

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "keras-fsp":
    # The command's output is its own: TensorFlow's C++ log lines stay out
    # of it (before TensorFlow is imported; see keras_fsp.native_logs).
    from keras_fsp import native_logs as _native_logs

    _native_logs.filter_stderr()

from keras_fsp import (  # noqa: E402
    augment,
    callbacks,
    ensemble,
    export,
    inputs,
    keras_distillation,
    kernel_norms,
    losses,
    pairing,
    papers,
    replica_batch_norm,
    stages,
    taps,
    teacher_cache,
    teacher_precision,
    terms,
    training,
)
from keras_fsp.distiller import FSPDistiller
from keras_fsp.ensemble import teacher_ensemble
from keras_fsp.export import export_student
from keras_fsp.losses import FSPLoss, HintLoss, SoftTargetLoss
from keras_fsp.papers import recipes
from keras_fsp.replica_batch_norm import ReplicaBatchNormalization, per_replica_batch_norm
from keras_fsp.stages import Stage
from keras_fsp.teacher_precision import teacher_in_precision
from keras_fsp.terms import fsp_matrix

__version__ = "0.3.0"

__all__ = [
    "FSPDistiller",
    "FSPLoss",
    "HintLoss",
    "ReplicaBatchNormalization",
    "SoftTargetLoss",
    "Stage",
    "augment",
    "callbacks",
    "ensemble",
    "export",
    "export_student",
    "fsp_matrix",
    "inputs",
    "keras_distillation",
    "kernel_norms",
    "losses",
    "pairing",
    "papers",
    "per_replica_batch_norm",
    "recipes",
    "replica_batch_norm",
    "stages",
    "taps",
    "teacher_cache",
    "teacher_ensemble",
    "teacher_in_precision",
    "teacher_precision",
    "terms",
    "training",
]
