"""keras_fsp.apps.visualize: FSP-matrix and attribution pictures, attribution maps."""

import keras
import numpy as np
import pytest

from keras_fsp import FSPDistiller
from keras_fsp.apps import visualize
from keras_fsp.papers import cifar_resnet

SHAPE = (16, 16, 3)
NAMES = ["airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"]

tf_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="attribution maps use tf-keras-vis (TensorFlow backend)",
)


def assert_png(path, min_size=200):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > min_size and image.shape[1] > min_size, image.shape
    assert image[..., :3].std() > 0.01  # not a blank page


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(0)
    teacher = cifar_resnet(8, input_shape=SHAPE, weight_decay=0, name="teacher")
    student = cifar_resnet(8, input_shape=SHAPE, weight_decay=0, name="student")
    return teacher, student


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (5,) + SHAPE, dtype=np.uint8)
    images = ((raw / 255.0 - 0.5) / 0.25).astype("float32")
    return raw, images, np.array([3, 1, 4, 1, 5])


def test_plot_fsp_matrices(tmp_path):
    rng = np.random.default_rng(1)
    teacher = [rng.random((4, 16, 16)), rng.random((16, 32))]  # batch / averaged
    student = [rng.random((4, 16, 16)), rng.random((16, 32))]
    path = visualize.plot_fsp_matrices(
        teacher, student, tmp_path / "sub" / "fsp.png",
        pair_names=[("stem", "stage1"), "stage1 -> stage2"], title="test",
    )
    assert path == str(tmp_path / "sub" / "fsp.png")
    assert_png(path)
    # Different shapes (no projection): drawn, with a note instead of a diff.
    assert_png(visualize.plot_fsp_matrices(
        [np.ones((8, 8))], [np.ones((4, 8))], tmp_path / "differ.png"))
    with pytest.raises(ValueError, match="one student matrix per teacher"):
        visualize.plot_fsp_matrices(teacher, student[:1], tmp_path / "x.png")


@tf_only
def test_default_gradcam_layer_is_the_last_feature_map(models):
    assert visualize._last_feature_map_layer(models[0]) == "stage3"


@tf_only
def test_saliency_matches_an_independent_gradient(models, batch):
    import tensorflow as tf

    teacher, _ = models
    _, images, labels = batch
    maps = visualize.attribution_maps(teacher, images, labels, "saliency")
    assert maps.shape == (5, 16, 16) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.std() > 0

    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = teacher(x, training=False)
        score = tf.gather(logits, labels, axis=1, batch_dims=1)
    grads = np.abs(tape.gradient(score, x).numpy()).max(axis=-1)
    low = grads.min(axis=(1, 2), keepdims=True)
    high = grads.max(axis=(1, 2), keepdims=True)
    expected = (grads - low) / (high - low + keras.backend.epsilon())
    np.testing.assert_allclose(maps, expected, atol=1e-4)
    # Another class explains something else.
    other = visualize.attribution_maps(teacher, images, (labels + 1) % 10, "saliency")
    assert np.abs(other - maps).max() > 0.05


@tf_only
def test_gradcam_plus_plus_matches_the_formula_on_stage3(models, batch):
    import tensorflow as tf
    from scipy.ndimage import zoom

    from keras_fsp import taps

    teacher, _ = models
    _, images, labels = batch
    maps = visualize.attribution_maps(teacher, images, labels, "gradcam++")
    assert maps.shape == (5, 16, 16)
    assert np.isfinite(maps).all() and maps.std() > 0

    # Grad-CAM++ (Chattopadhyay et al. 2018) with exp(logit) as the score, on
    # "stage3" itself (4x4), then bilinear upsampling and min-max scaling.
    view = taps.tap_model(teacher, ["stage3"])
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        out = view(x, training=False)
        score = tf.gather(out[taps.LOGITS], labels, axis=1, batch_dims=1)
    a = out["stage3"].numpy().astype(np.float64)
    g = tape.gradient(score, out["stage3"]).numpy().astype(np.float64)
    s = np.exp(score.numpy().astype(np.float64))[:, None, None, None]
    g2, g3 = s * g**2, s * g**3
    denom = 2 * g2 + g3 * a.sum(axis=(1, 2), keepdims=True)
    alphas = g2 / np.where(g2 == 0, 1.0, denom + (g2 == 0))
    norm = alphas.sum(axis=(1, 2), keepdims=True)
    alphas = alphas / np.where(norm == 0, 1.0, norm)
    weights = (alphas * np.maximum(s * g, 0)).sum(axis=(1, 2), keepdims=True)
    cam = np.maximum((weights * a).sum(-1), 0)
    cam = zoom(cam, (1, 4, 4), order=1)
    low = cam.min(axis=(1, 2), keepdims=True)
    high = cam.max(axis=(1, 2), keepdims=True)
    expected = (cam - low) / (high - low + keras.backend.epsilon())
    np.testing.assert_allclose(maps, expected, atol=1e-3)


@tf_only
def test_unknown_method(models, batch):
    with pytest.raises(ValueError, match="method must be one of"):
        visualize.attribution_maps(models[0], batch[1], batch[2], "lime")


@tf_only
def test_visualize_distillation_with_a_distiller(models, batch, tmp_path, monkeypatch):
    teacher, student = models
    raw, images, labels = batch
    distiller = FSPDistiller(teacher, student, stage="fsp")
    drawn = {}
    original = visualize.plot_fsp_matrices

    def spy(g_t, g_s, path, **kw):
        drawn.update(teacher=g_t, student=g_s, names=kw["pair_names"])
        return original(g_t, g_s, path, **kw)

    monkeypatch.setattr(visualize, "plot_fsp_matrices", spy)
    paths = visualize.visualize_distillation(
        distiller, images, labels, NAMES, tmp_path / "out", num_images=3,
        display_images=raw, batch_size=2,  # FSP averaged over 3 batches
    )
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["attributions.png", "fsp_matrices.png"]
    for p in paths:
        assert_png(p)
    # The picture shows the batch mean of the distiller's own matrices.
    g_t, g_s = distiller.terms["fsp"].matrices_of(teacher, student, images)
    assert len(drawn["teacher"]) == 3 == len(g_t)
    for got, want in zip(drawn["teacher"] + drawn["student"], g_t + g_s):
        np.testing.assert_allclose(got, want.mean(0), rtol=1e-4, atol=1e-5)
    assert drawn["names"][0] == ("stem", "stage1")


@tf_only
def test_visualize_distillation_with_models_and_gray_images(tmp_path):
    keras.utils.set_random_seed(1)
    teacher = cifar_resnet(8, input_shape=(8, 8, 1), weight_decay=0, name="t")
    student = cifar_resnet(8, input_shape=(8, 8, 1), weight_decay=0, name="s")
    rng = np.random.default_rng(2)
    images = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    paths = visualize.visualize_distillation(
        (teacher, student), images, [0, 1, 2, 3], [str(i) for i in range(10)],
        tmp_path, num_images=2, methods=("gradcam++",),
    )
    for p in paths:
        assert_png(p)
