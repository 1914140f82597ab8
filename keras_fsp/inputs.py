"""Training data held on the accelerator (backend-agnostic).

`fit` on NumPy arrays gathers every batch on the host and copies it to the
device. `DeviceArrays` copies the arrays to the device once, draws each
epoch's order there, and hands `fit` device-resident batches, so the host
only dispatches. On JAX with `compile(steps_per_execution=K)` the distiller
goes further (`keras_fsp.jax_steps`): the batches are gathered inside the
compiled loop of K steps, and Python is not involved per batch at all. Pair
it with on-device augmentation (`FSPDistiller(augment=PadCropFlip())`).
"""

import math

import keras
from keras import ops


def _replicated(tensor):
    """`tensor` copied to every device of the active `keras.distribution`
    (once, rather than at every compiled call that gathers batches from it)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return tensor
    layout = keras.distribution.TensorLayout([None] * len(tensor.shape), distribution.device_mesh)
    return keras.distribution.distribute_tensor(tensor, layout)


class DeviceArrays(keras.utils.PyDataset):
    """Batches of `(x, y)` from arrays kept on the device, reshuffled per epoch.

    CIFAR-10's 50,000 training images take 600 MB as float32 (150 MB as
    uint8): they fit on any current accelerator. The order of epoch `e` is a
    permutation that depends only on `(seed, e)`, so a run resumed at epoch
    `e` (`initial_epoch=e`) sees exactly the batches an uninterrupted one
    saw; a batch is a device-side gather.

    Args:
        x: array `(N, ...)` of inputs (NumPy or a backend tensor), or a dict
            of such arrays, e.g. `{"inputs": x, "teacher": cache}` for a
            distiller fit on a teacher cache (`keras_fsp.teacher_cache`).
        y: optional array `(N, ...)` of targets.
        batch_size: examples per batch.
        shuffle: a new order every epoch (else the arrays' order).
        seed: seed of the orders (an int).
        initial_epoch: the epoch the first `fit` starts at (for resuming).
        drop_remainder: drop the last partial batch. Keeping it (default)
            costs one extra compilation of the step for its shape.
        dtype: cast `x` (each of its arrays) to this dtype on the device
            (e.g. `"float32"` for uint8 images); default: keep their dtypes.

    Example:

    ```python
    train = keras_fsp.inputs.DeviceArrays(x_train, y_train, batch_size=128, seed=0)
    distiller.fit(train, epochs=10, validation_data=(x_test, y_test))
    ```
    """

    def __init__(self, x, y=None, batch_size=128, shuffle=True, seed=0, initial_epoch=0,
                 drop_remainder=False, dtype=None):
        super().__init__(workers=1, use_multiprocessing=False)
        arrays = keras.tree.flatten(x)
        n = len(arrays[0])
        lengths = {len(a) for a in arrays}
        if len(lengths) > 1:
            raise ValueError(f"The arrays of x have different lengths {sorted(lengths)}: "
                             "every array needs one row per example.")
        if y is not None and len(y) != n:
            raise ValueError(f"x has {n} examples but y has {len(y)}: they must match.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        if n < batch_size and drop_remainder:
            raise ValueError(
                f"drop_remainder=True with {n} examples and batch_size={batch_size} "
                "leaves no batch: lower the batch size or keep the remainder."
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed or 0)
        self.drop_remainder = drop_remainder
        self.num_examples = n
        self.x = keras.tree.map_structure(
            lambda a: _replicated(ops.convert_to_tensor(a, dtype=dtype)), x)
        self.y = None if y is None else _replicated(ops.convert_to_tensor(y))
        self.epoch = int(initial_epoch)
        self.order = self._order(self.epoch)

    def _order(self, epoch):
        """The example order of `epoch` (None: the arrays' own order)."""
        if not self.shuffle:
            return None
        # A stateless draw from (seed, epoch): resumable at any epoch.
        key = (self.seed * 1_000_003 + epoch) % (2**31 - 1)
        return keras.random.shuffle(ops.arange(self.num_examples, dtype="int32"), seed=key)

    def __len__(self):
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"Batch {index} of a dataset of {len(self)} batches.")
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.num_examples)
        if self.order is None:
            def pick(a):
                return a[start:stop]
        else:
            idx = self.order[start:stop]

            def pick(a):
                return ops.take(a, idx, axis=0)
        x = keras.tree.map_structure(pick, self.x)
        return (x,) if self.y is None else (x, pick(self.y))

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self._order(self.epoch)
