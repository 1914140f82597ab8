"""Many training steps per dispatch on JAX (`compile(steps_per_execution=K)`).

Keras' JAX trainer compiles one training step and, with
`steps_per_execution=K`, still calls it K times from Python: every call
flattens and dispatches the whole state (every variable of the teacher,
student and optimizer), which at CIFAR batch sizes costs about as much as
the step itself. Here the K steps run inside one compiled `jax.lax.scan`: the
state stays on the device between them.

- Training on `keras_fsp.inputs.DeviceArrays`: the batches are gathered
  inside the scan from the device-resident arrays, so Python does nothing
  per batch: Keras' loop sees one step per K batches (callbacks, the
  progress bar and `on_train_batch_end` logs come every K batches; a K of
  one epoch gives one per epoch). Metrics, stage switches, learning-rate
  schedules (the optimizer counts real steps) and resumption at epoch ends
  are unchanged.
- Any other data: Keras' iterator hands over K batches, which are stacked
  and scanned.

On accelerators only: XLA's CPU backend runs convolutions inside a loop
about 20 times slower than the same step called from Python (measured with
JAX 0.10.2), so on the CPU Keras' own loop is kept (`ON_CPU = True` forces
the scan, for tests).

`FSPDistiller` uses it by itself (`make_train_function`, `prepare_fit`);
`install(model)` gives any Keras model (a student trained alone, a teacher)
the same train function.
"""

import functools
import math
import weakref

import keras
import numpy as np

from keras_fsp import compat
from keras_fsp.inputs import DeviceArrays
from keras_fsp.replica_batch_norm import replica_count

ON_CPU = False


def applies(model):
    """Whether `model` trains with the scanned multi-step function."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return (
        (ON_CPU or jax.default_backend() != "cpu")
        and model.steps_per_execution > 1
        and not model.run_eagerly
        and model.jit_compile
    )


class DeviceBlocks(keras.utils.PyDataset):
    """What Keras' loop iterates when a `DeviceArrays` trains in scans: one
    item per K batches, the item being the block's number (the batches
    themselves are gathered inside the compiled step)."""

    def __init__(self, data, steps):
        import jax

        super().__init__(workers=1, use_multiprocessing=False)
        self.data, self.steps = data, steps
        # Under a distribution Keras splits every item over the devices along
        # its first axis: one copy of the number for each of this process's.
        self._copies = max(1, replica_count() // jax.process_count())

    def __len__(self):
        return math.ceil(len(self.data) / self.steps)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"Block {index} of {len(self)}.")
        return (np.full([self._copies], index, "int32"),)

    def on_epoch_end(self):
        self.data.on_epoch_end()


def _shape_signature(batch):
    return tuple(
        None if leaf is None else (tuple(leaf.shape), str(leaf.dtype))
        for leaf in keras.tree.flatten(batch)
    )


def _shard_batch(data):
    """`data` constrained to the active distribution's data layout (split
    over the devices along the batch): a batch gathered or sliced inside a
    compiled scan has no sharding of its own, and the partitioner would
    otherwise run the whole batch on every device."""
    import jax

    distribution = keras.distribution.distribution()
    if distribution is None:
        return data

    def constrain(a):
        return jax.lax.with_sharding_constraint(a, distribution.get_data_layout(a.shape).backend_layout)

    return jax.tree.map(constrain, data)


def _scan(model, state, batches):
    """Runs `model.train_step` over the leading axis of `batches`."""
    import jax

    def body(carry, data):
        logs, carry = model.train_step(carry, _shard_batch(data))
        return carry, logs

    state, logs = jax.lax.scan(body, state, batches)
    return jax.tree.map(lambda v: v[-1], logs), state


def multi_step_train_function(model, source=None):
    """A train function `(state, iterator) -> (logs, state)` running up to
    `model.steps_per_execution` steps in one compiled scan: over the
    batches of `source` (a `DeviceArrays`, iterated as `DeviceBlocks`), or
    over K batches pulled from Keras' iterator and stacked.

    A smaller last batch runs in a scan of its own (compiled once for that
    shape).
    """
    import jax
    import jax.numpy as jnp

    out_shardings = None
    if keras.distribution.distribution() is not None:
        out_shardings = (None, compat.state_sharding_spec(model))
    steps = model.steps_per_execution

    def stacked_run(state, batches):
        return _scan(model, state, jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches))

    def gathered_run(state, x, y, index):  # index: (steps, batch)
        def take(a):  # x may be a dict (inputs and a teacher cache)
            return jax.tree.map(lambda leaf: jnp.take(leaf, index, axis=0), a)

        return _scan(model, state, (take(x), take(y)))

    if source is None:
        compiled = jax.jit(stacked_run, donate_argnums=0, out_shardings=out_shardings)

        def train_function(state, iterator):
            batches = [next(iterator)]  # StopIteration ends the epoch, as in Keras
            for _ in range(steps - 1):
                try:
                    batches.append(next(iterator))
                except StopIteration:
                    break
            groups = [[batches[0]]]
            for batch in batches[1:]:
                if _shape_signature(batch) == _shape_signature(groups[-1][0]):
                    groups[-1].append(batch)
                else:
                    groups.append([batch])
            logs = None
            for group in groups:
                logs, state = compiled(state, tuple(group))
            return logs, state

        return train_function

    compiled = jax.jit(gathered_run, donate_argnums=0, out_shardings=out_shardings)
    size, n = source.batch_size, source.num_examples

    def run_block(state, block):
        if hasattr(block, "addressable_data"):  # a JAX array, perhaps split over devices
            block = block.addressable_data(0)
        first = int(np.asarray(block).reshape(-1)[0]) * steps
        last = min(first + steps, len(source))
        order = source.order if source.order is not None else jnp.arange(n, dtype="int32")
        full = min(last, n // size)  # batches of `size` examples
        logs = None
        if full > first:
            index = order[first * size: full * size].reshape(full - first, size)
            logs, state = compiled(state, source.x, source.y, index)
        if last > full:  # the last, smaller batch
            index = order[full * size:].reshape(1, -1)
            logs, state = compiled(state, source.x, source.y, index)
        return logs, state

    def train_function(state, iterator):
        # Keras' loop hands over up to steps_per_execution items per call.
        logs, state = run_block(state, next(iterator)[0])
        for _ in range(steps - 1):
            try:
                item = next(iterator)
            except StopIteration:
                break
            logs, state = run_block(state, item[0])
        return logs, state

    return train_function


# model -> the DeviceArrays its scanned train function gathers from.
_SOURCES = weakref.WeakKeyDictionary()


def make_train_function(model, keras_make_train_function, force=False):
    """`model.make_train_function(force)`: the scanned train function where
    it applies (see `applies`), Keras' own elsewhere; on JAX a step that
    raises leaves the model's variables usable
    (`keras_fsp.compat.reattach_state_on_error`)."""
    if not applies(model):
        keras_make_train_function(force)
    elif model.train_function is None or force:
        model.train_function = multi_step_train_function(model, _SOURCES.get(model))
    model.train_function = compat.reattach_state_on_error(model, model.train_function)


def prepare_fit(model, x, kwargs):
    """The `x` to give Keras' `fit`: a `DeviceArrays` becomes `DeviceBlocks`
    (and the source the train function gathers from) when the scan applies;
    the model is then built from one real batch first, as Keras would."""
    source = None
    if isinstance(x, DeviceArrays) and applies(model):
        if kwargs.get("steps_per_epoch") is not None:
            raise ValueError(
                "fit(steps_per_epoch=...) counts Keras steps, which are blocks of "
                "steps_per_execution batches on DeviceArrays here: leave it out and "
                "let DeviceArrays define the epoch."
            )
        compat.symbolic_build(model, x[0])
        source, x = x, DeviceBlocks(x, model.steps_per_execution)
    if source is not _SOURCES.get(model):
        model.train_function = None  # built for another data source
    if source is None:
        _SOURCES.pop(model, None)
    else:
        _SOURCES[model] = source
    return x


def install(model):
    """Gives `model` (any compiled Keras model) the scanned train function on
    JAX when it is compiled with `steps_per_execution > 1`, and the gathered
    path for `DeviceArrays`; elsewhere a no-op. Returns `model`."""
    keras_make, keras_fit = model.make_train_function, model.fit

    def fit(x=None, y=None, **kwargs):
        return keras_fit(prepare_fit(model, x, kwargs), y, **kwargs)

    model.make_train_function = functools.partial(make_train_function, model, keras_make)
    model.fit = fit
    return model
