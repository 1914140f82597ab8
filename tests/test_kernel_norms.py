"""Restoring batch-normalised kernel norms: the norms come back, the function
does not change, and the callback does it at the stage switch."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_fsp import FSPDistiller, Stage
from keras_fsp.papers import recipes
from keras_fsp.callbacks import RestoreKernelNorms, StageSchedule
from keras_fsp.kernel_norms import kernel_norms, normalized_kernels, restore_kernel_norms
from tests.helpers import data, small_pair


def _norm(layer):
    return np.linalg.norm(ops.convert_to_numpy(layer.kernel))


def test_normalized_kernels_are_the_convolutions_before_batch_norm():
    _, student = small_pair()
    names = [layer.name for layer, _ in normalized_kernels(student)]
    convs = [l.name for l in student.layers if isinstance(l, keras.layers.Conv2D)]
    assert names == convs and len(names) == 9  # stem, 2 per block, 2 shortcuts
    assert "logits" not in names  # the dense head feeds no batch norm


def test_restore_brings_norms_back_and_keeps_the_function():
    _, student = small_pair()
    x, _ = data(n=16)
    initial = kernel_norms(student)
    # Inflate the kernels as FSP stage 1 does, and let batch norm see them.
    rng = np.random.default_rng(0)
    for layer, _ in normalized_kernels(student):
        layer.kernel.assign(layer.kernel * float(rng.uniform(3, 20)))
    student(x, training=True)  # moving statistics follow the inflated kernels
    before_train = ops.convert_to_numpy(student(x, training=True))
    before_infer = ops.convert_to_numpy(student(x, training=False))
    factors = restore_kernel_norms(student, initial)
    for layer, _ in normalized_kernels(student):
        assert _norm(layer) == pytest.approx(initial[layer.name], rel=1e-5)
        assert factors[layer.name] < 1 / 2.9
    # Inference first: a training-mode call updates the moving statistics.
    # Equal up to batch norm's epsilon (it becomes epsilon / c^2 in effect).
    np.testing.assert_allclose(ops.convert_to_numpy(student(x, training=False)), before_infer,
                               rtol=1e-3, atol=1e-4 * np.abs(before_infer).max())
    np.testing.assert_allclose(ops.convert_to_numpy(student(x, training=True)), before_train,
                               rtol=1e-4, atol=1e-4)


def test_unknown_layer_is_refused():
    _, student = small_pair()
    with pytest.raises(ValueError, match="not batch-normalised kernels"):
        restore_kernel_norms(student, {"logits": 1.0})


@pytest.mark.parametrize("start_epoch", [None, 1])
def test_callback_restores_the_initial_norms_when_the_task_stage_starts(start_epoch):
    teacher, student = small_pair()
    initial = kernel_norms(student)
    fsp = Stage("fsp", {"fsp": 1.0}, trainable="up_to_taps",
                optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    distiller = FSPDistiller(teacher, student, stages={"fsp": fsp})
    distiller.compile(optimizer=keras.optimizers.SGD(0.0))  # the task stage leaves weights alone
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen[epoch] = kernel_norms(student)

    restore = RestoreKernelNorms(at_stage="task", start_epoch=start_epoch, verbose=0)
    x, y = data(n=32)
    distiller.fit(x, y, batch_size=16, epochs=2, verbose=0,
                  callbacks=[StageSchedule({0: "fsp", 1: "task"}, verbose=0), restore, Probe()])
    assert max(seen[0][k] / initial[k] for k in initial) == pytest.approx(1.0)
    assert restore.factors is not None and min(restore.factors.values()) < 0.99  # stage 1 grew them
    for k, norm in seen[1].items():
        assert norm == pytest.approx(initial[k], rel=1e-5)


def test_fsp_recipes_restore_norms_by_default():
    for maker in (recipes.fsp_paper, recipes.dense_fsp):
        default = maker(*small_pair(), steps_per_epoch=100)
        assert [type(c).__name__ for c in default.callbacks] == ["StageSchedule", "RestoreKernelNorms"]
        task_start = max(default.schedule)
        assert default.schedule[task_start].name == "task"
        assert default.callbacks[1].start_epoch == task_start  # also when fit resumes there
        paper = maker(*small_pair(), steps_per_epoch=100, restore_kernel_norms=False)
        assert [type(c).__name__ for c in paper.callbacks] == ["StageSchedule"]
