"""What the example scripts share: their common flags, loading a dataset as
arrays, and training through keras_fsp's training loop (`keras_fsp.training`:
resumable checkpoints, `--max_minutes`, a NaN stop, `metrics.json`).

Every example is `run(flags) -> dict` (the flags as attributes, e.g. absl's
`FLAGS`, or a `types.SimpleNamespace` in tests) plus a thin `main`.
"""

FLAG_OPTIONS = dict(allow_override=True)  # the examples share flag names (absl flags are global)


def define_flags(run_dir, batch_size=128):
    """The flags every example has (all optional): `--dataset --run_dir
    --seed --batch_size --scale --max_minutes --smoke`."""
    from absl import flags

    o = FLAG_OPTIONS
    flags.DEFINE_string("dataset", None, "npz:PATH with x_train, y_train, x_test, y_test, or a "
                        "tensorflow-datasets name the example names in its docstring.", **o)
    flags.DEFINE_string("run_dir", run_dir, "The run's folder: checkpoints, metrics.json, "
                        "weights. Run again to continue an interrupted run.", **o)
    flags.DEFINE_integer("seed", 0, "Seed of the weights, the data order and the augmentation.", **o)
    flags.DEFINE_integer("batch_size", batch_size, "Batch size.", **o)
    flags.DEFINE_float("scale", 1.0, "Multiplies every iteration count of the schedules.", **o)
    flags.DEFINE_float("max_minutes", None, "Stop after the epoch that passes this wall time "
                       "(run again to continue).", **o)
    flags.DEFINE_bool("smoke", False, "Seconds-long run on random data (for tests).", **o)


def load(dataset, default, smoke=False, shape=(32, 32, 3), classes=10, examples=256):
    """`((x_train, y_train), (x_test, y_test))` as uint8/float arrays and
    int labels: `dataset` (`npz:PATH` or a tfds name, through
    `keras_fsp.apps.data.load_arrays`), `default` when it is None, or random
    images with `smoke`."""
    import numpy as np

    if smoke:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (examples,) + tuple(shape), dtype=np.uint8)
        y = np.arange(examples) % classes
        rng.shuffle(y)
        return (x, y), (x[: examples // 4], y[: examples // 4])
    from keras_fsp.apps import data

    (x_train, y_train), (x_test, y_test), _ = data.load_arrays(dataset or default)
    return (x_train, y_train), (x_test, y_test)


def standardize(x_train, *others):
    """Per-channel standardisation fitted on `x_train`, applied to all."""
    from keras_fsp.apps import data

    mean, std = data.channel_stats(x_train)
    return [data.normalize(x, mean, std) for x in (x_train, *others)]


def train(recipe, train_data, test_data, flags, fields=None, **kwargs):
    """`keras_fsp.training.train` with the common flags."""
    from keras_fsp import training

    return training.train(recipe, train_data, test_data, flags.run_dir,
                          batch_size=flags.batch_size, seed=flags.seed,
                          max_minutes=flags.max_minutes, fields=fields, **kwargs)
