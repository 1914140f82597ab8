import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import taps
from keras_fsp.papers import methods, recipes
from keras_fsp.augment import PadCropFlip
from tests import reference
from tests.helpers import data, small_pair


def _fit(recipe, x, y):
    """Keras' `fit` with the recipe's epochs and callbacks."""
    return recipe.model.fit(x, y, batch_size=16, epochs=recipe.epochs, callbacks=recipe.callbacks,
                            verbose=0)


def _lr(optimizer, step):
    lr = optimizer._learning_rate
    return float(ops.convert_to_numpy(lr(step))) if callable(lr) else float(ops.convert_to_numpy(lr))


def test_fsp_paper_schedule():
    teacher, student = small_pair()
    r = recipes.fsp_paper(teacher, student, steps_per_epoch=100)
    assert r.epochs == 210 + 640
    fsp, task = r.schedule[0], r.schedule[210]
    assert (fsp.name, fsp.terms, task.terms) == ("fsp", {"fsp": 1.0}, {"task": 1.0})
    assert r.model.terms["fsp"].pairs == [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]
    assert r.model.terms["fsp"].pooling == "max"
    for step, lr in [(0, 1e-3), (10999, 1e-3), (11001, 1e-4), (16001, 1e-5)]:
        assert _lr(fsp.optimizer, step) == pytest.approx(lr)
    for step, lr in [(0, 0.1), (32001, 0.01), (48001, 0.001)]:
        assert _lr(task.optimizer, step) == pytest.approx(lr)
    # stage 1 clips its gradients at a global norm of 10 by default; None is the paper
    assert fsp.optimizer.global_clipnorm == 10.0 and isinstance(fsp.optimizer, keras.optimizers.SGD)
    paper = recipes.fsp_paper(*small_pair(), steps_per_epoch=100, stage1_clipnorm=None)
    assert paper.schedule[0].optimizer.global_clipnorm is None
    assert task.optimizer.global_clipnorm is None  # the task stage is the paper's
    consecutive = recipes.fsp_paper(*small_pair(), steps_per_epoch=100, pairs="consecutive", pooling="avg")
    assert consecutive.model.terms["fsp"].pairs == [("stage1", "stage2"), ("stage2", "stage3")]
    assert consecutive.model.terms["fsp"].pooling == "avg"


def test_fitnets_lambda_is_4_at_start_of_stage_2_and_1_at_its_end():
    teacher, student = small_pair()
    r = recipes.fitnets(teacher, student, steps_per_epoch=1, stage1_iterations=2, stage2_iterations=4)
    assert r.model.terms["hint"].regressor is None  # both stage2 maps are (8, 8, 32): no regressor needed
    r.compile()
    x, y = data(n=16)
    history = _fit(r, x, y).history
    assert len(history["hint_loss"]) == 2
    assert history["kd_weight"] == pytest.approx([4.0, 3.0, 2.0, 1.0])
    for w, kd, task, loss in zip(history["kd_weight"], history["kd_loss"], history["task_loss"], history["loss"][2:]):
        assert loss == pytest.approx(w * kd + task, rel=1e-4)
    assert r.model.terms["kd"].temperature == 3.0


def test_dense_step_k_uses_exactly_the_pairs_of_sections_1_to_k():
    teacher, student = small_pair()  # ResNet-14 (2 blocks/section) -> ResNet-8 (1)
    r = recipes.dense_fsp(teacher, student, steps_per_epoch=1, stage1_iterations=3, stage2_iterations=2)
    d = r.model
    last = d.terms["dense_fsp_3"]  # every pair of the network
    assert last.student_pairs[:2] == [("stem", "stage1_block1_relu1"), ("stage1_block1_relu1", "stage1_block1")]
    assert last.pairs[:2] == [("stem", "stage1_block1"), ("stage1_block1", "stage1_block2")]
    steps = [r.schedule[e] for e in sorted(r.schedule)]
    assert [s.name for s in steps] == ["dense_fsp_1", "dense_fsp_2", "dense_fsp_3", "task"]
    for k, stage in enumerate(steps[:3], start=1):
        assert stage.terms == {f"dense_fsp_{k}": 1.0}
        term = d.terms[f"dense_fsp_{k}"]
        sections = {int(b[5]) for _, b in term.student_pairs}
        assert sections == set(range(1, k + 1))
        assert len(term.pairs) == len(term.student_pairs) == 2 * k
        assert term.pairs == last.pairs[: 2 * k]
    # The loss of step 1 is the FSP loss of section 1's pairs only.
    r.compile()
    x, y = data(n=16)
    first = d.terms["dense_fsp_1"]
    names = sorted({n for p in first.pairs for n in p})
    s_names = sorted({n for p in first.student_pairs for n in p})
    t = {k: ops.convert_to_numpy(v) for k, v in taps.tap_model(teacher, names)(x, training=False).items()}
    s = {k: ops.convert_to_numpy(v) for k, v in taps.tap_model(student, s_names)(x, training=True).items()}
    expected = reference.fsp_loss(
        [reference.fsp(t[a], t[b]) for a, b in first.pairs],
        [reference.fsp(s[a], s[b]) for a, b in first.student_pairs],
    )
    history = _fit(r, x, y).history
    assert history["dense_fsp_1_loss"][0] == pytest.approx(expected, rel=1e-4)
    assert [len(history[f"dense_fsp_{k}_loss"]) for k in (1, 2, 3)] == [1, 1, 1]
    assert len(history["task_loss"]) == 2


def test_kd_and_supervised_recipes():
    teacher, student = small_pair()
    r = recipes.hinton_kd(teacher, student, steps_per_epoch=10, iterations=40, temperature=20.0)
    assert r.epochs == 4 and r.model.terms["kd"].temperature == 20.0
    assert r.schedule[0].terms == {"kd": 0.9, "task": pytest.approx(0.1)}
    base = recipes.student_alone(student, steps_per_epoch=10, iterations=40, augment=PadCropFlip(seed=0))
    base.compile()
    x, y = data(n=16)
    history = _fit(base, x, y).history
    assert len(history["loss"]) == 4
    # The augmented wrapper shares the student's weights.
    np.testing.assert_allclose(base.model.predict(x, verbose=0), student.predict(x, verbose=0), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown method 'fitnets'; choose one of none, kd, fitnet"):
        methods.get("fitnets")
    assert methods.get("kd").build(*small_pair(), steps_per_epoch=10).name == "kd"


def test_stage1_optimizer_options_reach_every_fsp_step():
    teacher, student = small_pair()
    adam = recipes.fsp_paper(teacher, student, steps_per_epoch=100, stage1_optimizer="adam")
    assert isinstance(adam.schedule[0].optimizer, keras.optimizers.Adam)
    assert _lr(adam.schedule[0].optimizer, 11001) == pytest.approx(1e-4)
    dense = recipes.dense_fsp(teacher, student, steps_per_epoch=1, stage1_iterations=3,
                              stage2_iterations=2, stage1_clipnorm=5.0)
    steps = [dense.schedule[e] for e in sorted(dense.schedule)]
    assert [s.optimizer.global_clipnorm for s in steps] == [5.0, 5.0, 5.0, None]
    with pytest.raises(ValueError, match="stage1_optimizer must be one of"):
        recipes.fsp_paper(teacher, student, steps_per_epoch=100, stage1_optimizer="rmsprop")


def _first_step_length(recipe):
    """How far the first step of `recipe`'s first stage moves its student's
    trainable weights (Euclidean norm)."""
    recipe.compile()
    weights = recipe.student.trainable_variables
    before = [np.array(v, dtype="float64") for v in weights]
    x, y = data(n=16)
    recipe.model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # one step
    return np.sqrt(sum(((np.array(v, dtype="float64") - b) ** 2).sum()
                       for v, b in zip(weights, before)))


def test_clipped_stage1_step_moves_the_student_by_lr_times_the_clip_norm():
    r = recipes.fsp_paper(*small_pair(), steps_per_epoch=1, stage1_iterations=1,
                          stage2_iterations=1, stage1_clipnorm=0.1)
    # one SGD step (no momentum history yet) of the gradient clipped to norm 0.1
    # (weight decay's term is part of it): lr 1e-3 x 0.1; the FSP gradient is larger
    assert _first_step_length(r) == pytest.approx(1e-3 * 0.1, rel=1e-2)


def test_fitnets_hint_step_is_clipped_by_default_and_unclipped_as_published():
    teacher, student = small_pair()
    default = recipes.fitnets(teacher, student, steps_per_epoch=100)
    assert default.schedule[0].optimizer.global_clipnorm == 10.0
    published = recipes.fitnets(teacher, student, steps_per_epoch=100, hint_clipnorm=None)
    assert published.schedule[0].optimizer.global_clipnorm is None
    assert methods.get("fitnet").parse_settings(["hint_clipnorm=2"]) == {"hint_clipnorm": 2.0}
    assert methods.get("fitnet").parse_settings(["hint_clipnorm=none"]) == {"hint_clipnorm": None}
    assert methods.get("fsp").parse_settings(["stage1_clipnorm=None"]) == {"stage1_clipnorm": None}
    r = recipes.fitnets(teacher, student, steps_per_epoch=1, stage1_iterations=1,
                        stage2_iterations=1, hint_clipnorm=1.0)
    # one SGD step (no momentum history yet) of the gradient clipped to norm
    # 1 at the hint stage's rate 1e-4 (the hint's gradient is far larger)
    assert _first_step_length(r) == pytest.approx(1e-4 * 1.0, rel=1e-2)


@pytest.fixture(scope="module")
def digit_pair():
    from keras_fsp.papers import cifar_resnet

    keras.utils.set_random_seed(0)
    return (cifar_resnet(8, input_shape=(8, 8, 1), name="table_teacher"),
            cifar_resnet(8, input_shape=(8, 8, 1), name="table_student"))


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_of_the_table_builds_and_each_stage_computes_its_loss(digit_pair, name):
    # What the command line runs for --method NAME, on real networks: the
    # recipe builds (pairing, terms, stages) and every stage of its schedule
    # gives a finite, positive loss with the terms it names.
    method = methods.get(name)
    teacher, student = digit_pair
    # Every setting `--method_options` offers, given at its default: each is
    # one the recipe (or the recipe it passes it on to) takes.
    recipe = method.build(teacher if method.uses_teacher else None, student, steps_per_epoch=2,
                          scale=0.001, **method.settings())
    assert recipe.name == name and recipe.epochs >= len(recipe.schedule)
    if not recipe.schedule:  # the student alone: a plain Keras model, no stages
        assert recipe.model is student and not method.uses_teacher
        return
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, 8)
    model = recipe.model
    for stage in recipe.schedule.values():
        model.set_stage(stage)
        loss = float(model.compute_loss(x, y, model(x, training=True)))
        assert np.isfinite(loss) and loss > 0, (name, stage.name, loss)
        assert {t.name for t in model.active_terms()} == set(stage.terms), (name, stage.name)


def test_method_options_reach_the_terms_through_the_recipes_they_pass_through(digit_pair):
    teacher, student = digit_pair
    dkd = methods.get("dkd")
    recipe = dkd.build(teacher, student, 2, scale=0.001, **dkd.parse_settings(["beta=0.5"]))
    term = recipe.model.terms["dkd"]
    assert (term.alpha, term.beta) == (1.0, 0.5)
    # at-kd passes beta on to attention_transfer; rkd-kd passes task_weight
    # through rkd to the stage it builds.
    at_kd = methods.get("at-kd")
    recipe = at_kd.build(teacher, student, 2, scale=0.001, **at_kd.parse_settings(["beta=250"]))
    term = recipe.model.terms["attention"]
    assert term.beta == 250.0
    rkd_kd = methods.get("rkd-kd")
    recipe = rkd_kd.build(teacher, student, 2, scale=0.001,
                          **rkd_kd.parse_settings(["task_weight=0.25", "kd_weight=2"]))
    (stage,) = recipe.schedule.values()
    assert (stage.terms["task"], stage.terms["kd"]) == (0.25, 2.0)


def test_method_options_are_refused_with_the_settings_the_method_has():
    dkd = methods.get("dkd")
    assert dkd.parse_settings(["warmup_epochs=5", "beta = 2"]) == {"warmup_epochs": 5, "beta": 2.0}
    for items, message in ((["gamma=1"], r"dkd has no setting 'gamma'; its settings \(with their "
                                         r"defaults\): iterations=64000, alpha=1.0, beta=8.0, "),
                           (["beta"], r"'beta': give NAME=VALUE"),
                           (["warmup_epochs=2.5"], r"warmup_epochs=2.5: give a whole number"),
                           (["beta=high"], r"beta=high: give a number \(its default is 8.0\)"),
                           (["beta=1", "beta=2"], "beta is given twice")):
        with pytest.raises(ValueError, match=message):
            dkd.parse_settings(items)
    fsp = methods.get("fsp")
    assert fsp.parse_settings(["restore_kernel_norms=false", "stage1_clipnorm=5",
                               "pairs=all"]) == {"restore_kernel_norms": False,
                                                 "stage1_clipnorm": 5.0, "pairs": "all"}
    # A setting whose default is None takes a number, none or a string.
    assert methods.get("dense-fsp").parse_settings(["stage1_clipnorm=2"]) == {"stage1_clipnorm": 2}
    assert methods.get("fitnet").parse_settings(["hint_layer=none", "guided_layer=stage_2"]) == {
        "hint_layer": None, "guided_layer": "stage_2"}
    assert "stage2" not in methods.get("fsp-kd").settings()  # fsp-kd sets it itself
