"""ReviewKD: the hierarchical context loss and one ABF fusion against numpy
references, the term's fusion of every level of two CIFAR ResNets of other
widths, a training step that moves the ABF modules, their checkpoint and
resumption, and the two methods of the table on the command line."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import FSPDistiller, Stage
from keras_fsp.papers import cifar_resnet, methods
from keras_fsp.terms import ReviewKDTerm, hierarchical_context_loss
from keras_fsp.terms.review import AttentionBasedFusion
from keras_fsp.training import RunFolder
from tests import reference

RNG = np.random.default_rng(0)
SHAPE = (8, 8, 3)  # levels of 8x8, 4x4, 2x2 and the pooled 1x1


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def _normal(*shape):
    return RNG.normal(size=shape).astype("float32")


def _computed(fn, *args):
    """`fn(*args)` in numpy; on JAX compiled as one function (op by op, each
    op compiles on its own), the batch norms' statistics left as they were."""
    if keras.backend.backend() != "jax":
        return keras.tree.map_structure(_np, fn(*args))
    import jax

    def stateless(*inputs):
        with keras.StatelessScope():
            return fn(*inputs)

    return keras.tree.map_structure(_np, jax.jit(stateless)(*args))


@pytest.fixture(scope="module")
def resnets():
    """A teacher twice as wide as its student: every level's channels differ
    (made once: on JAX, initialising each new weight shape compiles)."""
    keras.utils.set_random_seed(0)
    return (cifar_resnet(8, input_shape=SHAPE, width_multiplier=2, name="teacher"),
            cifar_resnet(8, input_shape=SHAPE, name="student"))


def _randomize(layer):
    """Every weight of `layer` drawn at random (batch norms' scales positive)."""
    for w in layer.weights:
        value = RNG.normal(size=w.shape)
        w.assign((np.abs(value) + 0.5 if "gamma" in w.path else value).astype("float32"))


def _weights(fusion):
    """An ABF module's weights as `reference.abf` takes them."""
    parts = {"conv1": fusion.conv1, "bn1": fusion.bn1, "conv2": fusion.conv2, "bn2": fusion.bn2}
    if fusion.attention is not None:
        parts["attention"] = fusion.attention
    return {k: [_np(w) for w in layer.trainable_weights] for k, layer in parts.items()}


def test_hcl_equals_numpy_reference_at_every_level_size():
    # 8x8 pools to 4, 2, 1; 6x6 into uneven adaptive bins; 2x2 to 1 only
    # (weight 1/2); the pooled 1x1 level is its MSE alone.
    shapes = [(8, 8, 5), (6, 6, 4), (2, 2, 3), (1, 1, 2)]
    student = [_normal(3, *s) for s in shapes]
    teacher = [_normal(3, *s) for s in shapes]
    got, two, one = _computed(lambda s, t: (hierarchical_context_loss(s, t),
                                            hierarchical_context_loss(s[2:3], t[2:3]),
                                            hierarchical_context_loss(s[3:], t[3:])),
                              student, teacher)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, reference.hcl_loss(student, teacher), rtol=1e-5)
    s, t = student[2], teacher[2]
    np.testing.assert_allclose(two, (((s - t) ** 2).mean(axis=(1, 2, 3)) + 0.5 * (
        (s.mean(axis=(1, 2)) - t.mean(axis=(1, 2))) ** 2).mean(axis=-1)) / 1.5, rtol=1e-5)
    s, t = student[3], teacher[3]
    np.testing.assert_allclose(one, ((s - t) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_one_abf_fusion_equals_numpy_reference():
    # 16 student channels, fused at 64, out to the teacher's 32 at its 8x8
    # (the student's 4x4 fusion upsampled); the deeper fusion comes at 2x2.
    # (The widths of the next test's first level: on JAX, initialising each
    # new weight shape compiles.)
    fusion = AttentionBasedFusion(64, 32, (8, 8), fuse=True, name="abf")
    fusion.build((None, 4, 4, 16))
    _randomize(fusion)
    x, residual = _normal(5, 4, 4, 16), _normal(5, 2, 2, 64)
    out, fused = _computed(lambda x, r: fusion(x, r, training=True), x, residual)
    expected_out, expected_fused = reference.abf(x, residual, _weights(fusion), (8, 8))
    assert tuple(out.shape) == (5, 8, 8, 32) and tuple(fused.shape) == (5, 8, 8, 64)
    np.testing.assert_allclose(out, expected_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused, expected_fused, rtol=1e-4, atol=1e-5)
    deepest = AttentionBasedFusion(64, 32, (1, 1), fuse=False, name="deepest")
    deepest.build((None, 1, 1, 16))
    assert deepest.attention is None and len(deepest.trainable_weights) == 6


def test_the_term_fuses_the_levels_deepest_first_as_the_reference(resnets):
    teacher, student = resnets
    term = ReviewKDTerm(beta=2.0)
    FSPDistiller(teacher, student, terms=[term], stages={"r": Stage("r", {"reviewkd": 1.0})},
                 stage="r")
    # The authors' levels: the stage outputs, the teacher's before their
    # ReLU, and the pooled features; fused at min(512, 64) channels.
    assert term.pairs == [("stage1_block1_add", "stage1"), ("stage2_block1_add", "stage2"),
                          ("stage3_block1_add", "stage3"), ("pool", "pool")]
    assert [f.conv1.kernel.shape for f in term.fusions] == [(1, 1, c, 64) for c in (16, 32, 64, 64)]
    assert [f.conv2.kernel.shape[-1] for f in term.fusions] == [32, 64, 128, 128]
    assert [f.attention is None for f in term.fusions] == [False, False, False, True]
    for f in term.fusions:
        _randomize(f)
    sizes = [(8, 8), (4, 4), (2, 2)]
    s_features = {n: _normal(4, *hw, c)
                  for n, hw, c in zip(("stage1", "stage2", "stage3"), sizes, (16, 32, 64))}
    s_features["pool"] = _normal(4, 64)
    t_features = {t: _normal(4, *hw, c) for (t, _), hw, c in zip(term.pairs, sizes, (32, 64, 128))}
    t_features["pool"] = _normal(4, 128)
    got = _computed(lambda s, t: term.compute(s, t, None), s_features, t_features)
    outputs, residual = [], None
    for (t, s), fusion in reversed(list(zip(term.pairs, term.fusions))):
        x = s_features[s].reshape(4, 1, 1, -1) if s == "pool" else s_features[s]
        size = (1, 1) if t == "pool" else t_features[t].shape[1:3]
        out, residual = reference.abf(x, residual, _weights(fusion), size)
        outputs.insert(0, out)
    targets = [t_features[t].reshape(4, 1, 1, -1) if t == "pool" else t_features[t]
               for t, _ in term.pairs]
    np.testing.assert_allclose(got, 2.0 * reference.hcl_loss(outputs, targets), rtol=1e-4)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(term))
    assert isinstance(clone, ReviewKDTerm) and clone.get_config() == term.get_config()


def _fusion_weights(term):
    return [_np(w) for f in term.fusions for w in f.weights]


def test_the_method_trains_the_abf_modules_and_a_checkpoint_restores_them(resnets, tmp_path):
    recipe = methods.get("reviewkd").build(*resnets, steps_per_epoch=1, scale=1e-5)
    assert recipe.schedule[0].terms == {"reviewkd": 1.0, "task": 1.0} and recipe.epochs == 1
    recipe.compile()
    term = recipe.model.terms["reviewkd"]
    before = _fusion_weights(term)
    x, y = _normal(8, *SHAPE), RNG.integers(0, 10, 8)
    history = recipe.model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                               callbacks=recipe.callbacks).history
    assert np.isfinite(history["loss"][0]) and history["reviewkd_loss"][0] > 0
    assert history["reviewkd_weight"] == pytest.approx([1 / 20])  # the first warm-up epoch
    # Every ABF weight moved: the kernels, scales and offsets by the step,
    # the batch norms' moving statistics by the batch.
    after = _fusion_weights(term)
    assert all(np.abs(a - b).max() > 0 for a, b in zip(before, after))
    # The run folder's checkpoint, restored into a new distiller (new ABF
    # modules, other initial weights) as a resumed run does.
    checkpoints = RunFolder(tmp_path).checkpoints()
    checkpoints.save(recipe.model, 1)
    keras.utils.set_random_seed(5)
    resumed = methods.get("reviewkd").build(*resnets, steps_per_epoch=1, scale=1e-5)
    resumed.compile()
    restored = resumed.model.terms["reviewkd"]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, _fusion_weights(restored)))
    assert checkpoints.restore(resumed.model) == 1
    for a, b in zip(after, _fusion_weights(restored)):
        np.testing.assert_array_equal(a, b)


def test_the_two_methods_and_their_warm_up(resnets):
    teacher, student = resnets
    alone = methods.get("reviewkd").build(teacher, student, steps_per_epoch=10)
    ramp = alone.callbacks[-1]
    assert ramp.term == "reviewkd"  # (epoch + 1) / 20 from epoch 0, then 1
    assert [ramp.schedule(e) for e in (0, 18, 19, 100)] == [0.05, 0.95, 1.0, 1.0]
    assert alone.model.terms["reviewkd"].beta == 1.0 and methods.get("reviewkd").options == ()
    with_kd = methods.get("reviewkd-kd").build(teacher, student, steps_per_epoch=10,
                                               temperature=2.0)
    assert with_kd.schedule[0].terms == {"reviewkd": 1.0, "task": 1.0, "kd": 1.0}
    assert with_kd.model.terms["kd"].temperature == 2.0 and with_kd.name == "reviewkd-kd"
    assert methods.get("reviewkd-kd").options == ("temperature",)
    with pytest.raises(ValueError, match=r"pairs must be 'auto'"):
        ReviewKDTerm(pairs="sections")


def test_the_command_line_takes_the_methods(tmp_path):
    pytest.importorskip("absl")
    from keras_fsp.apps import cli, reproduce

    config = cli.parse(["keras-fsp", "distill", "--method=reviewkd", "--dataset=digits"])
    assert config.method == "reviewkd"
    table = "cifar10-resnet26-to-resnet8"
    flags, _ = reproduce._flags(["reproduce", table, "--methods=reviewkd,reviewkd-kd",
                                 "--dataset=digits"])
    flags.seeds = [0]
    runs = reproduce.TABLES[table].runs(flags, str(tmp_path))
    assert [r.method for r in runs] == ["teacher", "reviewkd", "reviewkd-kd"]
    configs = [cli.parse(["keras-fsp", *r.argv[3:]]) for r in runs[1:]]
    assert [(c.subcommand, c.method) for c in configs] == [("distill", "reviewkd"),
                                                          ("distill", "reviewkd-kd")]
