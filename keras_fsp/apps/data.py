"""Datasets as NumPy arrays, and their normalisation.

Importing this module does not import TensorFlow: `load_arrays` imports it
(and tensorflow-datasets) only for the tfds datasets.

Datasets (`name` of `load_arrays`, registered by name in `DATASETS` and by
form in `FORMS`; `register_dataset` adds one):

- `"cifar10"`, `"cifar100"`: through tensorflow-datasets (`tfds.load`). They
  need a prepared tfds `data_dir`, or network access to download.
- `"digits"`: scikit-learn's bundled 8x8 handwritten digits, offline: a fixed,
  stratified split (1,297 train / 500 test, seed 0), pixels scaled to
  [0, 1], shape `(N, 8, 8, 1)`.
- `"folder:PATH"`: a folder of images, one sub-folder per class (as
  `keras.utils.image_dataset_from_directory` reads them: classes in
  alphanumeric order of their folder names), either `PATH/train/<class>/*`
  and `PATH/test/<class>/*`, or `PATH/<class>/*` split by a fixed seed
  (`validation_split` of each class's images go to the test split). PNG,
  JPEG, BMP and GIF files, read into memory as uint8; grayscale when every
  image is, RGB otherwise; all of one size or resized to `image_size`.
- `"tfds:NAME"`: any tensorflow-datasets image-classification dataset with
  supervised keys (`tfds.load(NAME, as_supervised=True)`), from `data_dir`;
  without a `test` split, `train` is split as for folders; images resized to
  `image_size` where given (needed when their sizes differ).
- `"npz:PATH"`: a NumPy `.npz` file with `x_train`, `y_train`, `x_test`,
  `y_test` (images NHWC, or NHW for one channel; uint8 or float; integer
  labels, `(N,)` or `(N, 1)`) and optionally `class_names` (without them
  the classes are 0 to the largest training label, each with training
  examples), e.g. CIFAR-10 saved once from any source:

      np.savez("cifar10.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

Training augments inside the compiled step (`keras_fsp.augment.PadCropFlip`,
with the dataset's `info["augment"]`), so the input pipeline is only the
normalisation and the order of the examples (`keras_fsp.training`).

Example:

```python
from keras_fsp.apps import data

(x_train, y_train), (x_test, y_test), info = data.load_arrays("digits")
x_train = data.normalize(x_train, info["mean"], info["std"])
x_test = data.normalize(x_test, info["mean"], info["std"])
```
"""

import dataclasses
import inspect
import os
import socket
from typing import Callable, Optional

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

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# The held-out fraction of a dataset without a test split, and the seed that
# chooses it (fixed: every run and every --seed tests on the same images).
VALIDATION_SPLIT = 0.2
SPLIT_SEED = 0
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
DIGITS_TEST_SIZE = 500
DIGITS_SEED = 0


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message says why and what to do."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
    """The file of an `npz:PATH` dataset does not exist."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset `load_arrays` knows by name.

    Attributes:
        name: its name, e.g. `"cifar10"` or `"npz:data/x.npz"`.
        source: where it comes from, for people.
        load: `load(data_dir, download)` -> `((x_train, y_train), (x_test,
            y_test))` arrays (images NHWC, integer labels), or with a third
            item, the class names found in the files.
        class_names: its classes; None: counted from the training labels
            (0 to the largest, each with training examples).
        augment: the default training augmentation, `{"pad": int, "flip":
            bool}`: `pad` pixels of zero padding (after normalisation: the
            mean colour), a random crop back to the size, a random horizontal
            flip; None: `max(1, round(height / 8))` pixels (4 for 32x32, 1
            for 8x8), flips for 3-channel (colour) images only, since digits
            and letters are not flip-invariant.
    """

    name: str
    source: str
    load: Callable
    class_names: Optional[tuple] = None
    augment: Optional[dict] = None


#: Datasets by name, and forms `PREFIX:ARGUMENT` by prefix (`npz:PATH`):
#: `FORMS[prefix](argument)` -> `Dataset`.
DATASETS = {}
FORMS = {}


def register_dataset(dataset):
    """Makes `dataset` (a `Dataset`) known to `load_arrays` by its name."""
    DATASETS[dataset.name] = dataset
    return dataset


def register_form(prefix, make):
    """Makes `PREFIX:ARGUMENT` names known to `load_arrays`: `make(argument)`
    returns the `Dataset`."""
    FORMS[prefix] = make
    return make


def names():
    """What `load_arrays` takes, for messages and help: the registered
    names and the forms."""
    return [*DATASETS, *(f"{p}:{FORM_ARGUMENTS.get(p, 'ARGUMENT')}" for p in FORMS)]


# ------------------------------------------------------------------ loading


def dataset(name, **options):
    """The `Dataset` called `name` (a registered name or a form); `options`
    (`image_size`, `validation_split`) go to the forms that take them.

    Raises:
        DatasetError: naming what is known when `name` is neither.
    """
    if isinstance(name, str) and name in DATASETS:
        return DATASETS[name]
    prefix, _, argument = name.partition(":") if isinstance(name, str) else ("", "", "")
    if prefix in FORMS and _:
        make = FORMS[prefix]
        accepted = inspect.signature(make).parameters
        return make(argument, **{k: v for k, v in options.items() if k in accepted})
    raise DatasetError(
        f"Unknown dataset {name!r}: use one of {', '.join(names())} (a .npz file "
        f"with {', '.join(NPZ_KEYS)})."
    )


def load_arrays(name, data_dir=None, download=True, image_size=None,
                validation_split=VALIDATION_SPLIT):
    """Loads a dataset as NumPy arrays, with what a model needs to know.

    Args:
        name: a registered name (`"cifar10"`, `"cifar100"`, `"digits"`) or
            a form (`"folder:PATH"`, `"tfds:NAME"`, `"npz:PATH"`), see
            `DATASETS` and `FORMS`.
        data_dir: tensorflow-datasets data directory (cifar10/cifar100 and
            `tfds:`); default tfds' own (`~/tensorflow_datasets`).
        download: whether tfds may download and prepare a missing dataset.
            Without network access the download is not attempted (the host is
            checked first, which takes at most a few seconds).
        image_size: `(height, width)` the images of `folder:` and `tfds:`
            datasets are resized to; None: their own (one size for all).
        validation_split: the fraction of each class's images that a
            `folder:` without `train/` and `test/`, or a `tfds:` dataset
            without a `test` split, holds out as its test split.

    Returns:
        `((x_train, y_train), (x_test, y_test), info)`. Images keep their
        stored dtype (uint8 for CIFAR, float32 in [0, 1] for digits), NHWC;
        labels are int32 vectors. `info` is a dict with `name`,
        `num_classes`, `input_shape`, `class_names`, `mean` and `std`
        (float32 per-channel statistics of the training images, in the
        images' own units, for `normalize`), and `augment` (the dataset's
        default augmentation, `{"pad": int, "flip": bool}`, for
        `keras_fsp.augment.PadCropFlip`).

    Raises:
        DatasetError: an unknown name, a missing or malformed `.npz` file, or
            a tfds dataset that is neither prepared in `data_dir` nor
            downloadable (one line saying what to do).
    """
    spec = dataset(name, image_size=image_size, validation_split=validation_split)
    loaded = spec.load(data_dir, download)
    (x_train, y_train), (x_test, y_test) = loaded[:2]
    class_names = spec.class_names or (loaded[2] if len(loaded) > 2 else None)
    # Counted from the training labels only: a test-only label is an error
    # (keras_fsp.data_checks), not one more output.
    num_classes = int(y_train.max(initial=0)) + 1
    if class_names is not None:
        if len(class_names) < num_classes:
            raise DatasetError(
                f"{name}: class_names has {len(class_names)} entries but "
                f"the labels go up to {num_classes - 1}."
            )
        num_classes = len(class_names)
    else:
        # Without allocating anything of the largest label's size (10^9).
        present = np.unique(y_train)
        missing = num_classes - len(present)
        if missing:  # e.g. one label 200 among 0..9: not 201 classes
            first = int(np.flatnonzero(present != np.arange(len(present)))[0]) if (
                present[-1] != len(present) - 1) else len(present)
            raise DatasetError(
                f"{name}: y_train's labels go up to {num_classes - 1} but {missing} "
                f"below it have no example (e.g. {first}): number the classes "
                "0 to K-1, or give class_names."
            )
        class_names = [str(i) for i in range(num_classes)]
    augment = spec.augment
    if augment is None:
        height, channels = x_train.shape[1], x_train.shape[-1]
        augment = {"pad": max(1, int(round(height / 8))), "flip": channels == 3}
    mean, std = channel_stats(x_train)
    info = {
        "name": name,
        "num_classes": int(num_classes),
        "input_shape": tuple(int(d) for d in x_train.shape[1:]),
        "class_names": [str(c) for c in class_names],
        "mean": mean,
        "std": std,
        "augment": dict(augment),
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
    # NaN/inf images give NaN statistics quietly: keras_fsp.data_checks
    # refuses such images with a clearer message.
    with np.errstate(invalid="ignore", over="ignore"):
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
    if not len(y):
        raise DatasetError(f"{source}: the {split} split is empty: it needs at least one image.")
    if not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
        raise DatasetError(f"{source}: y_{split} must be integer class labels.")
    # In the labels' own dtype, before anything is cast or allocated from them.
    low, high = int(np.argmin(y)), int(np.argmax(y))
    if y[low] < 0:
        raise DatasetError(f"{source}: y_{split} has label {y[low]} at index {low}: labels are "
                           "class numbers from 0.")
    if y[high] > np.iinfo("int32").max:
        raise DatasetError(f"{source}: y_{split} has label {y[high]} at index {high}: "
                           "number the classes 0 to K-1.")
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
                    " It holds JPEG-encoded images: decode them and save the arrays "
                    "with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
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


def _load_tfds(name, data_dir, download, image_size=None, validation_split=VALIDATION_SPLIT):
    """`((x_train, y_train), (x_test, y_test), class_names)` of the tfds
    dataset `name` (its `test` split, or a seeded part of `train`)."""
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
            download=allow_download, with_info=True,
        )

    try:
        ds, builder_info = load("train", False)
    except AssertionError as e:  # tfds: "could not find data in ..."
        if not download:
            raise _unavailable(name, data_dir, "it is not prepared and download=False") from e
        host = DOWNLOAD_HOSTS.get(name)
        if host is not None and not _reachable(host):
            raise _unavailable(name, data_dir, f"it is not prepared and {host} cannot be reached") from e
        try:
            ds, builder_info = load("train", True)
        except Exception as e2:
            raise _unavailable(
                name, data_dir, f"download failed ({type(e2).__name__}: {str(e2)[:200]})"
            ) from e2
    except DatasetError:
        raise
    except Exception as e:
        raise _unavailable(name, data_dir, f"{type(e).__name__}: {str(e)[:200]}") from e
    splits = {"train": ds}
    if "test" in getattr(builder_info, "splits", {}) or not getattr(builder_info, "splits", {}):
        splits["test"] = load("test", False)[0]  # (no split metadata: as under tfds' mocks)
    try:  # a ClassLabel's names, where the dataset has them
        _, label_key = builder_info.supervised_keys
        class_names = [str(n) for n in builder_info.features[label_key].names] or None
    except Exception:  # noqa: BLE001 - no names: counted from the labels
        class_names = None
    arrays = {split: _tfds_arrays(tfds, ds, split, name, image_size)
              for split, ds in splits.items()}
    if "test" not in arrays:
        arrays["train"], arrays["test"] = held_out(*arrays["train"], validation_split,
                                                   f"{name} (no test split)")
    return arrays["train"], arrays["test"], class_names


def _tfds_arrays(tfds, ds, split, name, image_size):
    import tensorflow as tf

    shape = ds.element_spec[0].shape
    if image_size is not None:
        size = tuple(int(v) for v in image_size)
        ds = ds.map(lambda x, y: (tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
            x, size)), 0, 255), x.dtype), y))
    elif shape.rank == 3 and None in shape.as_list()[:2]:
        raise DatasetError(f"tfds:{name}: its images differ in size; pass --image_size H,W "
                           "(image_size=(H, W)) to resize them.")
    # Not tfds.load(batch_size=-1): it batches by the split sizes in the
    # dataset's metadata, and with none (as under tfds.testing.mock_data)
    # batches by sys.maxsize, which aborts TensorFlow 2.21's process.
    xs, ys = [], []
    for x, y in tfds.as_numpy(ds.batch(10000)):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise DatasetError(f"Dataset {name!r}: its {split} split is empty.")
    return _check_split(np.concatenate(xs), np.concatenate(ys), split, name)


def held_out(x, y, fraction, source):
    """`((x_train, y_train), (x_test, y_test))`: `fraction` of each class's
    examples (at least one, where a class has two) held out as the test
    split, chosen by the fixed `SPLIT_SEED`."""
    if not 0 < fraction < 1:
        raise DatasetError(f"{source}: the validation split must be between 0 and 1; got "
                           f"{fraction}.")
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        count = int(round(fraction * len(members)))
        count = min(max(count, 1), len(members) - 1) if len(members) > 1 else 0
        test.extend(rng.permutation(members)[:count])
    test = np.sort(np.asarray(test, "int64"))
    train = np.setdiff1d(np.arange(len(y)), test)
    if not len(test):
        raise DatasetError(f"{source}: too few images to hold out a test split; give each "
                           "class at least two images, or split the folder into train/ and test/.")
    return (x[train], y[train]), (x[test], y[test])


def _class_folders(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _read_images(path, classes, source):
    """`(images, labels, mode)` of the class sub-folders `classes` of `path`."""
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError(f"{source}: reading image files needs Pillow (pip install "
                           "pillow).") from None
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(path, name)
        found = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_FILES))
        files += [os.path.join(folder, f) for f in found]
        labels += [label] * len(found)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                images.append(image.copy())
        except Exception as e:  # noqa: BLE001 - a broken file is the user's input
            raise DatasetError(f"{source}: cannot read {file} ({type(e).__name__}: {e}); "
                               "remove or replace it.") from None
    return images, np.asarray(labels, "int32")


def _as_array(images, mode, image_size, source):
    converted = [im.convert(mode) for im in images]
    if image_size is not None:
        height, width = (int(v) for v in image_size)
        converted = [im if im.size == (width, height) else im.resize((width, height))
                     for im in converted]
    sizes = sorted({im.size for im in converted})
    if len(sizes) > 1:
        raise DatasetError(f"{source}: the images differ in size ({sizes[0][1]}x{sizes[0][0]}, "
                           f"{sizes[1][1]}x{sizes[1][0]}, ...); pass --image_size H,W to resize "
                           "them.")
    x = np.stack([np.asarray(im, "uint8") for im in converted]) if converted else None
    return x if x is None or x.ndim == 4 else x[..., None]


def _load_folder(path, image_size=None, validation_split=VALIDATION_SPLIT):
    source = f"folder:{path}"
    if not path:
        raise DatasetError("folder:PATH needs a path to a folder with one sub-folder of images "
                           "per class (or train/ and test/ folders holding those).")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise DatasetFileNotFoundError(f"{source}: no such folder.")
    top = _class_folders(path)
    split = "train" in top and "test" in top
    parts = {s: os.path.join(path, s) for s in ("train", "test")} if split else {"train": path}
    classes = _class_folders(parts["train"])
    if not classes:
        raise DatasetError(f"{source}: no class sub-folders; expected PATH/<class>/*.png (or "
                           "PATH/train/<class>/* and PATH/test/<class>/*).")
    if split and _class_folders(parts["test"]) != classes:
        extra = sorted(set(_class_folders(parts["test"])) - set(classes))
        raise DatasetError(f"{source}: test/ has class folders that train/ has not: {extra}; "
                           "give both the same class sub-folders." if extra else
                           f"{source}: test/ lacks some of train/'s class folders; give both "
                           "the same class sub-folders.")
    read = {s: _read_images(p, classes, source) for s, p in parts.items()}
    if not len(read["train"][1]):
        raise DatasetError(f"{source}: no image files ({', '.join(IMAGE_FILES)}) in its class "
                           "folders.")
    # Grayscale only when every image is; otherwise everything as RGB.
    every = [im for images, _ in read.values() for im in images]
    mode = "L" if all(im.mode in ("L", "1", "I;16") for im in every) else "RGB"
    arrays = {s: (_as_array(images, mode, image_size, source), labels)
              for s, (images, labels) in read.items()}
    if split:
        sizes = {arrays[s][0].shape[1:] for s in arrays if arrays[s][0] is not None}
        if len(sizes) > 1:
            raise DatasetError(f"{source}: train/ and test/ images differ in size; pass "
                               "--image_size H,W to resize them.")
        train, test = arrays["train"], arrays["test"]
        if train[0] is None or test[0] is None:
            raise DatasetError(f"{source}: the {'train' if train[0] is None else 'test'} split "
                               "is empty: it needs at least one image.")
    else:
        train, test = held_out(*arrays["train"], validation_split, source)
    return _check_split(*train, "train", source), _check_split(*test, "test", source), classes


# ------------------------------------------------------------ normalisation


def normalize(x, mean, std, chunk=8192):
    """`(x - mean) / std` per channel, as float32 (in chunks, so uint8 CIFAR
    is never copied whole to float64).

    Args:
        x: images `(N, H, W, C)` (uint8 or float).
        mean, std: per-channel statistics (`info["mean"]`, `info["std"]`).

    Returns:
        float32 array of `x`'s shape.
    """
    x = np.asarray(x)
    mean = np.asarray(mean, "float32").reshape(-1)
    inv_std = 1.0 / np.asarray(std, "float32").reshape(-1)
    if mean.size not in (1, x.shape[-1]) or inv_std.size not in (1, x.shape[-1]):
        raise ValueError(
            f"mean and std need 1 or {x.shape[-1]} values (one per channel); got "
            f"{mean.size} and {inv_std.size}."
        )
    out = np.empty(x.shape, "float32")
    for start in range(0, len(x), chunk):
        out[start:start + chunk] = (x[start:start + chunk].astype("float32") - mean) * inv_std
    return out


# ------------------------------------------------------------- the datasets

DOWNLOAD_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}
FORM_ARGUMENTS = {"npz": "PATH", "folder": "PATH", "tfds": "NAME"}
_CIFAR_AUGMENT = {"pad": 4, "flip": True}


def _tfds(name, image_size=None, validation_split=VALIDATION_SPLIT):
    return lambda data_dir, download: _load_tfds(name, data_dir, download, image_size,
                                                 validation_split)[:2]


register_dataset(Dataset("cifar10", "tensorflow-datasets", _tfds("cifar10"), CIFAR10_CLASSES,
                         _CIFAR_AUGMENT))
register_dataset(Dataset("cifar100", "tensorflow-datasets", _tfds("cifar100"), CIFAR100_CLASSES,
                         _CIFAR_AUGMENT))
register_dataset(Dataset("digits", "scikit-learn (bundled, offline)",
                         lambda data_dir, download: load_digits_split(),
                         tuple(str(i) for i in range(10)), {"pad": 1, "flip": False}))
register_form("npz", lambda path: Dataset(f"npz:{path}", f"a .npz file with {', '.join(NPZ_KEYS)}",
                                          lambda data_dir, download: _load_npz(path)))
register_form("folder", lambda path, image_size=None, validation_split=VALIDATION_SPLIT: Dataset(
    f"folder:{path}", "a folder of images, one sub-folder per class",
    lambda data_dir, download: _load_folder(path, image_size, validation_split)))
register_form("tfds", lambda name, image_size=None, validation_split=VALIDATION_SPLIT: Dataset(
    f"tfds:{name}", "tensorflow-datasets",
    lambda data_dir, download: _load_tfds(name, data_dir, download, image_size,
                                          validation_split)))
