"""Data augmentation inside the compiled step (backend-agnostic).

Doing pad-and-crop and flips on the device, in the same step as the forward
passes, keeps the accelerator from waiting for the CPU, and lets the distiller
hand the teacher exactly the augmented batch the student sees.
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
