"""keras_fsp's maths as `keras.losses.Loss` objects: FSP (Yim et al. 2017),
the FitNets hint (Romero et al. 2015) and soft targets (Hinton et al. 2015).

`loss(y_true, y_pred)` returns the mean over the batch (scaled for
`tf.distribute` like every Keras loss); `loss.call(y_true, y_pred)` the
per-example values. The maths is the terms' (`keras_fsp.terms`).
"""

import keras

from keras_fsp.terms.fsp import fsp_distance
from keras_fsp.terms.hint import hint_distance
from keras_fsp.terms.soft_targets import check_temperature, soft_target_loss


@keras.saving.register_keras_serializable(package="keras_fsp")
class FSPLoss(keras.losses.Loss):
    """Eq. (2) of the FSP paper: `sum_i lambda_i ||G_i^T - G_i^S||_F^2`
    (`keras_fsp.terms.fsp_distance`).

    Args:
        weights: one lambda per pair; `None` means 1 each (the paper).
        normalize: a mean over each matrix's entries instead of their sum.

    Call args:
        y_true: list of teacher FSP matrices, each `(batch, m_i, n_i)`.
        y_pred: list of student FSP matrices, same shapes.

    Example:

    >>> import numpy as np
    >>> g_t = [np.ones((2, 3, 4), "float32")]
    >>> g_s = [np.zeros((2, 3, 4), "float32")]
    >>> float(FSPLoss()(g_t, g_s))
    12.0
    """

    def __init__(self, weights=None, normalize=False, name="fsp_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.normalize = bool(normalize)

    def call(self, y_true, y_pred):
        return fsp_distance(y_true, y_pred, self.weights, self.normalize)

    def get_config(self):
        return {**super().get_config(), "weights": self.weights, "normalize": self.normalize}


@keras.saving.register_keras_serializable(package="keras_fsp")
class HintLoss(keras.losses.Loss):
    """FitNets hint loss: `1/2 ||hint(x) - regressor(guided(x))||^2`
    (`keras_fsp.terms.hint_distance`).

    Args:
        normalize: a mean over the map's elements instead of their sum.

    Call args:
        y_true: the teacher's hint map, `(batch, h, w, c)`.
        y_pred: the regressor's output on the student's guided map.

    Example:

    >>> import numpy as np
    >>> float(HintLoss()(np.ones((2, 2, 2, 1)), np.zeros((2, 2, 2, 1))))
    2.0
    """

    def __init__(self, normalize=False, name="hint_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.normalize = bool(normalize)

    def call(self, y_true, y_pred):
        return hint_distance(y_true, y_pred, self.normalize)

    def get_config(self):
        return {**super().get_config(), "normalize": self.normalize}


@keras.saving.register_keras_serializable(package="keras_fsp")
class SoftTargetLoss(keras.losses.Loss):
    """Hinton's soft-target loss, `T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`
    (`keras_fsp.terms.soft_target_loss`).

    Call args:
        y_true: teacher logits `(batch, classes)`.
        y_pred: student logits `(batch, classes)`.

    Example:

    >>> import numpy as np
    >>> t = np.array([[100.0, 0.0]], "float32")  # a certain teacher
    >>> round(float(SoftTargetLoss(temperature=1.0)(t, np.zeros((1, 2), "float32"))), 4)  # ln 2
    0.6931
    """

    def __init__(self, temperature=4.0, name="kd_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = check_temperature(temperature)

    def call(self, y_true, y_pred):
        return soft_target_loss(y_true, y_pred, self.temperature)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
