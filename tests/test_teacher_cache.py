"""Teacher caching: `FSPDistiller.teacher_outputs` and fitting on its cache."""

import keras
import numpy as np
import pytest
from keras import layers, ops

from keras_fsp import FSPDistiller, Stage, taps
from keras_fsp.terms import LOGITS, FSPTerm, HintTerm
from keras_fsp.augment import PadCropFlip
from keras_fsp.callbacks import StageSchedule
from tests import reference
from tests.helpers import SHAPE, CallCounter, data, small_pair

# Every teacher term at once; small weights keep 2 SGD steps finite.
ALL_TERMS = Stage("all", {"fsp": 1e-5, "hint": 1e-3, "kd": 0.5, "task": 0.5})
PAIRS = [("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")]
FSP_KEYS = [f"/fsp/max/{a}/{b}" for a, b in PAIRS]
TERMS = ("fsp_loss", "hint_loss", "kd_loss", "task_loss", "loss")


def _distiller(stage="all", extra_terms=(), **kwargs):
    teacher, student = small_pair()
    keras.utils.set_random_seed(1)  # the same hint regressor in every copy
    d = FSPDistiller(
        teacher, student,
        terms=[HintTerm("stage2", "stage1"), FSPTerm(pairs=PAIRS[:1], name="fsp_first_pair"),
               *extra_terms],
        stages={"all": ALL_TERMS, "first_pair": Stage("first_pair", {"fsp_first_pair": 1.0})},
        stage=stage, **kwargs,
    )
    d.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    return d


def _trained_weights(d):
    return [ops.convert_to_numpy(v) for v in d.student.weights] + [
        ops.convert_to_numpy(d.terms["hint"].regressor.kernel)
    ]


def test_teacher_outputs_equal_numpy_reference():
    d = _distiller()
    x, _ = data()
    cache = d.teacher_outputs(x, batch_size=8)  # 4 batches
    assert sorted(cache) == sorted(FSP_KEYS + ["stage2", LOGITS])
    names = ["stem", "stage1", "stage2", "stage3"]
    t = {
        k: ops.convert_to_numpy(v)
        for k, v in taps.tap_model(d.teacher, names)(x, training=False).items()
    }
    for key, (a, b) in zip(FSP_KEYS, PAIRS):
        assert cache[key].dtype == np.float32 and cache[key].shape[0] == len(x)
        np.testing.assert_allclose(cache[key], reference.fsp(t[a], t[b]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache["stage2"], t["stage2"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache[LOGITS], t[LOGITS], rtol=1e-5, atol=1e-5)
    # Only what the given stages need.
    assert sorted(d.teacher_outputs(x, stage="kd")) == [LOGITS]
    assert sorted(d.teacher_outputs(x, stage="first_pair")) == [FSP_KEYS[0]]
    assert sorted(d.teacher_outputs(x, stage=["fsp", "kd"])) == sorted(FSP_KEYS + [LOGITS])


def test_cached_fit_equals_uncached_fit():
    x, y = data()
    uncached, cached = _distiller(), _distiller()
    for a, b in zip(uncached.get_weights(), cached.get_weights()):
        np.testing.assert_array_equal(a, b)
    start = _trained_weights(uncached)
    cache = cached.teacher_outputs(x, batch_size=8)
    # Two SGD steps of 16 examples each.
    fit = dict(batch_size=16, epochs=1, shuffle=False, verbose=0)
    h_uncached = uncached.fit(x, y, **fit).history
    h_cached = cached.fit({"inputs": x, "teacher": cache}, y, **fit).history
    for term in TERMS:
        assert np.isfinite(h_cached[term][0])
        assert h_cached[term][0] == pytest.approx(h_uncached[term][0], rel=1e-5), term
    after = _trained_weights(uncached)
    assert max(np.abs(a - b).max() for a, b in zip(start, after)) > 1e-2  # it trained
    for a, b in zip(after, _trained_weights(cached)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # The student's own evaluate and predict accept the cached form too.
    np.testing.assert_allclose(
        cached.predict({"inputs": x, "teacher": cache}, verbose=0),
        cached.predict(x, verbose=0), rtol=1e-6,
    )


def test_cached_fit_on_device_arrays_in_scans_equals_uncached_fit(monkeypatch):
    # On JAX the batches of inputs and cache are gathered inside one compiled
    # scan (keras_fsp.jax_steps); on TensorFlow DeviceArrays feeds Keras' loop.
    import keras_fsp.jax_steps
    from keras_fsp.inputs import DeviceArrays

    monkeypatch.setattr(keras_fsp.jax_steps, "ON_CPU", True)
    x, y = data()
    uncached, cached = _distiller(), _distiller()
    cache = cached.teacher_outputs(x, batch_size=8)
    start = _trained_weights(uncached)
    cached.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), steps_per_execution=2)
    fit = dict(epochs=2, shuffle=False, verbose=0)
    h_uncached = uncached.fit(DeviceArrays(x, y, batch_size=16, seed=4), **fit).history
    h_cached = cached.fit(DeviceArrays({"inputs": x, "teacher": cache}, y, batch_size=16, seed=4),
                          **fit).history
    for term in TERMS:
        assert np.all(np.isfinite(h_cached[term]))
        np.testing.assert_allclose(h_cached[term], h_uncached[term], rtol=1e-5, err_msg=term)
    after = _trained_weights(uncached)
    assert max(np.abs(a - b).max() for a, b in zip(start, after)) > 1e-2  # it trained
    for a, b in zip(after, _trained_weights(cached)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="different lengths"):
        DeviceArrays({"inputs": x, "teacher": {k: v[:-1] for k, v in cache.items()}}, y)


def test_cache_is_shuffled_together_with_its_inputs():
    # One full batch: each term is a mean over examples, which a consistent
    # shuffle leaves unchanged and a misaligned cache does not. Scaling the
    # examples from 1/4 to 4 makes each one's targets clearly its own.
    x, y = data()
    x = x * np.geomspace(0.25, 4.0, len(x), dtype="float32")[:, None, None, None]
    cache = _distiller().teacher_outputs(x)
    fit = dict(batch_size=len(x), epochs=1, verbose=0)
    expected = _distiller().fit(x, y, shuffle=False, **fit).history
    shuffled = _distiller().fit({"inputs": x, "teacher": cache}, y, shuffle=True, **fit).history
    reversed_cache = {k: v[::-1] for k, v in cache.items()}
    misaligned = _distiller().fit(
        {"inputs": x, "teacher": reversed_cache}, y, shuffle=False, **fit
    ).history
    for term in ("fsp_loss", "hint_loss", "kd_loss"):
        assert shuffled[term][0] == pytest.approx(expected[term][0], rel=1e-5)
        # ... while the tolerance does see a misaligned cache.
        assert misaligned[term][0] != pytest.approx(expected[term][0], rel=1e-3)


def _counted_teacher():
    """A teacher with the student's tap names and widths, counting its runs."""
    inputs = keras.Input(SHAPE)
    x = CallCounter(name="counter")(inputs)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="stem")(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="stage1")(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="stage2")(x)
    x = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu", name="stage3")(x)
    logits = layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, logits, name="counted_teacher")


def test_cached_step_never_runs_the_teacher():
    teacher, (_, student) = _counted_teacher(), small_pair()
    d = FSPDistiller(teacher, student, terms=[FSPTerm(pairs=PAIRS)], stage="fsp")
    d.compile(optimizer=keras.optimizers.SGD(1e-6))
    x, y = data()
    cache = d.teacher_outputs(x, stage=["fsp", "kd"])
    assert CallCounter.calls > 0  # computing the cache does run it
    teacher_variables = {id(v) for v in teacher.variables}
    in_state = []
    spy = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: in_state.append(
            any(id(v) in teacher_variables for v in d.non_trainable_variables)
        )
    )
    CallCounter.calls = 0
    history = d.fit(
        {"inputs": x, "teacher": cache}, y, batch_size=16, epochs=2, verbose=0,
        callbacks=[StageSchedule({0: "fsp", 1: "kd"}, verbose=0), spy],
    ).history
    assert CallCounter.calls == 0
    assert len(history["fsp_loss"]) == 1 and len(history["kd_loss"]) == 1
    # Nor are its variables part of the step's state (on JAX: arguments).
    assert in_state and not any(in_state)
    d.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[spy])
    assert CallCounter.calls > 0 and all(in_state[-2:])  # without the cache it runs


def test_cache_with_augmentation_is_refused():
    x, y = data()
    cache = _distiller().teacher_outputs(x)
    d = _distiller(augment=PadCropFlip(seed=0))
    message = r"needs fixed inputs, but this distiller augments every batch \(augment=PadCropFlip\)"
    with pytest.raises(ValueError, match=message):
        d.teacher_outputs(x)
    with pytest.raises(ValueError, match=message):
        d.fit({"inputs": x, "teacher": cache}, y, verbose=0)


def test_cache_for_another_stage_or_pair_set_is_refused():
    x, y = data()
    d = _distiller(stage="fsp")
    kd_cache = d.teacher_outputs(x, stage="kd")
    missing = r"The teacher cache has no \['/fsp/max/stem/stage1', '/fsp/max/stage1/stage2', '/fsp/max/stage2/stage3'\] that stage 'fsp' needs; it holds \['/logits'\]"
    with pytest.raises(ValueError, match=missing):
        d.fit({"inputs": x, "teacher": kd_cache}, y, verbose=0)
    first_pair = d.teacher_outputs(x, stage="first_pair")
    with pytest.raises(ValueError, match=r"no \['/fsp/max/stage1/stage2', '/fsp/max/stage2/stage3'\] that stage 'fsp'"):
        d.fit({"inputs": x, "teacher": first_pair}, y, verbose=0)
    # FSP pooling is part of the key: an avg-pooling distiller refuses it.
    avg = _distiller(stage="fsp", extra_terms=[FSPTerm(pooling="avg")])
    with pytest.raises(ValueError, match=r"no \['/fsp/avg/stem/stage1'"):
        avg.fit({"inputs": x, "teacher": d.teacher_outputs(x)}, y, verbose=0)
    # A switch inside fit to a stage the cache lacks is caught when the step
    # is built for that stage.
    with pytest.raises(ValueError, match=r"no \['/logits'\] that stage 'kd' needs"):
        d.fit({"inputs": x, "teacher": d.teacher_outputs(x)}, y, epochs=2, verbose=0,
              callbacks=[StageSchedule({0: "fsp", 1: "kd"}, verbose=0)])


def test_cache_of_another_length_shape_or_form_is_refused():
    x, y = data()
    d = _distiller(stage="kd")
    cache = d.teacher_outputs(x[:16])
    with pytest.raises(ValueError, match=r"x has 32 examples but the cache's \['/logits'\] hold \[16\]"):
        d.fit({"inputs": x, "teacher": cache}, y, verbose=0)
    other_teacher = {LOGITS: np.zeros((32, 5), "float32")}
    with pytest.raises(ValueError, match=r"'/logits' has per-example shape \(5,\); this distiller's teacher gives \(10,\)"):
        d.fit({"inputs": x, "teacher": other_teacher}, y, verbose=0)
    with pytest.raises(ValueError, match=r"is the dict \{'inputs': x, 'teacher': cache\}; got the keys \['images', 'teacher'\]"):
        d.fit({"images": x, "teacher": d.teacher_outputs(x)}, y, verbose=0)
    with pytest.raises(ValueError, match=r"Stage\(s\) \['task'\] do not use the teacher.*nothing to cache"):
        d.teacher_outputs(x, stage="task")
