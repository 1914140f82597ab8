"""Distillation terms: the new methods against numpy references, and a term
defined here, outside keras_fsp, trained in a stage without touching the
distiller."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import FSPDistiller, Stage, taps, terms
from keras_fsp.terms import LOGITS, AttentionTerm, DecoupledKDTerm, DistillationTerm
from tests import reference
from tests.helpers import data, small_pair, weights_of

RNG = np.random.default_rng(0)


def _np(x):
    return ops.convert_to_numpy(x)


# ------------------------------------------------------------------ maths


def test_attention_map_equals_numpy_reference():
    f = RNG.normal(size=(3, 4, 5, 6)).astype("float32")
    q = _np(terms.attention_map(f))
    np.testing.assert_allclose(q, reference.attention_map(f), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(_np(terms.attention_map(f, p=1)), reference.attention_map(f, p=1), rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean_squared", "l2"])
def test_attention_transfer_term_equals_numpy_reference(reduction):
    t = [RNG.normal(size=(4, 8, 8, 16)), RNG.normal(size=(4, 4, 4, 32))]
    s = [RNG.normal(size=(4, 8, 8, 8)), RNG.normal(size=(4, 4, 4, 8))]  # channels may differ
    term = AttentionTerm(pairs=[("a", "x"), ("b", "y")], beta=1000.0, reduction=reduction)
    term.teacher_taps, term.student_taps = ("a", "b"), ("x", "y")
    targets = term.teacher_targets({"a": t[0], "b": t[1]})
    value = _np(term.compute({"x": s[0], "y": s[1]}, targets, None)).mean()
    expected = reference.attention_transfer_loss(t, s, beta=1000.0, reduction=reduction)
    assert value == pytest.approx(expected, rel=1e-4)
    assert expected > 1.0  # a meaningful size, not a vanishing number


def test_decoupled_kd_equals_numpy_reference():
    zt, zs = RNG.normal(size=(6, 10)) * 3, RNG.normal(size=(6, 10)) * 3
    y = RNG.integers(0, 10, 6)
    got = _np(terms.decoupled_kd(zt, zs, y, alpha=1.0, beta=8.0, temperature=4.0))
    np.testing.assert_allclose(got, reference.decoupled_kd(zt, zs, y, 1.0, 8.0, 4.0), rtol=1e-4)
    assert got.min() > 0


def test_classical_kd_is_tckd_plus_weighted_nckd():
    # KL(p_T || p_S) = TCKD + (1 - p_T,target) * NCKD, per example (DKD, eq. 3).
    zt, zs = RNG.normal(size=(8, 5)) * 2, RNG.normal(size=(8, 5)) * 2
    y = RNG.integers(0, 5, 8)
    t = 2.0
    tckd = _np(terms.decoupled_kd(zt, zs, y, alpha=1.0, beta=0.0, temperature=t)) / t**2
    nckd = _np(terms.decoupled_kd(zt, zs, y, alpha=0.0, beta=1.0, temperature=t)) / t**2
    p_t = reference.softmax(zt / t)
    kd = reference.kl(p_t, reference.softmax(zs / t))
    np.testing.assert_allclose(tckd + (1 - p_t[np.arange(8), y]) * nckd, kd, rtol=1e-4)


def test_decoupled_kd_is_finite_for_extreme_logits():
    zt = np.array([[80.0, -80.0, 0.0]], "float32")
    zs = np.array([[-80.0, 80.0, 0.0]], "float32")
    value = _np(terms.decoupled_kd(zt, zs, np.array([0]), temperature=1.0))
    assert np.all(np.isfinite(value)) and value[0] > 100


def test_standardized_kd_equals_numpy_reference_and_ignores_the_logits_scale():
    zt, zs = RNG.normal(size=(6, 10)) * 3, RNG.normal(size=(6, 10))
    got = _np(terms.standardized_kd(zt, zs, temperature=2.0))
    np.testing.assert_allclose(got, reference.standardized_kd(zt, zs, 2.0), rtol=1e-4)
    assert got.min() > 0
    # z-scored: the same relations at another scale and shift cost the same
    np.testing.assert_allclose(_np(terms.standardized_kd(zt * 5 + 2, zs / 3 - 1)), got, rtol=1e-4)
    same = _np(terms.standardized_kd(zt, zt * 0.2 + 7))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)  # plain KD would not be 0 here


def test_dist_equals_numpy_reference_and_is_one_value_for_the_batch():
    zt, zs = RNG.normal(size=(8, 10)) * 3, RNG.normal(size=(8, 10)) * 3
    got = _np(terms.dist_loss(zt, zs, temperature=4.0, beta=2.0, gamma=2.0))
    assert got.shape == ()
    assert float(got) == pytest.approx(reference.dist_loss(zt, zs, 4.0, 2.0, 2.0), rel=1e-4)
    assert float(got) > 0.1
    # intra-class: every example of the batch counts in each class's correlation
    assert float(_np(terms.dist_loss(zt, zs[::-1], 4.0, 0.0, 1.0))) != pytest.approx(
        float(_np(terms.dist_loss(zt, zs, 4.0, 0.0, 1.0))))


@pytest.mark.parametrize("method, term", [("ls-kd", "ls_kd"), ("dist", "dist")])
def test_the_new_methods_train_a_step_and_log_their_term(method, term):
    from keras_fsp.papers import methods

    x, y = data()
    recipe = methods.get(method).build(*small_pair(), steps_per_epoch=2, scale=1e-4)
    recipe.compile()
    teacher, student = recipe.model.teacher, recipe.student
    t_logits = teacher.predict(x, verbose=0)
    s_logits = _np(student(x, training=True))
    history = recipe.model.fit(x, y, batch_size=len(x), epochs=1, verbose=0,
                               callbacks=recipe.callbacks).history
    expected = (reference.standardized_kd(t_logits, s_logits).mean() if term == "ls_kd"
                else reference.dist_loss(t_logits, s_logits))
    assert history[f"{term}_loss"][0] == pytest.approx(expected, rel=1e-3)


# ------------------------------------------------------- relational terms

RELATIONAL = {"rkd": (terms.rkd_loss, reference.rkd_loss),
              "pkt": (terms.pkt_loss, reference.pkt_loss),
              "sp": (terms.similarity_preserving_loss, reference.similarity_preserving_loss)}


def _run(fn, *args):
    """`fn(*args)` as numpy; compiled once on JAX (not op by op)."""
    if keras.backend.backend() == "jax":
        import jax

        fn = jax.jit(fn)
    return _np(fn(*args))


def _gradient(fn, x):
    """d fn / d x on the active backend."""
    x = ops.convert_to_tensor(np.asarray(x, "float32"))
    if keras.backend.backend() == "jax":
        import jax

        return np.asarray(jax.jit(jax.grad(fn))(x))  # one compilation, not one per op
    if keras.backend.backend() != "tensorflow":
        pytest.skip("gradients are taken with TensorFlow or JAX here")
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.gradient(y, x).numpy()


@pytest.mark.parametrize("method", sorted(RELATIONAL))
def test_relational_losses_equal_numpy_references_across_widths(method):
    loss, expected = RELATIONAL[method]
    t = np.maximum(RNG.normal(size=(7, 24)), 0).astype("float32")  # pooled ReLU features
    s = np.maximum(RNG.normal(size=(7, 10)), 0).astype("float32")  # of another width
    got = _run(loss, t, s)
    assert got.shape == () and got.dtype == np.float32
    assert float(got) == pytest.approx(expected(t, s), rel=1e-4)
    assert float(got) > 1e-4
    # Relations between examples: the student's rows in another order cost otherwise.
    assert float(_run(loss, t, s[::-1])) != pytest.approx(float(got), rel=1e-3)
    # 4-D maps of different shapes are flattened
    tm, sm = RNG.normal(size=(5, 4, 4, 6)), RNG.normal(size=(5, 2, 2, 3))
    assert float(_run(loss, tm, sm)) == pytest.approx(expected(tm, sm), rel=1e-4)


def test_relational_losses_ignore_what_their_relations_ignore():
    t = RNG.normal(size=(6, 8)).astype("float32")
    rotation = np.linalg.qr(RNG.normal(size=(8, 8)))[0]
    # RKD: distances over their mean and angles survive rotation, scale, shift.
    assert float(_run(terms.rkd_loss, t, 3.0 * t @ rotation + 2.0)) == pytest.approx(0.0, abs=1e-5)
    # PKT and SP: cosines and row-normalised Grams survive a rotation and a scale.
    assert float(_run(terms.pkt_loss, t, 0.2 * t @ rotation)) == pytest.approx(0.0, abs=1e-7)
    assert float(_run(terms.similarity_preserving_loss, t, 5.0 * t @ rotation)) == pytest.approx(
        0.0, abs=1e-8)
    assert float(_run(terms.rkd_loss, t, t + RNG.normal(size=t.shape) * 0.5)) > 0.1


@pytest.mark.parametrize("method", sorted(RELATIONAL))
def test_relational_gradients_are_finite_on_duplicates_and_zero_features(method):
    loss, _ = RELATIONAL[method]
    # float32 with zero distances (a duplicate, the diagonal) and a zero vector
    s = RNG.normal(size=(5, 6)).astype("float32")
    s[1], s[3] = s[0], 0.0
    t = RNG.normal(size=(5, 9)).astype("float32")
    t[2] = t[4]
    grad = _gradient(lambda x: loss(ops.convert_to_tensor(t), x), s)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    one = _run(loss, t[:1], s[:1])  # a batch of one has no relations
    assert np.isfinite(one) and float(one) == pytest.approx(0.0, abs=1e-7)


def test_rkd_gradient_equals_numpy_finite_differences():
    t, s = RNG.normal(size=(4, 5)), RNG.normal(size=(4, 3))
    grad = _gradient(lambda x: terms.rkd_loss(t.astype("float32"), x), s)
    numeric = np.zeros_like(s)
    h = 1e-6
    for index in np.ndindex(s.shape):
        step = np.zeros_like(s)
        step[index] = h
        numeric[index] = (reference.rkd_loss(t, s + step) - reference.rkd_loss(t, s - step)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)


def test_relational_terms_tap_the_penultimate_features_or_the_last_section():
    from keras_fsp import pairing

    teacher, student = small_pair()
    d = FSPDistiller(teacher, student, terms=[terms.RKDTerm(), terms.PKTTerm(beta=2.0),
                                              terms.SimilarityPreservingTerm()])
    assert d.terms["rkd"].layers == d.terms["pkt"].layers == ("pool", "pool")
    assert d.terms["sp"].layers == ("stage3", "stage3")
    clone = terms.PKTTerm.from_config(d.terms["pkt"].get_config())
    assert (clone.layers, clone.beta, clone.student_taps) == (("pool", "pool"), 2.0, ("pool",))
    # keras.applications' head: the pooling, then dropout, then a softmax classifier
    x = keras.Input((8, 8, 3))
    f = keras.layers.GlobalAveragePooling2D(name="avg_pool")(keras.layers.Conv2D(4, 3, name="conv")(x))
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Dropout(0.2, name="top_dropout")(f))
    assert pairing.penultimate(keras.Model(x, out)) == "avg_pool"
    with pytest.raises(ValueError, match=r"penultimate features .* reads the inputs directly.*layers="):
        pairing.penultimate(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match=r"layers must be 'auto', a layer name of both networks"):
        terms.RKDTerm(layers=("pool",))
    with pytest.raises(ValueError, match=r"distance_weight and angle_weight must be >= 0, not both 0"):
        terms.RKDTerm(distance_weight=0.0, angle_weight=0.0)


def test_relational_terms_train_a_step_with_duplicate_examples():
    teacher, student = small_pair()  # (the widths may differ: the maths tests above)
    weights = {"rkd": 1.0, "pkt": 0.5, "sp": 2.0, "task": 1.0}
    d = FSPDistiller(teacher, student, stages={"rel": Stage("rel", weights)}, stage="rel")
    x, y = data()
    x[-4:], y[-4:] = x[:4], y[:4]  # duplicates: zero distances
    t = {k: _np(v) for k, v in taps.tap_model(teacher, ["pool", "stage3"])(x, training=False).items()}
    s = {k: _np(v) for k, v in taps.tap_model(student, ["pool", "stage3"])(x, training=True).items()}
    d.compile(optimizer=keras.optimizers.SGD(1e-3))
    history = d.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history
    expected = {"rkd": reference.rkd_loss(t["pool"], s["pool"]),  # the paper's 25 and 50
                "pkt": 30000.0 * reference.pkt_loss(t["pool"], s["pool"]),
                "sp": 3000.0 * reference.similarity_preserving_loss(t["stage3"], s["stage3"]),
                "task": reference.cross_entropy(y, s[LOGITS])}
    for term, value in expected.items():
        assert history[f"{term}_loss"][0] == pytest.approx(value, rel=1e-3), term
    assert history["loss"][0] == pytest.approx(sum(weights[k] * v for k, v in expected.items()), rel=1e-3)
    assert all(np.all(np.isfinite(w)) for w in weights_of(student))


def test_the_relational_methods_are_repdistillers_weights_alone_and_with_kd():
    from keras_fsp.papers import methods

    teacher, student = small_pair()
    for name, term, setting in [("rkd", "rkd", ("distance_weight", 25.0)), ("pkt", "pkt", ("beta", 30000.0)),
                                ("sp", "sp", ("beta", 3000.0))]:
        alone = methods.get(name).build(teacher, student, steps_per_epoch=10)
        assert alone.schedule[0].terms == {term: 1.0, "task": 1.0}
        assert getattr(alone.model.terms[term], setting[0]) == setting[1]
        with_kd = methods.get(f"{name}-kd").build(teacher, student, steps_per_epoch=10, temperature=2.0)
        assert with_kd.schedule[0].terms == {term: 1.0, "task": 1.0, "kd": 1.0}
        assert with_kd.model.terms["kd"].temperature == 2.0 and with_kd.name == f"{name}-kd"
        assert methods.get(f"{name}-kd").options == ("temperature",)


# ------------------------------------------------------- in the distiller


def _fit_one_step(d, x, y):
    d.compile(optimizer=keras.optimizers.SGD(1e-3))
    return d.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history


def test_attention_stage_loss_equals_numpy_reference_on_auto_pairs():
    teacher, student = small_pair()
    stage = Stage("at", {"attention": 1.0, "task": 1.0})
    d = FSPDistiller(teacher, student, stages={"at": stage}, stage="at")
    at = d.terms["attention"]
    assert at.pairs == [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]
    x, y = data()
    names = ["stage1", "stage2", "stage3"]
    t = taps.tap_model(teacher, names)(x, training=False)
    s = taps.tap_model(student, names)(x, training=True)
    expected = reference.attention_transfer_loss([_np(t[n]) for n in names], [_np(s[n]) for n in names])
    task = reference.cross_entropy(y, _np(s[LOGITS]))
    history = _fit_one_step(d, x, y)
    assert history["attention_loss"][0] == pytest.approx(expected, rel=1e-4)
    assert history["loss"][0] == pytest.approx(expected + task, rel=1e-4)


def test_dkd_stage_loss_equals_numpy_reference():
    teacher, student = small_pair()
    d = FSPDistiller(teacher, student, stages={"dkd": Stage("dkd", {"dkd": 1.0, "task": 1.0})}, stage="dkd")
    x, y = data()
    expected = reference.decoupled_kd(teacher.predict(x, verbose=0), _np(student(x, training=True)), y).mean()
    history = _fit_one_step(d, x, y)
    assert history["dkd_loss"][0] == pytest.approx(expected, rel=1e-4)
    d2 = FSPDistiller(*small_pair(), terms=[DecoupledKDTerm(beta=2.0)],
                      stages={"dkd": Stage("dkd", {"dkd": 1.0})}, stage="dkd")
    assert d2.terms["dkd"].beta == 2.0  # a given instance replaces the default


def test_attention_teacher_cache_holds_normalised_maps():
    teacher, student = small_pair()
    d = FSPDistiller(teacher, student, stages={"at": Stage("at", {"attention": 1.0})}, stage="at")
    x, y = data()
    cache = d.teacher_outputs(x, batch_size=8)
    assert sorted(cache) == ["/attention/2/stage1", "/attention/2/stage2", "/attention/2/stage3"]
    t = taps.tap_model(teacher, ["stage2"])(x, training=False)
    np.testing.assert_allclose(cache["/attention/2/stage2"], reference.attention_map(_np(t["stage2"])), rtol=1e-4, atol=1e-6)
    d.compile(optimizer=keras.optimizers.SGD(1e-3))
    uncached = d.evaluate(x, y, verbose=0)
    history = d.fit({"inputs": x, "teacher": cache}, y, batch_size=len(x), epochs=1, verbose=0).history
    assert np.isfinite(history["attention_loss"][0]) and np.isfinite(uncached)


def test_attention_pairs_must_share_a_spatial_size():
    teacher, student = small_pair()
    with pytest.raises(ValueError, match=r"Attention pair \('stage1', 'stage2'\).*same spatial size"):
        FSPDistiller(teacher, student, terms=[AttentionTerm(pairs=[("stage1", "stage2")])])


# ----------------------------------------------------- a term from outside


@terms.register_term("logit_mse_for_test")
class LogitMSE(DistillationTerm):
    """Mean squared difference of the logits (not part of keras_fsp)."""

    student_taps = teacher_taps = (LOGITS,)

    def compute(self, student, teacher, y_true):
        return ops.mean(ops.square(student[LOGITS] - teacher[LOGITS]), axis=-1)


@keras.saving.register_keras_serializable(package="tests")  # to be saved, as any Keras layer
class Stage1MapMatch(DistillationTerm):
    """Squared difference of one tapped map's channel means (not registered
    as a term type: used as an instance)."""

    def __init__(self, layer="stage1", **kwargs):
        super().__init__(**kwargs)
        self.layer = layer
        self.student_taps = self.teacher_taps = (layer,)

    def compute(self, student, teacher, y_true):
        s = ops.mean(student[self.layer], axis=(1, 2))
        t = ops.mean(teacher[self.layer], axis=(1, 2))  # keyed like the student's
        return ops.sum(ops.square(s - t), axis=-1)

    def get_config(self):
        return {**super().get_config(), "layer": self.layer}


def test_a_term_defined_outside_keras_fsp_trains_in_a_stage():
    teacher, student = small_pair()
    stages = {
        "mine": Stage("mine", {"logit_mse_for_test": 1.0, "task": 0.5}),  # registered by name
        "maps": Stage("maps", {"map_match": 2.0}, trainable="up_to_taps"),  # an instance
    }
    d = FSPDistiller(teacher, student, terms=[Stage1MapMatch(name="map_match")], stages=stages, stage="mine")
    x, y = data()
    t_logits = teacher.predict(x, verbose=0)
    s_logits = _np(student(x, training=True))
    expected = ((s_logits - t_logits) ** 2).mean()
    d.compile(optimizer=keras.optimizers.SGD(1e-2))
    history = d.fit(x, y, batch_size=len(x), epochs=3, verbose=0).history
    assert history["logit_mse_for_test_loss"][0] == pytest.approx(expected, rel=1e-4)
    assert history["loss"][0] == pytest.approx(expected + 0.5 * reference.cross_entropy(y, s_logits), rel=1e-4)
    assert history["logit_mse_for_test_loss"][-1] < history["logit_mse_for_test_loss"][0]  # it learns
    head = _np(student.get_layer("logits").kernel)
    d.set_stage("maps")
    history = d.fit(x, y, batch_size=len(x), epochs=3, verbose=0).history
    assert set(history) == {"loss", "map_match_loss"}
    assert history["map_match_loss"][-1] < history["map_match_loss"][0]
    np.testing.assert_array_equal(head, _np(student.get_layer("logits").kernel))  # up to its taps only
    # The distiller with the outside term saves and loads.
    clone = FSPDistiller.from_config(d.get_config())
    assert isinstance(clone.terms["map_match"], Stage1MapMatch) and clone.stage.name == "maps"


# ------------------------------------------------------------ the term API


@terms.register_term("logit_gram_for_test")
class LogitGram(DistillationTerm):
    """A batch-level term: the mean squared difference of the two networks'
    logit Gram matrices over the batch (one value for the batch)."""

    student_taps = teacher_taps = (LOGITS,)

    def compute(self, student, teacher, y_true):
        s, t = student[LOGITS], teacher[LOGITS]
        gram = lambda z: ops.matmul(z, ops.transpose(z))  # noqa: E731
        return ops.mean(ops.square(gram(s) - gram(t)))


def test_a_batch_level_term_is_used_as_it_is_and_per_example_terms_are_averaged():
    teacher, student = small_pair()
    d = FSPDistiller(teacher, student, stages={"g": Stage("g", {"logit_gram_for_test": 0.5, "task": 1.0})},
                     stage="g")
    x, y = data(n=16)
    t = teacher.predict(x, verbose=0).astype("float64")
    s = _np(student(x, training=True)).astype("float64")
    gram = np.mean((s @ s.T - t @ t.T) ** 2)
    # Sample weights weight the per-example task term only.
    w = np.linspace(0.5, 1.5, 16).astype("float32")
    d.compile(optimizer=keras.optimizers.SGD(0.0))
    history = d.fit(x, y, sample_weight=w, batch_size=16, epochs=1, verbose=0).history
    assert history["logit_gram_for_test_loss"][0] == pytest.approx(gram, rel=1e-4)
    task = np.mean(w * reference.cross_entropy_per_example(y, s))
    assert history["task_loss"][0] == pytest.approx(task, rel=1e-4)
    assert history["loss"][0] == pytest.approx(0.5 * gram + task, rel=1e-4)


def test_a_registered_term_in_a_stage_made_after_construction_is_created():
    teacher, student = small_pair()
    d = FSPDistiller(teacher, student)  # "kd": no attention term yet
    assert "attention" not in d.terms
    d.compile(optimizer=keras.optimizers.SGD(1e-3))
    d.set_stage(Stage("at", {"attention": 1.0, "task": 1.0}))
    assert d.terms["attention"].pairs == [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]
    history = d.fit(*data(), batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(history["attention_loss"][0]) and history["attention_loss"][0] > 0
    # ... and through a StageSchedule, before the first epoch.
    from keras_fsp.callbacks import StageSchedule

    d2 = FSPDistiller(*small_pair())
    d2.compile(optimizer=keras.optimizers.SGD(1e-3))
    later = Stage("dkd_later", {"dkd": 1.0, "task": 1.0})
    history = d2.fit(*data(), batch_size=16, epochs=2, verbose=0,
                     callbacks=[StageSchedule({0: "kd", 1: later}, verbose=0)]).history
    assert len(history["dkd_loss"]) == 1 and np.isfinite(history["dkd_loss"][0])


class _FailsOnFirstStep(DistillationTerm):
    """Compares the logits with a map of another shape: fails while the
    first step is traced."""

    student_taps = (LOGITS,)
    teacher_taps = ("stage2",)

    def compute(self, student, teacher, y_true):
        return ops.mean(student[LOGITS] - teacher["stage2"], axis=-1)


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_a_failing_first_step_leaves_both_networks_intact(steps_per_execution, monkeypatch):
    import keras_fsp.jax_steps

    monkeypatch.setattr(keras_fsp.jax_steps, "ON_CPU", True)  # the scanned path too, on JAX
    teacher, student = small_pair()
    before = [weights_of(teacher), weights_of(student)]
    d = FSPDistiller(teacher, student, terms=[_FailsOnFirstStep(name="bad")],
                     stages={"bad": Stage("bad", {"bad": 1.0})}, stage="bad")
    d.compile(optimizer=keras.optimizers.SGD(0.1), steps_per_execution=steps_per_execution)
    x, y = data()
    with pytest.raises(Exception):
        d.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for model, values in zip((teacher, student), before):
        for a, b in zip(values, weights_of(model)):  # readable, and unchanged
            np.testing.assert_array_equal(a, b)
        assert len(model.get_weights()) == len(values)
    # The same distiller trains once given a stage that works.
    d.set_stage("kd")
    history = d.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(history["kd_loss"][0])


def test_a_frozen_clone_as_student_is_refused_with_the_fix():
    teacher, _ = small_pair()
    FSPDistiller(teacher, small_pair()[1])  # freezes the teacher
    clone = keras.models.clone_model(teacher)
    with pytest.raises(ValueError, match=r"student .* has no trainable weights.*for layer in "
                                         r"student.layers: layer.trainable = True\.$"):
        FSPDistiller(teacher, clone)
    for layer in clone.layers:  # the fix the message gives
        layer.trainable = True
    d = FSPDistiller(teacher, clone)  # self-distillation
    assert d.student.trainable_weights
