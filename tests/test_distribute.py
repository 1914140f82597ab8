"""MirroredStrategy over two logical CPUs gives the single-device step."""

import keras
import numpy as np
import pytest

from keras_fsp import FSPDistiller
from keras_fsp.callbacks import StageSchedule
from tests.helpers import data, small_pair, weights_of


def _build(stage, weights=None):
    teacher, student = small_pair(weight_decay=1e-4)
    # Per-replica batch statistics differ from whole-batch ones by design;
    # freeze the student's batch norm so the two runs compute the same maths.
    for layer in student.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    if weights is not None:
        teacher.set_weights(weights[0])
        student.set_weights(weights[1])
    d = FSPDistiller(teacher, student, stage=stage)
    d.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False)
    return d


@pytest.mark.parametrize("stage", ["fsp", "kd", "fsp->task"])
def test_two_replicas_match_one_device(mirrored_strategy, stage):
    # "fsp->task": a stage switch inside fit, whose new optimizer must be made
    # inside the strategy's scope.
    first, _, switch_to = stage.partition("->")
    fit = dict(batch_size=32, epochs=2, shuffle=False, verbose=0)
    callbacks = lambda: [StageSchedule({0: first, 1: switch_to}, verbose=0)] if switch_to else []  # noqa: E731
    x, y = data(n=32)
    single = _build(first)
    weights = (single.teacher.get_weights(), single.student.get_weights())
    h1 = single.fit(x, y, callbacks=callbacks(), **fit).history
    with mirrored_strategy.scope():
        mirrored = _build(first, weights)
    assert mirrored.distribute_strategy.num_replicas_in_sync == 2
    h2 = mirrored.fit(x, y, callbacks=callbacks(), **fit).history
    for key in h1:
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-4, err_msg=key)
    moved = 0
    for before, a, b in zip(weights[1], weights_of(single.student), weights_of(mirrored.student)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        moved += not np.allclose(before, a)
    assert moved > 0  # the step did change the student
