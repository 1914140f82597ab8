"""Input pipelines for training teachers and students (TensorFlow only).

Importing this module does not import TensorFlow: `load_arrays` and
`make_dataset` import it (and tensorflow-datasets) when called.

Datasets (`name` of `load_arrays`, see `DATASETS`):

- `"cifar10"`, `"cifar100"`: through tensorflow-datasets (`tfds.load`). They
  need a prepared tfds `data_dir`, or network access to download.
- `"digits"`: scikit-learn's bundled 8x8 handwritten digits, offline: a fixed,
  stratified split (1,297 train / 500 test, seed 0; the split of
  `keras_fsp.apps.demo`), pixels scaled to [0, 1], shape `(N, 8, 8, 1)`.
- `"npz:PATH"`: a NumPy `.npz` file with `x_train`, `y_train`, `x_test`,
  `y_test` (images NHWC, or NHW for one channel; uint8 or float; integer
  labels, `(N,)` or `(N, 1)`) and optionally `class_names`. For example,
  the real CIFAR-10 kept in `../shared/data` (`datasets.py`), converted once:

      (x_train, y_train), (x_test, y_test) = load_cifar10()
      np.savez("cifar10_arrays.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

  then `load_arrays("npz:cifar10_arrays.npz")`; add
  `class_names=cifar10_class_names()` to keep the names (otherwise classes
  are called "0".."9"). (`shared/data/cifar10.npz` itself holds JPEG data,
  not arrays: it cannot be loaded directly.)

Example:

```python
from keras_fsp.apps import data

(x_train, y_train), (x_test, y_test), info = data.load_arrays("cifar10")
train = data.make_dataset(x_train, y_train, 128, True, info["mean"], info["std"],
                          augment=info["augment"], seed=0)
test = data.make_dataset(x_test, y_test, 500, False, info["mean"], info["std"])
model.fit(train, validation_data=test, epochs=...)
```
"""

import os
import socket

import numpy as np

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor", "train", "trout",
    "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm",
)

#: The dataset names `load_arrays` understands. `augment` is the default
#: training augmentation: `pad` pixels of zero padding (after normalisation,
#: i.e. the mean colour), a random crop back to the original size, and a
#: random horizontal `flip`. For `npz:PATH` it depends on the images: pad
#: `max(1, round(height / 8))` (4 for 32x32, 1 for 8x8) and flip only
#: 3-channel (colour) images, since digits and letters are not flip-invariant.
DATASETS = {
    "cifar10": {
        "source": "tensorflow-datasets",
        "num_classes": 10,
        "input_shape": (32, 32, 3),
        "class_names": CIFAR10_CLASSES,
        "augment": {"pad": 4, "flip": True},
        "download_host": "www.cs.toronto.edu",
    },
    "cifar100": {
        "source": "tensorflow-datasets",
        "num_classes": 100,
        "input_shape": (32, 32, 3),
        "class_names": CIFAR100_CLASSES,
        "augment": {"pad": 4, "flip": True},
        "download_host": "www.cs.toronto.edu",
    },
    "digits": {
        "source": "scikit-learn (bundled, offline)",
        "num_classes": 10,
        "input_shape": (8, 8, 1),
        "class_names": tuple(str(i) for i in range(10)),
        "augment": {"pad": 1, "flip": False},
    },
    "npz:PATH": {
        "source": "a .npz file with x_train, y_train, x_test, y_test",
        "augment": "pad max(1, round(height / 8)); flip colour images only",
    },
}

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_TEST_SIZE = 500
DIGITS_SEED = 0

_VALID_FORMS = "'cifar10', 'cifar100', 'digits' or 'npz:PATH'"


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message says why and what to do."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
    """The file of an `npz:PATH` dataset does not exist."""


# ------------------------------------------------------------------ loading


def load_arrays(name, data_dir=None, download=True):
    """Loads a dataset as NumPy arrays, with what a model needs to know.

    Args:
        name: `"cifar10"`, `"cifar100"`, `"digits"` or `"npz:PATH"` (see
            `DATASETS`).
        data_dir: tensorflow-datasets data directory (cifar10/cifar100 only);
            default tfds' own (`~/tensorflow_datasets`).
        download: whether tfds may download and prepare a missing dataset.
            Without network access the download is not attempted (the host is
            checked first, which takes at most a few seconds).

    Returns:
        `((x_train, y_train), (x_test, y_test), info)`. Images keep their
        stored dtype (uint8 for CIFAR, float32 in [0, 1] for digits), NHWC;
        labels are int32 vectors. `info` is a dict with `name`,
        `num_classes`, `input_shape`, `class_names`, `mean` and `std`
        (float32 per-channel statistics of the training images, in the
        images' own units, for `make_dataset`), and `augment` (the dataset's
        default augmentation, `{"pad": int, "flip": bool}`).

    Raises:
        DatasetError: an unknown name, a missing or malformed `.npz` file, or
            a tfds dataset that is neither prepared in `data_dir` nor
            downloadable (one line saying what to do).
    """
    if not isinstance(name, str):
        raise DatasetError(
            f"Unknown dataset {name!r}: use one of {_VALID_FORMS}."
        )
    if name.startswith("npz:"):
        (x_train, y_train), (x_test, y_test), class_names = _load_npz(name[4:])
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
        if class_names is not None:
            if len(class_names) < num_classes:
                raise DatasetError(
                    f"{name}: class_names has {len(class_names)} entries but "
                    f"the labels go up to {num_classes - 1}."
                )
            num_classes = len(class_names)
        else:
            class_names = [str(i) for i in range(num_classes)]
        height, channels = x_train.shape[1], x_train.shape[-1]
        augment = {"pad": max(1, int(round(height / 8))), "flip": channels == 3}
    elif name in ("cifar10", "cifar100"):
        (x_train, y_train), (x_test, y_test) = _load_tfds(name, data_dir, download)
        spec = DATASETS[name]
        class_names, num_classes = list(spec["class_names"]), spec["num_classes"]
        augment = dict(spec["augment"])
    elif name == "digits":
        (x_train, y_train), (x_test, y_test) = load_digits_split()
        spec = DATASETS[name]
        class_names, num_classes = list(spec["class_names"]), spec["num_classes"]
        augment = dict(spec["augment"])
    else:
        raise DatasetError(
            f"Unknown dataset {name!r}: use one of {_VALID_FORMS} (a .npz file "
            f"with {', '.join(NPZ_KEYS)})."
        )
    mean, std = channel_stats(x_train)
    info = {
        "name": name,
        "num_classes": int(num_classes),
        "input_shape": tuple(int(d) for d in x_train.shape[1:]),
        "class_names": [str(c) for c in class_names],
        "mean": mean,
        "std": std,
        "augment": augment,
    }
    return (x_train, y_train), (x_test, y_test), info


def channel_stats(x, chunk=8192):
    """Per-channel mean and standard deviation of NHWC images (float32).

    Accumulated in float64 over chunks, so uint8 CIFAR is never copied whole
    to float. A channel with zero variance gets std 1.
    """
    channels = x.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    for start in range(0, len(x), chunk):
        part = np.asarray(x[start:start + chunk], np.float64).reshape(-1, channels)
        total += part.sum(0)
        squares += np.square(part).sum(0)
        count += len(part)
    if count == 0:
        raise DatasetError("Cannot compute image statistics of an empty training set.")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    std[std == 0] = 1.0
    return mean.astype("float32"), std.astype("float32")


def _check_split(x, y, split, source):
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DatasetError(
            f"{source}: x_{split} must be images (N, H, W, C) or (N, H, W); "
            f"got shape {x.shape}."
        )
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        x = x.astype("float32")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(
            f"{source}: y_{split} must hold one integer label per image "
            f"({len(x)}); got shape {y.shape}."
        )
    if not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
        raise DatasetError(f"{source}: y_{split} must be integer class labels.")
    if len(y) and y.min() < 0:
        raise DatasetError(f"{source}: y_{split} has negative labels.")
    return x, y.astype("int32")


def _load_npz(path):
    source = f"npz:{path}"
    if not path:
        raise DatasetError(
            "npz:PATH needs a path, e.g. npz:data/cifar10.npz, to a file with "
            f"{', '.join(NPZ_KEYS)}."
        )
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DatasetFileNotFoundError(
            f"{source}: no such file (expected a .npz with {', '.join(NPZ_KEYS)})."
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip / not numpy
        raise DatasetError(f"{source}: not a readable .npz file ({e}).") from None
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            hint = ""
            if "train_scans" in archive.files:
                hint = (
                    " This is the JPEG archive of ../shared/data: convert it "
                    "once with its datasets.load_cifar10() and np.savez(path, "
                    "x_train=..., y_train=..., x_test=..., y_test=...)."
                )
            raise DatasetError(
                f"{source}: missing key(s) {', '.join(missing)}; expected "
                f"{', '.join(NPZ_KEYS)} (found {', '.join(archive.files) or 'none'})."
                + hint
            )
        train = _check_split(archive["x_train"], archive["y_train"], "train", source)
        test = _check_split(archive["x_test"], archive["y_test"], "test", source)
        class_names = (
            [str(c) for c in archive["class_names"]]
            if "class_names" in archive.files
            else None
        )
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DatasetError(
            f"{source}: train images {train[0].shape[1:]} and test images "
            f"{test[0].shape[1:]} differ in shape."
        )
    return train, test, class_names


def load_digits_split(seed=DIGITS_SEED, test_size=DIGITS_TEST_SIZE):
    """scikit-learn's digits as `((x_train, y_train), (x_test, y_test))`:
    pixels in [0, 1], `(N, 8, 8, 1)` float32, int32 labels, a stratified split
    fixed by `seed` (the `"digits"` dataset is `seed=0`, 1,297 / 500)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DatasetError(
            "The 'digits' dataset ships with scikit-learn, which is not installed: "
            "pip install 'keras-fsp[demo]' (or scikit-learn)."
        ) from None

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed
    )
    return (x_train, y_train), (x_test, y_test)


def _reachable(host, port=443, timeout=3.0):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _unavailable(name, data_dir, why):
    where = data_dir or "tfds' default data_dir (~/tensorflow_datasets)"
    return DatasetError(
        f"Dataset {name!r} is not available offline: {why}. {name} needs a "
        f"prepared tensorflow-datasets data_dir (looked in {where}) or network "
        "access to download it; offline, use npz:PATH with your own arrays "
        "(see keras_fsp.apps.data)."
    )


def _load_tfds(name, data_dir, download):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DatasetError(
            f"Dataset {name!r} needs tensorflow-datasets (pip install "
            "tensorflow-datasets); or use npz:PATH."
        ) from None

    def load(split, allow_download):
        return tfds.load(
            name, split=split, as_supervised=True, data_dir=data_dir,
            download=allow_download,
        )

    try:
        splits = [load(s, False) for s in ("train", "test")]
    except AssertionError as e:  # tfds: "could not find data in ..."
        if not download:
            raise _unavailable(name, data_dir, "it is not prepared and download=False") from e
        host = DATASETS[name]["download_host"]
        if not _reachable(host):
            raise _unavailable(name, data_dir, f"it is not prepared and {host} cannot be reached") from e
        try:
            splits = [load(s, True) for s in ("train", "test")]
        except Exception as e2:
            raise _unavailable(
                name, data_dir, f"download failed ({type(e2).__name__}: {str(e2)[:200]})"
            ) from e2
    except Exception as e:
        raise _unavailable(name, data_dir, f"{type(e).__name__}: {str(e)[:200]}") from e
    # Not tfds.load(batch_size=-1): it batches by the split sizes in the
    # dataset's metadata, and with none (as under tfds.testing.mock_data)
    # batches by sys.maxsize, which aborts TensorFlow 2.21's process.
    arrays = []
    for split, ds in zip(("train", "test"), splits):
        xs, ys = [], []
        for x, y in tfds.as_numpy(ds.batch(10000)):
            xs.append(x)
            ys.append(y)
        if not xs:
            raise DatasetError(f"Dataset {name!r}: its {split} split is empty.")
        arrays.append(_check_split(np.concatenate(xs), np.concatenate(ys), split, name))
    return arrays[0], arrays[1]


# ----------------------------------------------------------------- pipeline


def make_dataset(
    x,
    y,
    batch_size,
    training,
    mean,
    std,
    augment=True,
    seed=None,
    drop_remainder=None,
    pad=None,
    flip=None,
    padding="zero",
):
    """A `tf.data.Dataset` of `(images, labels)` batches.

    Images are normalised per channel, `(x - mean) / std`, to float32. When
    `training`, the order is shuffled (all of `x`, by index, reshuffled every
    epoch) and, with `augment`, each image is padded by `pad` pixels on each
    side, randomly cropped back to its size and (if `flip`) randomly flipped
    left-right. Augmentation runs vectorised on each batch in a parallel
    `map`, after normalisation, so zero padding (the paper's) pads with the
    mean colour. Batches are prefetched.

    Args:
        x: images `(N, H, W, C)` (uint8 or float), e.g. from `load_arrays`.
        y: integer labels `(N,)`.
        batch_size: images per batch.
        training: shuffle and augment (the training pipeline) or not (an
            evaluation pipeline: in order, deterministic, un-augmented).
        mean, std: per-channel statistics (`info["mean"]`, `info["std"]`).
        augment: True (pad 4, flip), False, or a dict `{"pad": int, "flip":
            bool}` such as `info["augment"]`, the dataset's defaults (digits:
            pad 1, no flip).
        seed: makes shuffling and augmentation repeatable (each epoch still
            differs). None: random.
        drop_remainder: drop the last, smaller batch; default True when
            training, False otherwise.
        pad, flip: override the values from `augment`.
        padding: `"zero"` (default; zeros after normalisation) or
            `"reflect"`.

    Returns:
        a `tf.data.Dataset` yielding `(float32 (B, H, W, C), int32 (B,))`.
    """
    import tensorflow as tf

    x = np.asarray(x)
    y = np.asarray(y).reshape(-1).astype("int32")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or len(x) != len(y):
        raise ValueError(
            f"make_dataset needs images (N, H, W, C) and N labels; got "
            f"{x.shape} and {y.shape}."
        )
    if padding not in ("zero", "reflect"):
        raise ValueError(f"padding must be 'zero' or 'reflect'; got {padding!r}.")
    if isinstance(augment, dict):
        unknown = set(augment) - {"pad", "flip", "padding"}
        if unknown:
            raise ValueError(f"augment has unknown keys {sorted(unknown)}; use pad, flip.")
        settings = {"pad": 4, "flip": True, "padding": padding, **augment}
        augment = True
    else:
        settings = {"pad": 4, "flip": True, "padding": padding}
    if pad is not None:
        settings["pad"] = pad
    if flip is not None:
        settings["flip"] = flip
    pad, flip = int(settings["pad"]), bool(settings["flip"])
    mode = "CONSTANT" if settings["padding"] == "zero" else "REFLECT"
    if drop_remainder is None:
        drop_remainder = bool(training)
    if drop_remainder and len(x) < batch_size:
        raise ValueError(
            f"{len(x)} images make no full batch of {batch_size}: use a smaller "
            "batch_size or drop_remainder=False."
        )
    height, width, channels = x.shape[1:]
    mean = np.asarray(mean, "float32").reshape(-1)
    std = np.asarray(std, "float32").reshape(-1)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise ValueError(
            f"mean and std need 1 or {channels} values (one per channel); got "
            f"{mean.size} and {std.size}."
        )
    if mode == "REFLECT" and pad >= min(height, width):
        raise ValueError(f"reflect padding of {pad} needs images larger than {pad}.")

    images = tf.constant(x)
    labels = tf.constant(y)
    mean_t = tf.constant(mean)
    inv_std = tf.constant(1.0 / std)

    def normalise(idx):
        batch = tf.cast(tf.gather(images, idx), tf.float32)
        return (batch - mean_t) * inv_std, tf.gather(labels, idx)

    def augment_batch(idx, batch_seed):
        batch, lab = normalise(idx)
        n = tf.shape(batch)[0]
        seeds = tf.random.experimental.stateless_split(
            tf.stack([batch_seed, tf.constant(0, tf.int64)]), 3
        )
        if pad > 0:
            padded = tf.pad(batch, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=mode)
            oy = tf.random.stateless_uniform([n], seeds[0], 0, 2 * pad + 1, tf.int32)
            ox = tf.random.stateless_uniform([n], seeds[1], 0, 2 * pad + 1, tf.int32)
            rows = oy[:, None] + tf.range(height)[None, :]
            cols = ox[:, None] + tf.range(width)[None, :]
            batch = tf.gather(padded, rows, axis=1, batch_dims=1)
            batch = tf.gather(batch, cols, axis=2, batch_dims=1)
        if flip:
            flips = tf.random.stateless_uniform([n], seeds[2]) < 0.5
            batch = tf.where(flips[:, None, None, None], tf.reverse(batch, axis=[2]), batch)
        return batch, lab

    index = tf.data.Dataset.range(len(x))
    if training:
        index = index.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    index = index.batch(batch_size, drop_remainder=drop_remainder)
    if training and augment:
        batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((index, batch_seeds)).map(
            augment_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    else:
        ds = index.map(normalise, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
