"""The distillation losses: FSP (Yim et al. 2017), FitNets hint (Romero et al.
2015) and soft targets (Hinton et al. 2015).

Each is a `keras.losses.Loss`: `loss(y_true, y_pred)` returns the mean over
the batch (and is scaled for `tf.distribute` like every Keras loss);
`loss.call(y_true, y_pred)` returns the per-example values.
"""

import keras
from keras import ops


def _check_weights(weights, count):
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(
            f"FSPLoss has {len(weights)} weights (lambda_i) for {count} FSP "
            "matrix pairs: give one weight per pair."
        )
    return weights


@keras.saving.register_keras_serializable(package="keras_fsp")
class FSPLoss(keras.losses.Loss):
    """Eq. (2) of the FSP paper: `sum_i lambda_i ||G_i^T - G_i^S||_F^2`.

    The squared Frobenius norm of each teacher/student FSP-matrix difference,
    weighted per pair, summed over pairs, averaged over the batch.

    Args:
        weights: one lambda per pair; `None` means equal weights of 1 (the
            paper's choice).
        normalize: divide each pair's squared norm by its matrix size
            `m * n` (a mean over the matrix entries instead of the paper's
            sum), which keeps the loss near 1 whatever the network widths.
        name: name of the loss.

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
        y_true, y_pred = list(y_true), list(y_pred)
        if len(y_true) != len(y_pred):
            raise ValueError(
                f"FSPLoss got {len(y_true)} teacher and {len(y_pred)} student "
                "FSP matrices: they must come in pairs."
            )
        weights = _check_weights(self.weights, len(y_true))
        total = 0.0
        for w, g_t, g_s in zip(weights, y_true, y_pred):
            diff = ops.cast(g_t, "float32") - ops.cast(g_s, "float32")
            reduce = ops.mean if self.normalize else ops.sum
            total = total + w * reduce(ops.square(diff), axis=(1, 2))
        return total

    def get_config(self):
        return {**super().get_config(), "weights": self.weights, "normalize": self.normalize}


@keras.saving.register_keras_serializable(package="keras_fsp")
class HintLoss(keras.losses.Loss):
    """FitNets hint loss: `1/2 ||hint(x) - regressor(guided(x))||^2`.

    Args:
        normalize: `False` (the paper): sum of squares over the whole feature
            map; `True`: mean over its elements, which keeps the loss scale
            independent of the map size.
        name: name of the loss.

    Call args:
        y_true: the teacher's hint feature map, `(batch, h, w, c)`.
        y_pred: the regressor's output on the student's guided map, same shape.

    Example:

    >>> import numpy as np
    >>> float(HintLoss()(np.ones((2, 2, 2, 1)), np.zeros((2, 2, 2, 1))))
    2.0
    """

    def __init__(self, normalize=False, name="hint_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.normalize = bool(normalize)

    def call(self, y_true, y_pred):
        sq = ops.square(ops.cast(y_true, "float32") - ops.cast(y_pred, "float32"))
        axes = tuple(range(1, len(sq.shape)))
        per_example = ops.mean(sq, axis=axes) if self.normalize else ops.sum(sq, axis=axes)
        return 0.5 * per_example

    def get_config(self):
        return {**super().get_config(), "normalize": self.normalize}


@keras.saving.register_keras_serializable(package="keras_fsp")
class SoftTargetLoss(keras.losses.Loss):
    """Hinton's soft-target loss: `T^2 * H(softmax(z_t / T), softmax(z_s / T))`.

    The cross-entropy between the teacher's and the student's softened
    distributions, multiplied by `T^2` so that its gradients keep their scale
    relative to the hard-label loss when `T` changes. (It differs from the
    KL divergence only by the teacher's entropy, a constant: the gradients
    are the same.) The mix with the hard-label loss is the stage's weights:
    the built-in `"kd"` stage uses `0.9 * soft + 0.1 * hard`.

    Args:
        temperature: `T > 0`.
        name: name of the loss.

    Call args:
        y_true: teacher logits `(batch, classes)`.
        y_pred: student logits `(batch, classes)`.

    Example:

    >>> import numpy as np
    >>> z = np.zeros((1, 4), "float32")
    >>> round(float(SoftTargetLoss(temperature=2.0)(z, z)), 4)  # 4 * ln 4
    5.5452
    """

    def __init__(self, temperature=4.0, name="kd_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        temperature = float(temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}.")
        self.temperature = temperature

    def call(self, y_true, y_pred):
        t = self.temperature
        soft_teacher = ops.softmax(ops.cast(y_true, "float32") / t, axis=-1)
        log_student = ops.log_softmax(ops.cast(y_pred, "float32") / t, axis=-1)
        return -(t * t) * ops.sum(soft_teacher * log_student, axis=-1)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
