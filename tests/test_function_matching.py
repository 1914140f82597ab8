"""Function matching (Beyer et al. 2022): `augment.MixUp` against numpy (its
mixing weight and partners read back from one-hot images), its place after
PadCropFlip and Cutout, the recipe's settings, a training step in which
teacher and student see the same mixed batch and the loss is KL(teacher ||
student) at T = 1 without labels (compiled on both backends, scanned steps
too), and the method's command lines."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import jax_steps
from keras_fsp.augment import Cutout, MixUp, PadCropFlip, chain
from keras_fsp.papers import methods
from tests import reference

BATCH, SHAPE, CLASSES = 8, (4, 4, 2), 5


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _augmenter(layer):
    """`x -> layer(x, training=True)` in numpy, the layer's random state
    advanced (op by op: on JAX each op compiles once for all layers)."""
    return lambda x: _np(layer(x, training=True))


def _one_hot_images(b=BATCH):
    """Image i is 1 at pixel i and 0 elsewhere: a mix of images shows its
    weights directly, `out[i].flat[j]` being image j's share of mix i."""
    return np.eye(b, 2 * b, dtype="float32").reshape(b, 2, b, 1)


def _weights_and_partners(out):
    """`(lam, perm)` read back from MixUp's output on `_one_hot_images`."""
    shares = out.reshape(len(out), -1)[:, :len(out)]
    lam = np.diagonal(shares).copy()
    off = shares - np.diag(lam)
    perm = np.where(off.max(axis=1) > 0, off.argmax(axis=1), np.arange(len(out)))
    return lam, perm, shares


def test_mixup_is_lam_x_plus_one_minus_lam_x_perm_with_lam_from_beta_folded_to_the_upper_half():
    x = _one_hot_images()
    images = np.random.default_rng(0).normal(size=(BATCH, 2, BATCH, 1)).astype("float32")
    layer, same_seed = _augmenter(MixUp(seed=3)), _augmenter(MixUp(seed=3))
    lams = []
    for _ in range(40):
        lam, perm, shares = _weights_and_partners(layer(x))
        assert sorted(perm) == list(range(BATCH))  # a permutation of the batch
        mixed = perm != np.arange(BATCH)
        lam = np.where(mixed, lam, np.nan)  # an image drawn as its own partner stays itself
        expected = np.zeros_like(shares)
        expected[np.arange(BATCH), np.arange(BATCH)] = np.where(mixed, lam, 1.0)
        expected[np.arange(BATCH)[mixed], perm[mixed]] = 1.0 - lam[mixed]
        np.testing.assert_allclose(shares, expected, atol=1e-6)
        assert np.nanmax(lam) - np.nanmin(lam) < 1e-6  # one lam for the batch
        lams.append(np.nanmean(lam))
        # The same draws (same seed, same calls) on any images: the formula.
        got = same_seed(images)
        full = np.where(mixed, lam, 1.0)[:, None, None, None]
        np.testing.assert_allclose(got, full * images + (1 - full) * images[perm], rtol=1e-5,
                                   atol=1e-6)
    lams = np.array(lams)
    # Beta(1, 1) folded: uniform on [0.5, 1] (mean 0.75, std 0.144; 40 draws).
    assert lams.min() >= 0.5 and lams.max() <= 1.0 and abs(lams.mean() - 0.75) < 0.07
    assert len(np.unique(lams.round(5))) == len(lams)  # the state advances at each call
    each = _augmenter(MixUp(seed=3, per_example=True))(x)
    lam, perm, _ = _weights_and_partners(each)
    lam = lam[perm != np.arange(BATCH)]
    assert len(np.unique(lam.round(5))) == len(lam) and lam.min() >= 0.5


def test_mixup_is_the_identity_in_inference_and_composes_after_pad_crop_flip_and_cutout():
    x = np.random.default_rng(1).normal(size=(BATCH, *SHAPE)).astype("float32")
    np.testing.assert_array_equal(_np(MixUp()(x, training=False)), x)
    np.testing.assert_array_equal(_np(MixUp()(x)), x)
    augment = chain(chain(PadCropFlip(1, seed=0), Cutout(2, seed=1)), MixUp(seed=2))
    assert isinstance(augment, keras.Sequential)
    assert chain(None, None) is None and isinstance(chain(None, MixUp()), MixUp)
    # The Sequential hands `training` to each layer in turn: the layers alone, same seeds.
    alone = x
    for layer in (PadCropFlip(1, seed=0), Cutout(2, seed=1), MixUp(seed=2)):
        alone = _augmenter(layer)(alone)
    augment.build(x.shape)
    np.testing.assert_allclose(_augmenter(augment)(x), alone, rtol=1e-6)
    np.testing.assert_array_equal(_np(augment(x, training=False)), x)
    clone = MixUp.from_config(MixUp(alpha=0.2, per_example=True, seed=7).get_config())
    assert (clone.alpha, clone.per_example, clone.seed) == (0.2, True, 7)
    with pytest.raises(ValueError, match=r"alpha must be > 0"):
        MixUp(alpha=0.0)
    with pytest.raises(ValueError, match=r"floating-point inputs"):
        MixUp()(np.zeros((2, 3), "int32"), training=True)


def _net(name, hidden, seed):
    """Flatten, an optional ReLU layer, logits: no batch norm (training and
    inference agree), easy in numpy."""
    keras.utils.set_random_seed(seed)
    x = keras.Input(SHAPE)
    h = keras.layers.Flatten()(x)
    if hidden:
        h = keras.layers.Dense(hidden, activation="relu")(h)
    return keras.Model(x, keras.layers.Dense(CLASSES)(h), name=name)


def _logits(net, x):
    h = x.reshape(len(x), -1)
    dense = [layer for layer in net.layers if isinstance(layer, keras.layers.Dense)]
    for i, layer in enumerate(dense):
        kernel, bias = (_np(w) for w in layer.weights)
        h = h @ kernel + bias
        h = np.maximum(h, 0.0) if i < len(dense) - 1 else h
    return h


def _recipe(lr=0.0, **kwargs):
    teacher, student = _net("teacher", 6, 0), _net("student", 0, 1)
    augment = chain(PadCropFlip(1, seed=0), Cutout(2, seed=1))  # as the command line's
    return methods.get("function-matching").build(teacher, student, steps_per_epoch=2, lr=lr,
                                                  augment=augment, mixup_seed=2, **kwargs)


def test_the_recipe_is_kd_at_t1_alone_with_mixup_last():
    recipe = _recipe(lr=0.1)
    stage = recipe.schedule[0]
    assert recipe.name == "function-matching" and stage.terms == {"kd": 1.0}  # no label term
    assert recipe.model.terms["kd"].temperature == 1.0
    assert recipe.epochs == 64000 // 2  # the other recipes' 64k iterations; patience: --schedule_scale
    mixup = recipe.model.augment.layers[-1]
    assert isinstance(mixup, MixUp) and (mixup.alpha, mixup.per_example) == (1.0, False)
    method = methods.get("function-matching")
    assert method.options == ("temperature",) and method.uses_teacher
    warm = _recipe(temperature=2.0, mixup_alpha=0.5)
    assert warm.model.terms["kd"].temperature == 2.0 and warm.model.augment.layers[-1].alpha == 0.5
    alone = methods.get("function-matching").build(*(_net(n, 0, 3) for n in "ts"), 2)
    assert isinstance(alone.model.augment, MixUp)


def _seed_states(layer):
    return [_np(v) for v in layer.variables]


def test_teacher_and_student_see_the_same_mixed_batch_and_the_loss_is_kl_at_t1(monkeypatch):
    # A learning rate of 0 keeps the networks what they were; the two steps
    # of the epoch run in one compiled loop (a scan of keras_fsp's on JAX).
    monkeypatch.setattr(jax_steps, "ON_CPU", True)
    recipe = _recipe()
    recipe.compile(steps_per_execution=2)
    d = recipe.model
    assert jax_steps.applies(d) == (keras.backend.backend() == "jax")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2 * BATCH, *SHAPE)).astype("float32"), rng.integers(0, CLASSES, 2 * BATCH)
    start = _seed_states(d.augment)
    history = d.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history
    after = _seed_states(d.augment)

    def restore(states):
        for variable, value in zip(d.augment.variables, states):
            variable.assign(value)

    restore(start)  # the two steps' batches, drawn again
    draw = _augmenter(d.augment)
    mixed = [draw(x[i:i + BATCH]) for i in (0, BATCH)]
    for a, b in zip(after, _seed_states(d.augment)):  # the state advanced across the steps
        np.testing.assert_array_equal(a, b)
    expected = np.mean([reference.soft_target_loss(_logits(d.teacher, m), _logits(d.student, m), 1.0)
                        for m in mixed])
    assert history["kd_loss"][0] == pytest.approx(expected, rel=1e-4)
    assert history["loss"][0] == pytest.approx(expected, rel=1e-4)  # no label term
    # A teacher shown the batch before mixup would give another loss.
    restore(start)
    draw = _augmenter(d.augment.layers[0])
    unmixed = [draw(x[i:i + BATCH]) for i in (0, BATCH)]
    inconsistent = np.mean([reference.soft_target_loss(_logits(d.teacher, u), _logits(d.student, m), 1.0)
                            for u, m in zip(unmixed, mixed)])
    assert abs(inconsistent - expected) > 0.01 * expected
    # Other labels: the same loss (the training accuracy changes, a metric only).
    restore(start)
    other = d.fit(x, (y + 1) % CLASSES, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history
    assert other["loss"][0] == pytest.approx(history["loss"][0], rel=1e-5)


def test_the_command_line_and_the_reproduce_tables_take_function_matching(tmp_path):
    from keras_fsp.apps import cli, reproduce

    config = cli.parse(["keras-fsp", "distill", "--method", "function-matching",
                        "--dataset", "digits", "--temperature", "2"])
    assert (config.method, config.temperature) == ("function-matching", 2.0)
    flags, _ = reproduce._flags(["reproduce", "cifar10-resnet26-to-resnet8", "--seeds=0",
                                 "--dataset=digits", "--methods=function-matching"])
    flags.seeds = [0]
    runs = reproduce.TABLES["cifar10-resnet26-to-resnet8"].runs(flags, str(tmp_path))
    assert [r.method for r in runs] == ["teacher", "function-matching"]
    parsed = cli.parse(["keras-fsp", *runs[1].argv[3:]])
    assert (parsed.method, parsed.student_depth) == ("function-matching", 8)
    assert reproduce.label("function-matching") == methods.get("function-matching").label
