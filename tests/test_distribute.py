"""MirroredStrategy over two logical CPUs gives the single-device step."""

import keras
import numpy as np
import pytest

from keras_fsp import FSPDistiller, Stage
from keras_fsp.callbacks import StageSchedule
from tests.helpers import data, small_pair, weights_of


def _build(stage, weights=None, stages=None):
    teacher, student = small_pair(weight_decay=1e-4)
    # Per-replica batch statistics differ from whole-batch ones by design;
    # freeze the student's batch norm so the two runs compute the same maths.
    for layer in student.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    if weights is not None:
        teacher.set_weights(weights[0])
        student.set_weights(weights[1])
    d = FSPDistiller(teacher, student, stage=stage, stages=stages() if stages else None)
    d.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False)
    return d


def _exact_stages():
    # The FSP stage with its own unclipped optimizer at a rate its loss
    # falls at: Keras clips each replica's gradient before summing, so with
    # clipping the two runs differ by design (see the next test).
    return {"fsp": Stage("fsp", {"fsp": 1.0}, trainable="up_to_taps",
                         optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))}


@pytest.mark.parametrize("stage", ["fsp", "kd", "fsp->task"])
def test_two_replicas_match_one_device(mirrored_strategy, stage):
    # "fsp->task": a stage switch inside fit, whose new optimizer must be made
    # inside the strategy's scope.
    first, _, switch_to = stage.partition("->")
    fit = dict(batch_size=32, epochs=2, shuffle=False, verbose=0)
    callbacks = lambda: [StageSchedule({0: first, 1: switch_to}, verbose=0)] if switch_to else []  # noqa: E731
    x, y = data(n=32)
    # Untrained networks without batch statistics blow normal inputs up;
    # at a tenth of the scale the FSP loss starts near 100 and falls.
    x = x * 0.1
    single = _build(first, stages=_exact_stages)
    weights = (single.teacher.get_weights(), single.student.get_weights())
    h1 = single.fit(x, y, callbacks=callbacks(), **fit).history
    with mirrored_strategy.scope():
        mirrored = _build(first, weights, stages=_exact_stages)
    assert mirrored.distribute_strategy.num_replicas_in_sync == 2
    h2 = mirrored.fit(x, y, callbacks=callbacks(), **fit).history
    for key in h1:
        assert np.all(np.isfinite(h1[key])), key
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-4, err_msg=key)
    if stage == "fsp":
        assert h1["fsp_loss"][1] < h1["fsp_loss"][0]  # a step that lowers the loss, not a blow-up
    moved = 0
    for before, a, b in zip(weights[1], weights_of(single.student), weights_of(mirrored.student)):
        assert np.abs(a).max() < 1e3  # finite, meaningful weights
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        moved += not np.allclose(before, a, rtol=1e-6, atol=1e-7)
    assert moved > 0  # the step did change the student


def test_builtin_fsp_stage_clips_the_summed_gradient_under_two_replicas(mirrored_strategy):
    """The built-in stage clips to a global norm of 10 at 1/100 of the
    compiled rate: one plain SGD step moves the student by at most
    0.1 / 100 * 10, whether on one device or on two replicas."""
    x, y = data(n=32)

    def step(strategy=None, weights=None):
        scope = strategy.scope() if strategy else keras.utils.custom_object_scope({})
        with scope:
            d = _build("fsp", weights)
            d.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
        before = weights_of(d.student)
        d.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        moved = np.sqrt(sum(((a.astype("float64") - b) ** 2).sum() for a, b in zip(weights_of(d.student), before)))
        return d, moved

    single, moved_single = step()
    weights = (single.teacher.get_weights(), _build("fsp").student.get_weights())
    single, moved_single = step(weights=weights)
    _, moved_mirrored = step(mirrored_strategy, weights)
    limit = 0.1 / 100 * 10
    assert moved_single == pytest.approx(limit, rel=1e-3)  # the FSP gradient is far above the clip
    assert 0.5 * limit < moved_mirrored <= limit * (1 + 1e-4)
