"""Training data held on the accelerator (backend-agnostic).

`fit` on NumPy arrays gathers every batch on the host and copies it to the
device: on an H100 that cost a ResNet-8 `fit` 0.4 ms per step at batch 128 and
1.7 ms (40% of its time) at batch 512 (BENCHMARKS.md). `DeviceArrays` copies
the arrays to the device once, shuffles them there once per epoch, and hands
`fit` device-resident batches, so the host only dispatches. Pair it with on-device augmentation
(`keras_fsp.augment.PadCropFlip`, or `FSPDistiller(augment=...)`).
"""

import math

import keras
from keras import ops


class DeviceArrays(keras.utils.PyDataset):
    """Batches of `(x, y)` from arrays kept on the device, reshuffled per epoch.

    CIFAR-10's 50,000 training images take 600 MB as float32 (150 MB as
    uint8): they fit on any current accelerator. Each epoch draws one
    permutation on the device; a batch is a device-side gather, so no image
    crosses the host-device link after the first copy.

    Args:
        x: array `(N, ...)` of inputs (NumPy or a backend tensor).
        y: optional array `(N, ...)` of targets.
        batch_size: examples per batch.
        shuffle: reshuffle at the start of every epoch.
        seed: seed of the shuffling (a `keras.random.SeedGenerator`).
        drop_remainder: drop the last partial batch. Keeping it (default)
            costs one extra compilation of the step for its shape.
        dtype: cast `x` to this dtype on the device (e.g. `"float32"` for
            uint8 images); default: keep `x`'s dtype.

    Example:

    ```python
    train = keras_fsp.inputs.DeviceArrays(x_train, y_train, batch_size=128, seed=0)
    distiller.fit(train, epochs=10, validation_data=(x_test, y_test))
    ```
    """

    def __init__(self, x, y=None, batch_size=128, shuffle=True, seed=None,
                 drop_remainder=False, dtype=None):
        super().__init__(workers=1, use_multiprocessing=False)
        n = len(x)
        if y is not None and len(y) != n:
            raise ValueError(
                f"x has {n} examples but y has {len(y)}: they must match."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        if n < batch_size and drop_remainder:
            raise ValueError(
                f"drop_remainder=True with {n} examples and batch_size={batch_size} "
                "leaves no batch: lower the batch size or keep the remainder."
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.num_examples = n
        self.x = ops.convert_to_tensor(x, dtype=dtype)
        self.y = None if y is None else ops.convert_to_tensor(y)
        self._seed = keras.random.SeedGenerator(seed)
        self._order = None
        self.on_epoch_end()

    def __len__(self):
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"Batch {index} of a dataset of {len(self)} batches.")
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.num_examples)
        if self._order is None:
            x = self.x[start:stop]
            y = None if self.y is None else self.y[start:stop]
        else:
            idx = self._order[start:stop]
            x = ops.take(self.x, idx, axis=0)
            y = None if self.y is None else ops.take(self.y, idx, axis=0)
        return (x,) if y is None else (x, y)

    def on_epoch_end(self):
        # Also called once at construction, so the first epoch is shuffled.
        if self.shuffle:
            self._order = keras.random.shuffle(
                ops.arange(self.num_examples, dtype="int32"), seed=self._seed
            )
