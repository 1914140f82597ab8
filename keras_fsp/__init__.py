"""keras_fsp: knowledge distillation for Keras 3 with the FSP matrix
(Yim et al., CVPR 2017), FitNets hints, Hinton soft targets and dense,
sequential FSP.

keras_fsp itself never imports TensorFlow at import time (on the TensorFlow
backend Keras does): on JAX it runs without TensorFlow installed, and the
TensorFlow-only parts (`export_student`, `keras_fsp.data`) import it when used.
"""

from keras_fsp import callbacks, models, stages, taps
from keras_fsp.distiller import FSPDistiller
from keras_fsp.fsp import fsp_matrix
from keras_fsp.losses import FSPLoss, HintLoss, SoftTargetLoss
from keras_fsp.stages import Stage

__version__ = "0.1.0"

__all__ = [
    "FSPDistiller",
    "FSPLoss",
    "HintLoss",
    "SoftTargetLoss",
    "Stage",
    "callbacks",
    "export_student",
    "fsp_matrix",
    "models",
    "stages",
    "taps",
]


def export_student(distiller_or_model, path, format="tf_saved_model"):
    """See `keras_fsp.export.export_student`."""
    from keras_fsp.export import export_student as _export

    return _export(distiller_or_model, path, format=format)
