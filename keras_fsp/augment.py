"""Data augmentation inside the compiled step (backend-agnostic).

Doing pad-and-crop, flips, cutout and mixup on the device, in the same step
as the forward passes, keeps the accelerator from waiting for the CPU, and
lets the distiller hand the teacher exactly the augmented batch the student
sees. Each layer keeps its random state in a `SeedGenerator` (a layer
variable), so it advances across the steps of a compiled loop and is saved
in the run's checkpoints.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_fsp")
class PadCropFlip(keras.layers.Layer):
    """Zero-pad by `pad` pixels, crop back at a random offset, flip at random.

    The CIFAR augmentation of He et al. and the FSP paper (4-pixel pad, random
    32x32 crop, horizontal flip). Each image gets its own offset and flip.
    Identity when not training.

    Args:
        pad: pixels of zero padding on each side (0 disables cropping).
        flip: random horizontal flips.
        seed: seed of the layer's random generator.

    Example:

    >>> import numpy as np
    >>> layer = PadCropFlip(pad=4, seed=0)
    >>> tuple(layer(np.zeros((2, 32, 32, 3)), training=True).shape)
    (2, 32, 32, 3)
    """

    def __init__(self, pad=4, flip=True, seed=None, **kwargs):
        super().__init__(**kwargs)
        if pad < 0:
            raise ValueError(f"pad must be >= 0; got {pad}.")
        self.pad, self.flip, self.seed = int(pad), bool(flip), seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True  # no weights; its random state is made above

    def _crop(self, x):
        p = self.pad
        b = ops.shape(x)[0]
        h, w, c = x.shape[1], x.shape[2], x.shape[3]
        padded = ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        dy = keras.random.randint((b,), 0, 2 * p + 1, seed=self.seed_generator)
        dx = keras.random.randint((b,), 0, 2 * p + 1, seed=self.seed_generator)
        # Gathers, not one-hot matrix products: exact on GPUs whose float32
        # matrix products round to TF32.
        rows = dy[:, None] + ops.arange(h)[None, :]
        rows = ops.broadcast_to(rows[:, :, None, None], (b, h, w + 2 * p, c))
        out = ops.take_along_axis(padded, rows, axis=1)
        cols = dx[:, None] + ops.arange(w)[None, :]
        cols = ops.broadcast_to(cols[:, None, :, None], (b, h, w, c))
        return ops.take_along_axis(out, cols, axis=2)

    def call(self, inputs, training=None):
        if not training:
            return inputs
        x = inputs
        if self.pad:
            x = self._crop(x)
        if self.flip:
            b = ops.shape(x)[0]
            coin = keras.random.uniform((b, 1, 1, 1), seed=self.seed_generator)
            x = ops.where(coin < 0.5, ops.flip(x, axis=2), x)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "pad": self.pad, "flip": self.flip, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_fsp")
class Cutout(keras.layers.Layer):
    """Zeroes a `size` x `size` square at a random centre of each image
    (DeVries & Taylor 2017; 16 pixels on CIFAR-10), clipped at the borders.
    Identity when not training. Given after `PadCropFlip`, teacher and
    student see the same cut (the distiller augments once per batch).

    Args:
        size: the square's side in pixels (0 disables it).
        seed: seed of the layer's random generator.
    """

    def __init__(self, size=16, seed=None, **kwargs):
        super().__init__(**kwargs)
        if size < 0:
            raise ValueError(f"size must be >= 0; got {size}.")
        self.size, self.seed = int(size), seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True

    def call(self, inputs, training=None):
        if not training or not self.size:
            return inputs
        b, h, w = ops.shape(inputs)[0], inputs.shape[1], inputs.shape[2]
        cy = keras.random.randint((b, 1), 0, h, seed=self.seed_generator)
        cx = keras.random.randint((b, 1), 0, w, seed=self.seed_generator)
        low = self.size // 2

        def inside(centre, n):  # (batch, n): which rows (columns) the square covers
            i = ops.arange(n)[None, :]
            return ops.logical_and(i >= centre - low, i < centre - low + self.size)

        cut = ops.logical_and(inside(cy, h)[:, :, None], inside(cx, w)[:, None, :])
        return ops.where(cut[..., None], ops.zeros_like(inputs), inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "size": self.size, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_fsp")
class MixUp(keras.layers.Layer):
    """Mixes each image with another of the same batch (Zhang et al. 2018):
    `lam * x + (1 - lam) * x[perm]`, `perm` a random permutation of the
    batch, `lam ~ Beta(alpha, alpha)` folded into [0.5, 1] (`max(lam, 1 -
    lam)`: the same mixtures, and each image stays the larger part of its
    own, so its label is still the best single label of the mix). One `lam`
    for the whole batch (as Beyer et al. 2022, big_vision's `mixup`), or one
    per image with `per_example=True`. Identity when not training.

    The labels are not mixed: a loss on the labels sees the dominant
    image's only. Distillation by function matching (the teacher's
    predictions on the same mixed batch, no labels) needs nothing else
    (`keras_fsp.papers.recipes.function_matching`). Floating-point inputs
    of any rank `(batch, ...)`.

    Args:
        alpha: the Beta distribution's concentration, > 0 (1: `lam`
            uniform on [0.5, 1]; the usual supervised mixup takes 0.1-0.4).
        per_example: one `lam` per image instead of one per batch.
        seed: seed of the layer's random generator.
    """

    def __init__(self, alpha=1.0, per_example=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0; got {alpha}.")
        self.alpha, self.per_example, self.seed = float(alpha), bool(per_example), seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True

    def call(self, inputs, training=None):
        if not training:
            return inputs
        if not keras.backend.is_float_dtype(inputs.dtype):
            raise ValueError(f"MixUp mixes floating-point inputs; got {inputs.dtype} "
                             "(integer tokens cannot be mixed).")
        b = ops.shape(inputs)[0]
        # One draw per image either way, so both settings compile the same
        # Beta sampler (a rejection loop, seconds to compile on XLA's CPU
        # backend); per batch, the first is every image's.
        lam = keras.random.beta((b,), self.alpha, self.alpha, seed=self.seed_generator)
        if not self.per_example:
            lam = ops.broadcast_to(lam[:1], (b,))
        lam = ops.maximum(lam, 1.0 - lam)
        lam = ops.cast(ops.reshape(lam, (-1,) + (1,) * (len(inputs.shape) - 1)), inputs.dtype)
        perm = keras.random.shuffle(ops.arange(b), seed=self.seed_generator)
        # A gather, not a permutation-matrix product: exact on GPUs whose
        # float32 matrix products round to TF32.
        return lam * inputs + (1.0 - lam) * ops.take(inputs, perm, axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "per_example": self.per_example,
                "seed": self.seed}


def chain(*layers, name="augment"):
    """The augmentation of `layers` in order, the Nones left out: None, the
    one layer, or a `keras.Sequential` of them (e.g. `PadCropFlip()` then
    `Cutout()` then `MixUp()`)."""
    layers = [layer for layer in layers if layer is not None]
    if len(layers) <= 1:
        return layers[0] if layers else None
    return keras.Sequential(layers, name=name)
