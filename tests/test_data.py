"""keras_fsp.apps.data: dataset loading, normalisation, errors (augmentation: test_augment)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_fsp.apps import data

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.data pipelines are TensorFlow-only",
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_import_does_not_import_tensorflow():
    code = (
        "import sys, keras_fsp, keras_fsp.apps.data, keras_fsp.apps.visualize\n"
        "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'tf_keras_vis') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_cifar10_through_tfds_mock():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=10):
        (x_train, y_train), (x_test, y_test), info = data.load_arrays("cifar10")
    assert x_train.shape == (10, 32, 32, 3) and x_train.dtype == np.uint8
    assert x_test.shape == (10, 32, 32, 3)
    assert y_train.dtype == np.int32 and y_train.shape == (10,)
    assert info["num_classes"] == 10 and info["input_shape"] == (32, 32, 3)
    assert info["class_names"] == [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ]
    assert info["augment"] == {"pad": 4, "flip": True}
    pixels = x_train.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(info["mean"], pixels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(info["std"], pixels.std(0), rtol=1e-4)

    x = data.normalize(x_train, info["mean"], info["std"])
    assert x.dtype == np.float32 and x.shape == x_train.shape
    np.testing.assert_allclose(x.reshape(-1, 3).mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.reshape(-1, 3).std(0), 1.0, atol=1e-3)


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "gray.npz"
    x_train = rng.integers(0, 256, (20, 16, 16), dtype=np.uint8)  # NHW
    x_test = rng.integers(0, 256, (6, 16, 16), dtype=np.uint8)
    y_train = rng.integers(0, 3, (20, 1))  # Keras-style (N, 1) labels
    y_test = rng.integers(0, 3, 6)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             class_names=np.array(["a", "b", "c"]))
    (xt, yt), (xs, ys), info = data.load_arrays(f"npz:{path}")
    assert xt.shape == (20, 16, 16, 1) and xt.dtype == np.uint8
    np.testing.assert_array_equal(xt[..., 0], x_train)
    np.testing.assert_array_equal(yt, y_train[:, 0])
    np.testing.assert_array_equal(ys, y_test)
    assert yt.dtype == np.int32
    assert info["class_names"] == ["a", "b", "c"] and info["num_classes"] == 3
    assert info["input_shape"] == (16, 16, 1)
    assert info["augment"] == {"pad": 2, "flip": False}  # one channel: no flip
    np.testing.assert_allclose(info["mean"], [x_train.mean()], rtol=1e-5)

    # Float colour images without class names.
    path2 = tmp_path / "colour.npz"
    np.savez(path2, x_train=rng.random((5, 32, 32, 3), dtype=np.float32),
             y_train=np.arange(5), x_test=rng.random((2, 32, 32, 3), dtype=np.float32),
             y_test=np.array([0, 7]))
    (xt, _), _, info = data.load_arrays(f"npz:{path2}")
    assert xt.dtype == np.float32
    # Classes are counted from the training labels: the test-only label 7 is
    # not an eighth class (keras_fsp.data_checks refuses it before training).
    assert info["num_classes"] == 5 and info["class_names"] == ["0", "1", "2", "3", "4"]
    assert info["augment"] == {"pad": 4, "flip": True}


def test_normalize_matches_numpy_in_chunks():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    mean, std = np.array([100.0, 110.0, 120.0]), np.array([50.0, 60.0, 70.0])
    expected = (x.astype(np.float64) - mean) / std
    for chunk in (3, 8192):  # chunk boundaries change nothing
        out = data.normalize(x, mean, std, chunk=chunk)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    gray = rng.random((4, 5, 5, 1)).astype(np.float32)
    np.testing.assert_allclose(data.normalize(gray, [0.5], [0.25]), (gray - 0.5) / 0.25, rtol=1e-5)
    with pytest.raises(ValueError, match="one per channel"):
        data.normalize(x, [1.0, 2.0], [1.0, 2.0])


def test_digits_split():
    (x_train, y_train), (x_test, y_test), info = data.load_arrays("digits")
    assert x_train.shape == (1297, 8, 8, 1) and x_test.shape == (500, 8, 8, 1)
    assert x_train.dtype == np.float32
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert 0.0 <= x_test.min() and x_test.max() <= 1.0
    assert info["num_classes"] == 10 and info["input_shape"] == (8, 8, 1)
    assert info["augment"] == {"pad": 1, "flip": False}
    counts = np.bincount(y_test, minlength=10)
    assert counts.min() >= 48 and counts.max() <= 52  # stratified
    (x_again, _), _, _ = data.load_arrays("digits")
    np.testing.assert_array_equal(x_again, x_train)  # a fixed split


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetError, match=r"Unknown dataset 'imagenet': use one of cifar10, cifar100, digits, npz:PATH"):
        data.load_arrays("imagenet")
    with pytest.raises(data.DatasetError, match="no such file.*x_train, y_train, x_test, y_test"):
        data.load_arrays(f"npz:{tmp_path / 'missing.npz'}")
    with pytest.raises(FileNotFoundError):
        data.load_arrays(f"npz:{tmp_path / 'missing.npz'}")
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2))
    with pytest.raises(data.DatasetError, match=r"missing key\(s\) x_test, y_test; expected x_train, y_train, x_test, y_test"):
        data.load_arrays(f"npz:{partial}")
    junk = tmp_path / "junk.npz"
    junk.write_text("not an archive")
    with pytest.raises(data.DatasetError, match="not a readable .npz"):
        data.load_arrays(f"npz:{junk}")
    bad_labels = tmp_path / "bad.npz"
    np.savez(bad_labels, x_train=np.zeros((2, 4, 4, 3)), y_train=np.zeros(3),
             x_test=np.zeros((1, 4, 4, 3)), y_test=np.zeros(1))
    with pytest.raises(data.DatasetError, match="one integer label per image"):
        data.load_arrays(f"npz:{bad_labels}")

    # Not prepared, no download: a one-line error at once, naming the cures.
    empty = tmp_path / "tfds"
    with pytest.raises(data.DatasetError) as error:
        data.load_arrays("cifar100", data_dir=str(empty), download=False)
    message = str(error.value)
    assert "\n" not in message
    assert "not available offline" in message and "data_dir" in message
    assert "network" in message and "npz:PATH" in message
    # With download allowed but no network, it fails fast, not after retries.
    monkeypatch.setattr(data, "_reachable", lambda *a, **k: False)
    with pytest.raises(data.DatasetError, match="cannot be reached.*npz:PATH"):
        data.load_arrays("cifar10", data_dir=str(empty))


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10.npz").exists() or not (SHARED_DATA / "datasets.py").exists(),
    reason="../shared/data (real CIFAR-10) is not there",
)
def test_shared_cifar10_converted_with_the_documented_one_liner(tmp_path):
    spec = importlib.util.spec_from_file_location("shared_datasets", SHARED_DATA / "datasets.py")
    datasets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(datasets)
    cached = Path(datasets.CACHE) / "cifar10_decoded.npz"
    if cached.exists():
        (x_train, y_train), (x_test, y_test) = datasets.load_cifar10()
    else:
        # Decoding all 60,000 JPEGs takes too long for a test: decode a slice
        # with the module's own decoder.
        z = np.load(SHARED_DATA / "cifar10.npz")

        def split(name, n):
            part = {
                "jpeg_header": z["jpeg_header"],
                f"{name}_scans": z[f"{name}_scans"],
                f"{name}_offsets": z[f"{name}_offsets"][: n + 1],
                f"{name}_labels": z[f"{name}_labels"][:n],
            }
            return datasets._decode_split(part, name)

        (x_train, y_train), (x_test, y_test) = split("train", 40), split("test", 20)
    x_train, y_train, x_test, y_test = x_train[:40], y_train[:40], x_test[:20], y_test[:20]
    path = tmp_path / "cifar10_arrays.npz"
    # The one-liner documented in keras_fsp.apps.data:
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

    (xt, yt), (xs, ys), info = data.load_arrays(f"npz:{path}")
    assert xt.shape == (40, 32, 32, 3) and xt.dtype == np.uint8
    assert xs.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(yt, y_train)
    assert info["augment"] == {"pad": 4, "flip": True}
    assert 80 < float(info["mean"].mean()) < 180  # real photographs, 0..255
    # The archive itself is JPEG data: a clear error pointing to the conversion.
    with pytest.raises(data.DatasetError, match="JPEG-encoded.*np.savez"):
        data.load_arrays(f"npz:{SHARED_DATA / 'cifar10.npz'}")


# ------------------------------------------------------- folders and tfds


def _png_tree(root, sizes, mode="L", seed=0):
    """`root/<split>/<class>/<i>.png` for `sizes = {split: {class: count}}`;
    returns `{(split, class): [arrays in file order]}`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for split, classes in sizes.items():
        for name, count in classes.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True)
            shape = (6, 5) if mode == "L" else (6, 5, 3)
            written[split, name] = []
            for i in range(count):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(folder / f"{i:02d}.png")
                written[split, name].append(pixels)
    return written


def test_folder_with_train_and_test_splits(tmp_path):
    pytest.importorskip("PIL")
    written = _png_tree(tmp_path, {"train": {"b_dog": 3, "a_cat": 2}, "test": {"b_dog": 1, "a_cat": 2}})
    (xt, yt), (xs, ys), info = data.load_arrays(f"folder:{tmp_path}")
    # Classes in alphanumeric order of their folders; grayscale stays 1 channel.
    assert info["class_names"] == ["a_cat", "b_dog"] and info["num_classes"] == 2
    assert xt.shape == (5, 6, 5, 1) and xt.dtype == np.uint8 and info["input_shape"] == (6, 5, 1)
    np.testing.assert_array_equal(yt, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ys, [0, 0, 1])
    np.testing.assert_array_equal(xt[2, ..., 0], written["train", "b_dog"][0])
    np.testing.assert_array_equal(xs[2, ..., 0], written["test", "b_dog"][0])
    assert info["augment"] == {"pad": 1, "flip": False}


def test_folder_without_splits_holds_out_a_fixed_part_of_each_class(tmp_path):
    pytest.importorskip("PIL")
    _png_tree(tmp_path, {"": {"x": 10, "y": 5}}, mode="RGB")
    (xt, yt), (xs, ys), info = data.load_arrays(f"folder:{tmp_path}", validation_split=0.2)
    assert xt.shape[1:] == (6, 5, 3) and info["augment"]["flip"]
    assert np.bincount(ys).tolist() == [2, 1] and np.bincount(yt).tolist() == [8, 4]
    # Disjoint, and the same images every time (a fixed seed, not --seed).
    train_keys = {x.tobytes() for x in xt}
    assert not train_keys & {x.tobytes() for x in xs}
    (xt2, _), (xs2, _), _ = data.load_arrays(f"folder:{tmp_path}", validation_split=0.2)
    np.testing.assert_array_equal(xs2, xs)
    np.testing.assert_array_equal(xt2, xt)
    # Resized on request.
    (xr, _), _, info = data.load_arrays(f"folder:{tmp_path}", image_size=(4, 3))
    assert xr.shape[1:] == (4, 3, 3) and info["input_shape"] == (4, 3, 3)


def test_folder_mistakes_are_one_line(tmp_path):
    from PIL import Image

    with pytest.raises(data.DatasetError, match="no such folder"):
        data.load_arrays(f"folder:{tmp_path / 'none'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="no class sub-folders; expected PATH/<class>/"):
        data.load_arrays(f"folder:{tmp_path / 'empty'}")
    mixed = tmp_path / "mixed" / "a"
    mixed.mkdir(parents=True)
    Image.new("L", (4, 4)).save(mixed / "1.png")
    Image.new("L", (5, 4)).save(mixed / "2.png")
    with pytest.raises(data.DatasetError, match=r"the images differ in size \(4x4, 4x5, ...\); "
                                                r"pass --image_size H,W"):
        data.load_arrays(f"folder:{tmp_path / 'mixed'}")
    (mixed / "3.png").write_bytes(b"not a png")
    with pytest.raises(data.DatasetError, match=r"cannot read .*3.png .*remove or replace it"):
        data.load_arrays(f"folder:{tmp_path / 'mixed'}")
    split = tmp_path / "split"
    _png_tree(split, {"train": {"a": 2}, "test": {"a": 1, "b": 1}})
    with pytest.raises(data.DatasetError, match=r"test/ has class folders that train/ has not: \['b'\]"):
        data.load_arrays(f"folder:{split}")


def test_any_tfds_dataset_by_name():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        (xt, yt), (xs, ys), info = data.load_arrays("tfds:mnist")
        assert xt.shape == (6, 28, 28, 1) and xs.shape == (6, 28, 28, 1)
        assert info["class_names"] == [str(i) for i in range(10)]
        # Images of many sizes need a size to be batched into arrays.
        with pytest.raises(data.DatasetError, match="tfds:tf_flowers: its images differ in size; "
                                                    "pass --image_size H,W"):
            data.load_arrays("tfds:tf_flowers")
        (xt, _), _, info = data.load_arrays("tfds:tf_flowers", image_size=(12, 10))
        assert xt.shape == (6, 12, 10, 3) and xt.dtype == np.uint8
        assert info["class_names"] == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
