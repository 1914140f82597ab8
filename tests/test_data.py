"""keras_fsp.apps.data: dataset loading, input pipelines, augmentation, errors."""

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


def _batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


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

    train = data.make_dataset(
        x_train, y_train, 4, True, info["mean"], info["std"],
        augment=info["augment"], seed=0,
    )
    batches = _batches(train)
    assert len(batches) == 2  # 10 images, drop_remainder when training
    x, y = batches[0]
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32
    assert y.shape == (4,) and y.dtype == np.int32

    evaluation = _batches(
        data.make_dataset(x_train, y_train, 4, False, info["mean"], info["std"])
    )
    assert [len(b[1]) for b in evaluation] == [4, 4, 2]
    x = np.concatenate([b[0] for b in evaluation])
    np.testing.assert_allclose(
        x, (x_train.astype(np.float32) - info["mean"]) / info["std"], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(x.reshape(-1, 3).mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.reshape(-1, 3).std(0), 1.0, atol=1e-3)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in evaluation]), y_train)


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


def _crop_offsets(augmented, original, pad, mode):
    """All (dy, dx, flipped) with augmented == crop of the padded original."""
    h, w = original.shape[:2]
    padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            for flipped, candidate in ((False, crop), (True, crop[:, ::-1])):
                if np.allclose(augmented, candidate, atol=1e-6):
                    found.append((dy, dx, flipped))
    return found


@pytest.mark.parametrize("padding", ["zero", "reflect"])
def test_augmentation_is_a_padded_crop_and_flip(padding):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    y = np.arange(16)  # label = index of the original image
    mean, std = np.zeros(3), np.ones(3)
    kw = dict(augment={"pad": 2, "flip": True}, seed=7, padding=padding)
    ds = data.make_dataset(x, y, 8, True, mean, std, **kw)
    epoch1, epoch2 = _batches(ds), _batches(ds)
    again = _batches(data.make_dataset(x, y, 8, True, mean, std, **kw))

    transforms = []
    for images, labels in epoch1:
        for image, label in zip(images, labels):
            found = _crop_offsets(image, x[label], 2, "constant" if padding == "zero" else "reflect")
            assert found, f"image {label} is not a padded crop (or its flip) of the original"
            transforms.append(found[0])
    assert sorted(np.concatenate([b[1] for b in epoch1])) == list(range(16))
    # Really augmented: several translations, some flipped, some shifted.
    assert len(set(transforms)) > 3
    assert any(t[2] for t in transforms) and not all(t[2] for t in transforms)
    assert any(t[:2] != (2, 2) for t in transforms)
    # Seeded: repeatable; each epoch differs (order and augmentation).
    for (a, la), (b, lb) in zip(epoch1, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(epoch1, epoch2))


def test_digit_defaults_pad_one_and_do_not_flip():
    rng = np.random.default_rng(2)
    x = rng.random((12, 8, 8, 1)).astype(np.float32)
    ds = data.make_dataset(x, np.arange(12), 12, True, [0.0], [1.0],
                           augment={"pad": 1, "flip": False}, seed=3)
    (images, labels), = _batches(ds)
    for image, label in zip(images, labels):
        found = _crop_offsets(image, x[label], 1, "constant")
        assert found and not found[0][2]


def test_eval_pipeline_is_deterministic_and_unaugmented():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 10)
    mean, std = np.array([100.0, 110.0, 120.0]), np.array([50.0, 60.0, 70.0])
    ds = data.make_dataset(x, y, 4, False, mean, std, seed=1)
    first, second = _batches(ds), _batches(ds)
    assert [len(b[1]) for b in first] == [4, 4, 2]
    for (a, la), (b, lb) in zip(first, second):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    images = np.concatenate([b[0] for b in first])
    np.testing.assert_allclose(images, (x - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in first]), y)
    # Training without augmentation: shuffled, but the same pixels.
    index = np.arange(10)
    plain = _batches(data.make_dataset(x, index, 5, True, mean, std, augment=False, seed=0))
    assert not np.array_equal(np.concatenate([b[1] for b in plain]), index)
    for images, labels in plain:
        np.testing.assert_allclose(images, (x[labels] - mean) / std, rtol=1e-5, atol=1e-5)


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
    with pytest.raises(data.DatasetError, match=r"Unknown dataset 'imagenet'.*'cifar10', 'cifar100', 'digits' or 'npz:PATH'"):
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
    with pytest.raises(data.DatasetError, match="JPEG archive.*load_cifar10"):
        data.load_arrays(f"npz:{SHARED_DATA / 'cifar10.npz'}")
