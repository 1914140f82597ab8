"""keras_fsp: knowledge distillation for Keras 3 with the FSP matrix
(Yim et al., CVPR 2017), dense sequential FSP, FitNets hints, Hinton soft
targets, attention transfer and decoupled KD.

The package is split by purpose:

- the library (this folder): `FSPDistiller`, the loss `terms`, `stages`,
  `callbacks`, `taps` and automatic `pairing`, the `fsp` matrix, `losses`,
  `teacher_cache`, `augment`, `inputs`, `kernel_norms`, `export`,
  `replica_batch_norm` (per-replica statistics for data parallelism),
  `keras_distillation` (adapters for `keras.distillation`) and `compat`
  (the Keras internals used, in one place); it depends on Keras and NumPy;
- `keras_fsp.papers`: the papers' networks and recipes;
- `keras_fsp.apps`: the command line, training harness, runs, data, demo
  and pictures.

keras_fsp never imports TensorFlow at import time (on the TensorFlow backend
Keras does): on JAX it runs without TensorFlow installed, and the
TensorFlow-only parts (SavedModel, LiteRT and ONNX export,
`keras_fsp.apps.data`) import it when used.
"""

from keras_fsp import (
    apps,
    augment,
    callbacks,
    compat,
    export,
    fsp,
    inputs,
    jax_steps,
    keras_distillation,
    kernel_norms,
    losses,
    pairing,
    papers,
    replica_batch_norm,
    stages,
    taps,
    teacher_cache,
    terms,
)
from keras_fsp.distiller import FSPDistiller
from keras_fsp.export import export_student
from keras_fsp.fsp import fsp_matrix
from keras_fsp.losses import FSPLoss, HintLoss, SoftTargetLoss
from keras_fsp.papers import recipes
from keras_fsp.replica_batch_norm import ReplicaBatchNormalization, per_replica_batch_norm
from keras_fsp.stages import Stage

__version__ = "0.2.0"

__all__ = [
    "FSPDistiller",
    "FSPLoss",
    "HintLoss",
    "SoftTargetLoss",
    "Stage",
    "apps",
    "augment",
    "callbacks",
    "compat",
    "export",
    "export_student",
    "fsp",
    "fsp_matrix",
    "inputs",
    "jax_steps",
    "keras_distillation",
    "kernel_norms",
    "losses",
    "pairing",
    "papers",
    "recipes",
    "replica_batch_norm",
    "ReplicaBatchNormalization",
    "per_replica_batch_norm",
    "stages",
    "taps",
    "teacher_cache",
    "terms",
]
