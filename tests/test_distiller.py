import keras
import numpy as np
import pytest
from keras import ops

import keras_fsp
from keras_fsp import FSPDistiller, Stage, taps
from keras_fsp.callbacks import LossWeightSchedule, StageSchedule
from keras_fsp.terms import FSPTerm, HintTerm, SoftTargetTerm
from tests import reference
from tests.helpers import CallCounter, data, small_pair, weights_of


def _distiller(**kwargs):
    teacher, student = small_pair()
    d = FSPDistiller(teacher, student, **kwargs)
    d.compile(optimizer=keras.optimizers.SGD(0.01), metrics=["accuracy"])
    return d


def _features(model, names, x, training):
    out = taps.tap_model(model, names)(x, training=training)
    return {k: ops.convert_to_numpy(v) for k, v in out.items()}


def test_call_predict_and_evaluate_are_the_students():
    d = _distiller()
    x, y = data()
    np.testing.assert_allclose(d.predict(x, verbose=0), d.student.predict(x, verbose=0), rtol=1e-6)
    d.student.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    ours = d.evaluate(x, y, verbose=0, return_dict=True)
    theirs = d.student.evaluate(x, y, verbose=0, return_dict=True)
    assert set(ours) == {"loss", "accuracy"}
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["accuracy"] == pytest.approx(theirs["accuracy"])


def test_fsp_stage_loss_equals_numpy_reference_on_auto_pairs():
    d = _distiller(stage="fsp")
    fsp = d.terms["fsp"]
    assert fsp.pairs == fsp.student_pairs == [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]
    x, y = data()
    names = ["stem", "stage1", "stage2", "stage3"]
    t = _features(d.teacher, names, x, training=False)
    s = _features(d.student, names, x, training=True)  # batch statistics, as in the step
    expected = reference.fsp_loss(
        [reference.fsp(t[a], t[b]) for a, b in fsp.pairs],
        [reference.fsp(s[a], s[b]) for a, b in fsp.pairs],
    )
    history = d.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history
    assert set(history) == {"loss", "fsp_loss"}
    assert history["fsp_loss"][0] == pytest.approx(expected, rel=1e-4)


def test_kd_stage_losses_equal_numpy_reference():
    kd = Stage("kd", {"kd": 0.75, "task": 0.25})
    d = _distiller(terms=[SoftTargetTerm(temperature=3.0)], stages={"kd": kd})
    assert d.stage is kd  # "kd" is the default stage
    x, y = data()
    t_logits = d.teacher.predict(x, verbose=0)
    s_logits = ops.convert_to_numpy(d.student(x, training=True))
    history = d.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history
    kd = reference.soft_target_loss(t_logits, s_logits, 3.0)
    task = reference.cross_entropy(y, s_logits)
    assert history["kd_loss"][0] == pytest.approx(kd, rel=1e-4)
    assert history["task_loss"][0] == pytest.approx(task, rel=1e-4)
    assert history["loss"][0] == pytest.approx(0.75 * kd + 0.25 * task, rel=1e-4)


def test_teacher_weights_and_batchnorm_statistics_are_frozen():
    d = _distiller(stage="fsp")
    before = weights_of(d.teacher)
    bn_means = [v for v in d.teacher.weights if "moving_mean" in v.path]
    assert bn_means
    x, y = data()
    d.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[StageSchedule({0: "fsp", 1: "kd"}, verbose=0)])
    for a, b in zip(before, weights_of(d.teacher)):
        np.testing.assert_array_equal(a, b)
    # ... while the student did train, its statistics included.
    student_bn = [v for v in d.student.weights if "moving_mean" in v.path]
    assert any(np.abs(ops.convert_to_numpy(v)).sum() > 0 for v in student_bn)


def test_stage_schedule_switches_what_is_computed_within_one_fit():
    d = _distiller(stage="fsp")
    x, y = data()
    history = d.fit(
        x, y, batch_size=16, epochs=4, verbose=0,
        callbacks=[StageSchedule({0: "fsp", 1: "kd", 3: "task"}, verbose=0)],
    ).history
    # Each term is logged only in the epochs of the stages that compute it.
    assert len(history["fsp_loss"]) == 1
    assert len(history["kd_loss"]) == 2
    assert len(history["task_loss"]) == 3  # kd (x2) and task
    assert d.stage.name == "task"
    # In the task stage the loss is the task loss alone.
    assert history["loss"][-1] == pytest.approx(history["task_loss"][-1], rel=1e-5)


def test_task_stage_never_runs_the_teacher():
    inputs = keras.Input((16, 16, 3))
    counted = CallCounter(name="counter")(inputs)
    _, student = small_pair()
    body = small_pair()[0]
    teacher = keras.Model(inputs, body(counted), name="counted_teacher")
    d = FSPDistiller(teacher, student, stage="task")
    d.compile(optimizer="sgd")
    x, y = data()
    CallCounter.calls = 0
    d.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert CallCounter.calls == 0
    d.set_stage("kd")
    d.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert CallCounter.calls > 0  # the counter does see the teacher when it runs


def test_hint_stage_trains_only_up_to_the_guided_layer_and_the_regressor():
    d = _distiller(terms=[HintTerm("stage2", "stage1")], stage="hint")
    # Teacher hint (8, 8, 32) vs guided (16, 16, 16): a strided regressor.
    regressor = d.terms["hint"].regressor
    assert regressor is not None and regressor.strides == (2, 2)
    x, y = data()
    t = _features(d.teacher, ["stage2"], x, training=False)["stage2"]
    guided = _features(d.student, ["stage1"], x, training=True)["stage1"]
    expected = reference.hint_loss(t, ops.convert_to_numpy(regressor(guided)))
    before = {v.path: ops.convert_to_numpy(v) for v in d.student.trainable_weights}
    reg_before = ops.convert_to_numpy(regressor.kernel)
    history = d.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history
    assert history["hint_loss"][0] == pytest.approx(expected, rel=1e-4)
    changed = {p for p, v in before.items()
               if not np.array_equal(v, ops.convert_to_numpy(next(w for w in d.student.weights if w.path == p)))}
    assert any("stage1" in p for p in changed)
    assert not any(p.split("/")[0].startswith(("stage2", "stage3", "logits")) for p in changed)
    assert not np.array_equal(reg_before, ops.convert_to_numpy(regressor.kernel))
    # Back to the whole student for the next stage.
    # The stage froze the rest only while training: the student is handed back
    # with its own flags.
    assert all(layer.trainable for layer in d.student.layers)
    d.set_stage("kd")
    assert not regressor.trainable


def test_custom_stage_and_linear_weight_schedule():
    # FitNets stage 2: task + lambda * soft targets, lambda 4 -> 1.
    fitnets_kd = Stage("fitnets_kd", terms={"kd": 4.0, "task": 1.0})
    d = _distiller(stages={"fitnets_kd": fitnets_kd}, stage="fitnets_kd")
    x, y = data()
    schedule = LossWeightSchedule.linear("kd", 4.0, 1.0, epochs=4)
    history = d.fit(x, y, batch_size=len(x), epochs=4, verbose=0, callbacks=[schedule]).history
    assert history["kd_weight"] == pytest.approx([4.0, 3.0, 2.0, 1.0])
    for w, kd, task, loss in zip(history["kd_weight"], history["kd_loss"], history["task_loss"], history["loss"]):
        assert loss == pytest.approx(w * kd + task, rel=1e-4)


def test_stage_weights_and_optimizer_are_per_stage():
    d = _distiller(stage="fsp")
    first = d.optimizer
    d.set_stage("task")
    assert d.optimizer is not first and int(ops.convert_to_numpy(d.optimizer.iterations)) == 0
    own = keras.optimizers.Adam(1e-3)
    d.set_stage(Stage("own", {"task": 1.0}, optimizer=own))
    assert d.optimizer is own


def test_fsp_projection_for_unequal_channels():
    teacher, _ = small_pair()
    student = keras_fsp.papers.cifar_resnet(8, input_shape=(16, 16, 3), width_multiplier=2, name="wide")
    with pytest.raises(ValueError, match=r"teacher layer 'stem' has shape \(None, 16, 16, 16\) and student layer 'stem' has shape \(None, 16, 16, 32\)"):
        FSPDistiller(teacher, student, terms=[FSPTerm(projection=False)])
    d = FSPDistiller(teacher, student, stage="fsp")  # projections by default where channels differ
    d.compile(optimizer="sgd")
    assert sorted(d.terms["fsp"].projections) == ["stage1", "stage2", "stage3", "stem"]
    x, y = data()
    t, s = d.terms["fsp"].matrices_of(d.teacher, d.student, x)
    assert [g.shape for g in t] == [g.shape for g in s] == [(32, 16, 16), (32, 16, 32), (32, 32, 64)]
    d.fit(x, y, batch_size=16, epochs=1, verbose=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (lambda: dict(terms=[FSPTerm(pairs=[("stem", "stage_2")])]),
         r"no layer named 'stage_2'.*Closest layer names: \['stage2'"),
        (lambda: dict(terms=[FSPTerm(pairs=[("stem", "stage1")], student_pairs=[])]), "1 FSP pairs.*0"),
        (lambda: dict(stage="distill"),
         r"Unknown stage 'distill'. Valid stage names are \['attention', 'fsp', 'hint', 'kd', 'task'\]"),
        (lambda: dict(terms=[FSPTerm(pair_weights=[1.0])]), "pair_weights has 1 entries for 3"),
        (lambda: dict(terms=[FSPTerm(pairs="sections")]), "'auto' or a list"),
        (lambda: dict(terms=[FSPTerm(pooling="mean")]), r"pooling must be one of \('max', 'avg'\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    teacher, student = small_pair()
    with pytest.raises(ValueError, match=message):
        FSPDistiller(teacher, student, **kwargs())


@pytest.mark.parametrize("argument, replacement", [
    ("fsp_pairs", r"terms=\[keras_fsp.terms.FSPTerm\(pairs=...\)\]"),
    ("temperature", r"terms=\[keras_fsp.terms.SoftTargetTerm\(temperature=...\)\]"),
    ("kd_weight", r"stages=\{'kd': keras_fsp.Stage\('kd', \{'kd': w, 'task': 1 - w\}\)\}"),
    ("hint_layer", r"terms=\[keras_fsp.terms.HintTerm\(hint_layer, guided_layer\)\]"),
])
def test_removed_keywords_name_their_replacement(argument, replacement):
    with pytest.raises(TypeError, match=rf"^FSPDistiller\({argument}=...\) was removed in keras_fsp 0.3: pass {replacement}\.$"):
        FSPDistiller(*small_pair(), **{argument: 1.0})


def test_bad_stage_definitions():
    with pytest.raises(ValueError, match=r"Stage 'x' uses the unknown term 'fitnet': No distillation "
                                         r"term type is registered as 'fitnet'; registered: \[.*'attention'"):
        FSPDistiller(*small_pair(), stages={"x": Stage("x", {"fitnet": 1.0})})
    with pytest.raises(ValueError, match="finite and >= 0"):
        Stage("x", {"kd": -1.0})
    with pytest.raises(ValueError, match="non-empty"):
        Stage("x", {})
    d = _distiller(stage="fsp")
    with pytest.raises(ValueError, match="Valid stage names"):
        d.set_stage("warmup")
    with pytest.raises(ValueError, match="keras.losses.Loss instance"):
        d.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="Valid stage names"):
        d.fit(*data(), epochs=1, verbose=0, callbacks=[StageSchedule({0: "fsp", 1: "tsak"})])


def test_unpoolable_pair_is_reported_with_layer_names():
    teacher, student = small_pair()
    # stage3 (4x4) with the 16x16 stem is poolable; a 16x16 map with a
    # 6x6 one is not: build such a student.
    inputs = keras.Input((16, 16, 3))
    a = keras.layers.Conv2D(16, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(16, 5, padding="valid", name="b")(keras.layers.MaxPooling2D(2)(a))  # 4x4
    c = keras.layers.Conv2D(16, 3, padding="valid", name="c")(a)  # 14x14
    out = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(b)[:, None, None], keras.layers.GlobalAveragePooling2D()(c)[:, None, None]])))
    odd = keras.Model(inputs, out)
    with pytest.raises(ValueError, match=r"FSP pair \('a', 'c'\) of the student.*\(None, 16, 16, 16\) and \(None, 14, 14, 16\)"):
        FSPDistiller(teacher, odd, terms=[FSPTerm(pairs=[("stem", "stem")], student_pairs=[("a", "c")])])


def test_get_config_round_trip():
    stages = {"mix": Stage("mix", {"fsp": 0.1, "kd": 1.0}), "fsp": Stage("fsp", {"fsp": 0.01})}
    d = _distiller(terms=[SoftTargetTerm(temperature=2.0)], stages=stages, stage="mix")
    clone = FSPDistiller.from_config(d.get_config())
    assert clone.terms["fsp"].pairs == d.terms["fsp"].pairs
    assert clone.terms["kd"].temperature == 2.0
    assert clone.stage.terms == {"fsp": 0.1, "kd": 1.0}
    assert clone.stages["fsp"].terms == {"fsp": 0.01}  # an overridden built-in name


def test_term_metrics_are_weighted_like_the_loss():
    # 40 examples in batches of 32 and 8: both logs are per-example means.
    d = _distiller(stage="task")
    x, y = data(n=40)
    history = d.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert history["loss"][0] == pytest.approx(history["task_loss"][0], rel=1e-5)


@pytest.mark.parametrize("stage", ["fsp", "hint"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_builtin_feature_stages_stay_finite_with_ordinary_optimizers(stage, optimizer):
    # compile(); fit() as for any Keras model, at the top of the usual range:
    # the built-in stages train at 1/100 of the rate with clipped gradients.
    teacher, student = small_pair()
    kwargs = dict(terms=[HintTerm("stage2", "stage2")]) if stage == "hint" else {}
    d = FSPDistiller(teacher, student, stage=stage, **kwargs)
    make = {"sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9), "adam": lambda: keras.optimizers.Adam(0.1)}
    d.compile(optimizer=make[optimizer](), metrics=["accuracy"])
    x, y = data(n=64)
    losses = d.fit(x, y, batch_size=16, epochs=3, verbose=0).history[f"{stage}_loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    lr = float(ops.convert_to_numpy(d.optimizer.learning_rate))
    assert lr == pytest.approx(0.1 / 100) and d.optimizer.global_clipnorm == 10.0


def test_a_loss_that_turns_nan_stops_fit_naming_the_term_and_stage():
    teacher, student = small_pair()
    own = Stage("fsp", {"fsp": 1.0}, trainable="up_to_taps", optimizer=keras.optimizers.SGD(10.0))
    d = FSPDistiller(teacher, student, stages={"fsp": own}, stage="fsp")
    d.compile(optimizer="sgd")
    x, y = data(n=64)
    with pytest.raises(keras_fsp.callbacks.NonFiniteLossError,
                       match=r"fsp_loss became (NaN|infinite) in stage 'fsp' at epoch \d+, batch \d+; "
                             r"lower the learning rate \(the optimizer of stage 'fsp'"):
        d.fit(x, y, batch_size=16, epochs=5, verbose=0)


def _distiller_with(**compile_kwargs):
    d = FSPDistiller(*small_pair(), stage="fsp")
    d.compile(optimizer="sgd", **compile_kwargs)
    return d


@pytest.mark.parametrize("stage", ["fsp", "kd"])
def test_several_steps_per_execution_train_like_one(stage, monkeypatch):
    # On JAX the steps run in one compiled scan (keras_fsp.jax_steps, forced
    # here on the CPU); on TensorFlow in Keras' in-graph loop. 5 batches in
    # groups of 2: the last group is a single batch, and the last batch is
    # smaller (70 = 4 x 16 + 6).
    monkeypatch.setattr(keras_fsp.jax_steps, "ON_CPU", True)
    if keras.backend.backend() == "jax":
        assert keras_fsp.jax_steps.applies(_distiller_with(steps_per_execution=2))
    x, y = data(n=70)
    runs = []
    for steps in (1, 2):
        teacher, student = small_pair()
        d = FSPDistiller(teacher, student, stage=stage)
        d.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), steps_per_execution=steps)
        history = d.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
        runs.append((history, weights_of(student)))
    (h1, w1), (h2, w2) = runs
    for key in h1:
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-4, err_msg=key)
    moved = [not np.allclose(a, b) for a, b in zip(w1, weights_of(small_pair()[1]))]
    assert any(moved)
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_device_arrays_in_scans_train_like_one_step_at_a_time(monkeypatch):
    # JAX: DeviceArrays' batches gathered inside the compiled scan
    # (keras_fsp.jax_steps), here blocks of 3 batches over 5 + a smaller one;
    # TensorFlow: Keras' own loop. Both against one step per dispatch.
    from keras_fsp.inputs import DeviceArrays

    monkeypatch.setattr(keras_fsp.jax_steps, "ON_CPU", True)
    x, y = data(n=88)  # 5 batches of 16 and one of 8
    runs = []
    for steps in (1, 3):
        teacher, student = small_pair()
        d = FSPDistiller(teacher, student, stage="kd")
        d.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), metrics=["accuracy"],
                  steps_per_execution=steps)
        train = DeviceArrays(x, y, batch_size=16, seed=3)
        history = d.fit(train, epochs=2, shuffle=False, verbose=0,
                        callbacks=[StageSchedule({0: "kd", 1: "task"}, verbose=0)]).history
        runs.append((history, weights_of(student), int(ops.convert_to_numpy(d.optimizer.iterations))))
    (h1, w1, it1), (h2, w2, it2) = runs
    assert it1 == it2 == 6  # the task stage's optimizer counted every real step
    assert set(h1) == set(h2) and "accuracy" in h1
    for key in h1:
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-4, err_msg=key)
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_saved_distiller_and_its_checkpoint_files_load_with_plain_keras(tmp_path):
    d = _distiller(terms=[HintTerm("stage2", "stage1"), SoftTargetTerm(temperature=3.0)])
    x, y = data()
    d.fit(x, y, batch_size=16, epochs=1, verbose=0,
          callbacks=[keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras"))])
    d.save(tmp_path / "distiller.keras")
    for path in ("distiller.keras", "ckpt.keras"):
        loaded = keras.models.load_model(tmp_path / path)  # no custom_objects
        assert isinstance(loaded, FSPDistiller) and loaded.stage.name == "kd" and loaded.compiled
        assert loaded.terms["kd"].temperature == 3.0
        np.testing.assert_allclose(loaded.predict(x, verbose=0), d.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ops.convert_to_numpy(loaded.terms["hint"].regressor.kernel),
                                      ops.convert_to_numpy(d.terms["hint"].regressor.kernel))


def test_fit_warns_of_unnormalised_images_and_refuses_one_hot_labels_with_the_fix():
    d = FSPDistiller(*small_pair())
    d.compile(optimizer=keras.optimizers.SGD(0.0))
    x, y = data(n=16)
    with pytest.warns(UserWarning, match=r"x's values reach 255: the networks expect normalised "
                                         r"inputs .* keras_fsp.apps.data.normalize"):
        d.fit(np.clip(x * 100 + 128, 0, 255).astype("float32").round(), y, epochs=1, verbose=0)
    one_hot = np.eye(10, dtype="float32")[y]
    with pytest.raises(ValueError, match=r"^y holds one-hot labels \(shape \(16, 10\)\), but the "
                                         r"student's loss takes integer class labels: pass "
                                         r"y.argmax\(-1\), or compile with loss="):
        d.fit(x, one_hot, epochs=1, verbose=0)
    # With a categorical loss, one-hot labels are what it takes.
    d.compile(optimizer=keras.optimizers.SGD(0.0),
              loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    d.set_stage("task")
    history = d.fit(x, one_hot, epochs=1, verbose=0).history
    assert np.isfinite(history["task_loss"][0])


def test_a_term_added_to_the_active_stage_replaces_the_old_one_with_its_weight():
    d = _distiller()  # "kd": 0.9 soft targets + 0.1 labels, compiled
    n = len(d.weights)
    d.add_term(SoftTargetTerm(temperature=2.0))
    assert len(d.weights) == n and d.terms["kd"].temperature == 2.0
    assert float(ops.convert_to_numpy(d.terms["kd"].stage_weight)) == pytest.approx(0.9)
    x, y = data()
    history = d.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history
    assert history["kd_loss"][0] > 0 and history["loss"][0] == pytest.approx(
        0.9 * history["kd_loss"][0] + 0.1 * history["task_loss"][0], rel=1e-4)
