"""FSPDistiller under the mixed_float16 and mixed_bfloat16 dtype policies."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import FSPDistiller, Stage, taps
from keras_fsp.terms import HintTerm
from tests import reference
from tests.helpers import SHAPE, data, small_pair, weights_of

LossScaleOptimizer = keras.optimizers.LossScaleOptimizer
NAMES = ["stem", "stage1", "stage2", "stage3"]

# Relative tolerance of the step's FSP loss against a float64 reference on
# the same low-precision feature maps. Accumulated in float32, the FSP
# matrices are within ~1e-6 of the reference; what can differ is the maps:
# the step recomputes them (fused, inside a compiled function), so an element
# may round differently, by up to the unit roundoff u (2^-11 for float16,
# 2^-8 for bfloat16) relative. The loss is quadratic in the maps, so its
# relative error stays within 2u as long as the teacher's and student's
# matrices are not close (here they differ by far: untrained networks, loss
# ~1e6). Rounding differences go both ways and average out; measured:
# 2e-7 (float16), up to 4.4e-4 (bfloat16 on JAX).
RTOL = {"mixed_float16": 2 * 2.0**-11, "mixed_bfloat16": 2 * 2.0**-8}
COMPUTE_DTYPE = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


@pytest.fixture
def policy(request):
    """Sets the global dtype policy for the test; float32 again afterwards."""
    keras.mixed_precision.set_dtype_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


BOTH = pytest.mark.parametrize(
    "policy", ["mixed_float16", "mixed_bfloat16"], indirect=True
)


def _features(model, x, training):
    out = taps.tap_model(model, NAMES, include_logits=False)(x, training=training)
    return {k: ops.convert_to_numpy(v) for k, v in out.items()}


@BOTH
def test_fsp_loss_is_float32_and_equals_reference(policy):
    teacher, student = small_pair()
    d = FSPDistiller(teacher, student, stage="fsp")
    d.compile(optimizer=keras.optimizers.SGD(1e-6))
    x, y = data()
    t = _features(teacher, x, training=False)
    s = _features(student, x, training=True)  # batch statistics, as in the step
    assert {str(v.dtype) for v in (*t.values(), *s.values())} == {COMPUTE_DTYPE[policy]}
    expected = reference.fsp_loss(
        [reference.fsp(t[a], t[b]) for a, b in d.terms["fsp"].pairs],
        [reference.fsp(s[a], s[b]) for a, b in d.terms["fsp"].pairs],
    )
    loss = d.compute_loss(x, y, d(x, training=True))
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    history = d.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history
    assert np.isfinite(history["fsp_loss"][0])
    assert history["fsp_loss"][0] == pytest.approx(expected, rel=RTOL[policy])
    # The teacher cache holds float32 FSP matrices too.
    cache = d.teacher_outputs(x)
    assert {str(v.dtype) for v in cache.values()} == {"float32"}


@BOTH
def test_short_fit_trains_with_finite_losses(policy):
    teacher, student = small_pair()
    d = FSPDistiller(
        teacher, student, terms=[HintTerm("stage2", "stage1")],
        stages={"all": Stage("all", {"fsp": 1e-5, "hint": 1e-3, "kd": 0.5, "task": 0.5})},
        stage="kd",
    )
    d.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    x, y = data()
    before = weights_of(d.student)
    history = d.fit(x, y, batch_size=8, epochs=1, verbose=0).history  # 4 steps
    assert all(np.isfinite(v[0]) for v in history.values())
    if policy == "mixed_float16":
        # Loss-scaled: a step with non-finite gradients is skipped and halves
        # the scale (from 2^15); the others are applied.
        assert isinstance(d.optimizer, LossScaleOptimizer)
        applied = int(ops.convert_to_numpy(d.optimizer.inner_optimizer.iterations))
        scale = float(ops.convert_to_numpy(d.optimizer.dynamic_scale))
        assert applied >= 2 and applied + np.log2(2.0**15 / scale) == 4
    else:
        assert int(ops.convert_to_numpy(d.optimizer.iterations)) == 4
    changed = [not np.array_equal(a, b) for a, b in zip(before, weights_of(d.student))]
    assert all(changed)  # kernels, BN parameters and statistics
    # Every loss term at once, from the cache as well.
    d.set_stage("all")
    cache = d.teacher_outputs(x)
    history = d.fit({"inputs": x, "teacher": cache}, y, batch_size=8, epochs=1, verbose=0).history
    assert sorted(history) == ["fsp_loss", "hint_loss", "kd_loss", "loss", "task_loss"]
    assert all(np.isfinite(v[0]) for v in history.values())


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_every_stage_optimizer_is_loss_scaled_once_under_mixed_float16(policy):
    teacher, student = small_pair()
    own = keras.optimizers.SGD(0.1)
    own_scaled = LossScaleOptimizer(keras.optimizers.SGD(0.1))
    d = FSPDistiller(teacher, student, stages={
        "own": Stage("own", {"task": 1.0}, optimizer=own),
        "own_scaled": Stage("own_scaled", {"task": 1.0}, optimizer=own_scaled),
    }, stage="fsp")
    d.compile(optimizer=keras.optimizers.SGD(0.01))
    fsp_optimizer = d.optimizer
    assert isinstance(fsp_optimizer, LossScaleOptimizer)
    assert type(fsp_optimizer.inner_optimizer) is keras.optimizers.SGD
    d.set_stage("kd")  # a fresh copy, scaled too
    assert isinstance(d.optimizer, LossScaleOptimizer) and d.optimizer is not fsp_optimizer
    d.set_stage("own")  # the stage's own optimizer, wrapped ...
    wrapper = d.optimizer
    assert isinstance(wrapper, LossScaleOptimizer) and wrapper.inner_optimizer is own
    d.set_stage("task")
    d.set_stage("own")  # ... once: coming back resumes the same wrapper
    assert d.optimizer is wrapper
    d.set_stage("own_scaled")  # already a LossScaleOptimizer: as it is
    assert d.optimizer is own_scaled
    # A LossScaleOptimizer given to compile is not wrapped again.
    d.set_stage("kd")
    d.compile(optimizer=LossScaleOptimizer(keras.optimizers.SGD(0.01)))
    assert type(d.optimizer.inner_optimizer) is keras.optimizers.SGD
    # auto_scale_loss=False opts out, as in keras.Model.compile.
    d.compile(optimizer=keras.optimizers.SGD(0.01), auto_scale_loss=False)
    assert type(d.optimizer) is keras.optimizers.SGD


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_float16_student_is_loss_scaled_whatever_the_distillers_policy(policy):
    teacher, student = small_pair()  # built under mixed_float16
    keras.mixed_precision.set_dtype_policy("float32")
    d = FSPDistiller(teacher, student)
    assert d.dtype_policy.name == "float32"
    d.compile(optimizer="sgd")
    assert isinstance(d.optimizer, LossScaleOptimizer)


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_bfloat16_needs_no_loss_scaling(policy):
    # bfloat16 has float32's exponent range: Keras does not scale it either.
    d = FSPDistiller(*small_pair())
    d.compile(optimizer="sgd")
    assert type(d.optimizer) is keras.optimizers.SGD


@BOTH
def test_float32_copy_computes_in_float32_with_the_same_weights(policy):
    from keras_fsp.export import float32_copy
    from keras_fsp.papers import cifar_resnet

    keras.utils.set_random_seed(0)
    inner = cifar_resnet(8, input_shape=SHAPE)
    inputs = keras.Input(SHAPE)
    mixed = keras.Model(inputs, inner(inputs))  # nested, as keras-hub classifiers are
    keras.mixed_precision.set_dtype_policy("float32")
    copy = float32_copy(mixed)
    assert copy is not mixed
    nested = [layer for layer in copy.layers if isinstance(layer, keras.Model)]
    every = copy.layers + [layer for m in nested for layer in m.layers]
    assert {layer.compute_dtype for layer in every} == {"float32"}
    for a, b in zip(weights_of(copy), weights_of(mixed)):
        np.testing.assert_array_equal(a, b)
    # The same weights in a network built under float32: the copy must
    # compute exactly what it computes.
    reference_net = cifar_resnet(8, input_shape=SHAPE)
    reference_net.set_weights(mixed.get_weights())
    x, _ = data(4)
    expected = ops.convert_to_numpy(reference_net(x, training=False))
    np.testing.assert_allclose(ops.convert_to_numpy(copy(x, training=False)), expected,
                               rtol=1e-5, atol=1e-5)
    low = ops.convert_to_numpy(ops.cast(mixed(x, training=False), "float32"))
    assert keras.backend.standardize_dtype(mixed(x).dtype) == COMPUTE_DTYPE[policy]
    assert not np.allclose(low, expected, rtol=1e-6, atol=1e-6)  # the copy is not the original
    assert float32_copy(copy) is copy
