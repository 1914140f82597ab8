import json
import os

import keras
import numpy as np
import pytest

from keras_fsp import FSPDistiller, Stage
from keras_fsp import training
from keras_fsp.callbacks import NonFiniteLossError
from keras_fsp.training import RunFolder, checkpoints
from keras_fsp.training import callbacks as run_callbacks
from tests.helpers import checkpoints_of as _checkpoints
from keras_fsp.papers import recipes
from keras_fsp.augment import PadCropFlip
from keras_fsp.papers import cifar_resnet
from keras_fsp.stages import UP_TO_TAPS

SHAPE = (8, 8, 3)
N, BATCH, SEED = 32, 16, 3  # 2 steps per epoch


def _data(n=N):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n,) + SHAPE).astype("float32"), rng.integers(0, 10, n)


def _fsp_recipe(init_seed):
    """FSP paper recipe, tiny: 1 epoch of FSP, then 2 of the task, in-step
    augmentation. `init_seed` sets the initial weights (and the augmentation's
    seed): a resumed run must get everything from the checkpoint."""
    keras.utils.set_random_seed(init_seed)
    teacher = cifar_resnet(8, input_shape=SHAPE, name="teacher")
    student = cifar_resnet(8, input_shape=SHAPE, name="student")
    r = recipes.fsp_paper(teacher, student, steps_per_epoch=2, stage1_iterations=2,
                          stage2_iterations=4, augment=PadCropFlip(2, seed=init_seed))
    r.compile()
    return r


def _values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    x, y = _data()
    test = _data(8)
    fit = dict(batch_size=BATCH, seed=SEED, verbose=0)

    full = _fsp_recipe(0)
    assert full.epochs == 3 and {e: s.name for e, s in full.schedule.items()} == {0: "fsp", 1: "task"}
    training.train(full, (x, y), test, tmp_path / "full", **fit)

    # The same run stopped after epoch 1 (the FSP stage). Each later part
    # has new objects (a new process) with other initial weights (the
    # teacher's too) and another augmentation seed: all must come from the
    # checkpoint.
    run = RunFolder(tmp_path / "cut").checkpoints()
    part = _fsp_recipe(0)
    training.train(part, (x, y), test, tmp_path / "cut", epochs=1, **fit)
    assert (run.latest().epoch, run.latest().stage) == (1, "fsp")

    # Resumed in stage fsp, switched to task at once, and killed at the end
    # of epoch 3 while its checkpoint is written: the next part resumes from
    # epoch 2, with the task stage's SGD state (step count, momentum).
    save = checkpoints.Checkpoints.save

    def killed_at_epoch_3(self, model, epoch, logs=None):
        if epoch == 3:
            raise KeyboardInterrupt
        return save(self, model, epoch, logs)

    monkeypatch.setattr(checkpoints.Checkpoints, "save", killed_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        training.train(_fsp_recipe(2), (x, y), test, tmp_path / "cut", **fit)
    monkeypatch.undo()
    assert (run.latest().epoch, run.latest().stage) == (2, "task")
    assert sorted(os.listdir(run.path)) == ["epoch-000001", "epoch-000002", "latest"]

    resumed = _fsp_recipe(3)
    result = training.train(resumed, (x, y), test, tmp_path / "cut", **fit)
    assert result["initial_epoch"] == 2 and result["epochs_done"] == 3 and result["complete"]

    a, b = full.model, resumed.model
    assert len(b.student.weights) == 47 and len(a.variables) == len(b.variables)
    for name, va, vb in zip([v.path for v in a.variables], _values(a.variables), _values(b.variables)):
        assert np.array_equal(va, vb), name  # student, teacher, term weights, augmentation seed
    for va, vb in zip(_values(a.optimizer.variables), _values(b.optimizer.variables)):
        assert np.array_equal(va, vb)
    assert int(keras.ops.convert_to_numpy(b.optimizer.iterations)) == 4

    # Two checkpoints kept; the CSV has one row per epoch with its stage (the
    # row of the epoch killed before its checkpoint was replaced).
    assert sorted(os.listdir(run.path)) == ["epoch-000002", "epoch-000003", "latest"]
    lines = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert [r.split(",")[0] for r in lines[1:]] == ["0", "1", "2"]
    assert [r.split(",")[header.index("stage")] for r in lines[1:]] == ["fsp", "task", "task"]
    assert "task_loss" in header and "accuracy" in header
    assert result["history"]["stage"] == ["fsp", "task", "task"]

    # Everything done: running again trains nothing.
    again = _fsp_recipe(5)
    result = training.train(again, (x, y), test, tmp_path / "cut", **fit)
    assert result["initial_epoch"] == 3 and result["epochs_done"] == 3
    for va, vb in zip(_values(a.student.weights), _values(again.student.weights)):
        assert np.array_equal(va, vb)


def test_epoch_stream_depends_on_seed_and_epoch_only():
    x = np.arange(10, dtype="float32")[:, None]
    y = np.arange(10)
    whole, steps = training.epoch_stream(x, y, 4, seed=7, initial_epoch=0, epochs=3,
                                     drop_remainder=False)
    late, _ = training.epoch_stream(x, y, 4, seed=7, initial_epoch=2, epochs=3, drop_remainder=False)
    batches = [b[1].numpy().tolist() for b in whole]
    assert steps == 3 and len(batches) == 9
    assert [b[1].numpy().tolist() for b in late] == batches[6:]
    for e in range(3):
        assert sorted(sum(batches[3 * e: 3 * e + 3], [])) == list(range(10))
    assert batches[:3] != batches[3:6]  # reshuffled every epoch
    dropped, steps = training.epoch_stream(x, y, 4, seed=7, initial_epoch=0, epochs=3)
    assert steps == 2  # one batch shape: the step is traced once
    assert [b[1].numpy().tolist() for b in dropped] == [b for i, b in enumerate(batches) if i % 3 < 2]


def _small_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.ones((4, 3)), np.zeros(4), verbose=0)
    return model


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = _checkpoints(tmp_path, keep=1)
    model = _small_model()
    run.save(model, 1)
    good = _values(model.weights) + _values(model.optimizer.variables)
    model.fit(np.ones((4, 3)), np.ones(4), verbose=0)  # the weights move on

    def savez_then_die(*args, **kwargs):  # the weights file is written by now
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.np, "savez", savez_then_die)
    with pytest.raises(OSError, match="disk full"):
        run.save(model, 2)
    monkeypatch.undo()
    assert sorted(os.listdir(run.path)) == ["epoch-000001", "latest"]

    # A process killed mid-write leaves a temporary folder; a damaged folder
    # named like a checkpoint and a pointer to it must not be taken either.
    partial = tmp_path / "checkpoints" / ".tmp-epoch-000002-abc"
    partial.mkdir()
    (partial / checkpoints.WEIGHTS_FILE).write_bytes(b"half")
    damaged = tmp_path / "checkpoints" / "epoch-000003"
    damaged.mkdir()
    (damaged / checkpoints.WEIGHTS_FILE).write_bytes(b"half")
    (tmp_path / "checkpoints" / "latest").write_text("epoch-000003\n")
    assert run.latest().epoch == 1

    fresh = _small_model()
    fresh.fit(np.ones((4, 3)), np.full(4, 1), verbose=0)
    assert _checkpoints(tmp_path).restore(fresh) == 1
    for va, vb in zip(good, _values(fresh.weights) + _values(fresh.optimizer.variables)):
        assert np.array_equal(va, vb)
    assert not partial.exists()  # cleaned up by restore


class _Clock:
    """A monotonic clock that advances `step` seconds each time it is read."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            self.model.stop_training = True


@pytest.mark.parametrize("interval, stop, saved", [
    (0.0, None, [4, 5]),     # every epoch (keep=2 keeps the last two)
    (3600.0, None, [5]),     # only the last epoch of fit
    (3600.0, 3, [3]),        # a fit stopped early by a callback (a deadline)
    (2.5, None, [3, 5]),     # each read of the clock is 1 s: epochs 3 and 5
])
def test_checkpoints_at_a_least_interval_and_always_at_the_end(tmp_path, monkeypatch, interval,
                                                                stop, saved):
    monkeypatch.setattr(run_callbacks, "_clock", _Clock(1.0))
    run = _checkpoints(tmp_path)
    model = _small_model()
    callbacks = ([] if stop is None else [_StopAfter(stop)]) + [
        run_callbacks.CheckpointCallback(run, interval)]
    model.fit(np.ones((8, 3)), np.zeros(8), batch_size=4, epochs=5, verbose=0, callbacks=callbacks)
    assert [c.epoch for c in run.checkpoints()][-len(saved):] == saved
    if interval == 2.5:
        assert [c.epoch for c in run.checkpoints()] == [3, 5]
    # The last checkpoint holds the weights at the end of fit, not earlier ones.
    end = _values(model.weights) + _values(model.optimizer.variables)
    fresh = _small_model()
    assert run.restore(fresh) == saved[-1]
    for a, b in zip(end, _values(fresh.weights) + _values(fresh.optimizer.variables)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="min_interval_seconds must be >= 0"):
        run_callbacks.CheckpointCallback(run, -1.0)


def test_non_finite_weight_names_the_first_bad_student_weight_and_ignores_the_teacher():
    keras.utils.set_random_seed(0)
    distiller = FSPDistiller(cifar_resnet(8, input_shape=SHAPE, name="teacher"),
                             cifar_resnet(8, input_shape=SHAPE, name="student"), stage="kd")
    assert run_callbacks.non_finite_weight(distiller) is None
    teacher_kernel = distiller.teacher.weights[0]
    teacher_kernel.assign(np.full(teacher_kernel.shape, np.nan, "float32"))
    assert run_callbacks.non_finite_weight(distiller) is None  # frozen: never checked
    student = [v for v in distiller.student.weights if len(v.shape) == 4]
    first, later = student[2], student[5]
    values = keras.ops.convert_to_numpy(later)
    later.assign(np.where(np.arange(values.size).reshape(values.shape) == 7, np.inf, values))
    assert run_callbacks.non_finite_weight(distiller) == later.path
    first.assign(np.full(first.shape, np.nan, "float32"))
    assert run_callbacks.non_finite_weight(distiller) == first.path


def test_nan_guard_stops_with_the_term_and_stage_and_keeps_the_last_good_checkpoint(tmp_path):
    x, y = _data()
    keras.utils.set_random_seed(0)
    teacher = cifar_resnet(8, input_shape=SHAPE, name="teacher")
    student = cifar_resnet(8, input_shape=SHAPE, name="student")
    # A sane learning rate for epoch 1, an absurd one for the update of
    # epoch 2's first batch: the loss of its second batch is NaN.
    fsp = Stage("fsp", {"fsp": 1.0}, trainable=UP_TO_TAPS,
                optimizer=recipes.sgd((1e-3, 1e30), (1,)))
    distiller = FSPDistiller(teacher, student, stages={"fsp": fsp}, stage="fsp")
    run = _checkpoints(tmp_path)
    recipe = recipes.Recipe("fsp", distiller, {0: fsp}, 4, [], student)
    with pytest.raises(NonFiniteLossError) as error:
        training.train(recipe, (x, y), _data(8), tmp_path, batch_size=BATCH, seed=SEED, verbose=0)
    message = str(error.value)
    assert message.startswith("fsp_loss became ")
    assert "in stage 'fsp' at epoch 2, batch 2;" in message
    assert f"the last good checkpoint (epoch 1) is kept in {run.path}" in message
    assert "learning rate" in message
    assert sorted(os.listdir(run.path)) == ["epoch-000001", "latest"]
    info = json.loads((tmp_path / "checkpoints" / "epoch-000001" / "state.json").read_text())
    assert info["stage"] == "fsp" and np.isfinite(info["logs"]["fsp_loss"])
    fresh = FSPDistiller(cifar_resnet(8, input_shape=SHAPE, name="teacher"),
                         cifar_resnet(8, input_shape=SHAPE, name="student"),
                         stages={"fsp": Stage("fsp", {"fsp": 1.0}, trainable=UP_TO_TAPS,
                                              optimizer=recipes.sgd((1e-3, 1e30), (1,)))}, stage="fsp")
    fresh.compile()
    assert run.restore(fresh) == 1
    assert all(np.all(np.isfinite(v)) for v in _values(fresh.student.weights))


def test_compilation_cache_keeps_compiled_programs_for_the_next_process(tmp_path):
    if keras.backend.backend() != "jax":
        pytest.skip("JAX's persistent compilation cache")
    import subprocess
    import sys

    # A fresh process each time: JAX decides at its first compilation whether
    # the process uses a cache.
    script = (
        "import sys, jax, jax.numpy as jnp\n"
        "from keras_fsp.training import use_compilation_cache\n"
        "hits = []\n"
        "jax.monitoring.register_event_listener(\n"
        "    lambda event, **kw: hits.append(1) if event.endswith('cache_hits') else None)\n"
        "print(use_compilation_cache(sys.argv[1]))\n"
        "f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())\n"
        "print(float(f(jnp.ones((64, 64)))), 'loaded' if hits else 'compiled')\n"
        # a cache already configured (here, by the call above) is left as it is
        "print(use_compilation_cache('elsewhere') == use_compilation_cache('') == sys.argv[1])\n"
    )
    cache = tmp_path / "cache"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    runs = [subprocess.run([sys.executable, "-c", script, str(cache)], capture_output=True,
                           text=True, env=env, check=True).stdout.split() for _ in range(2)]
    value = str(float(64 * np.tanh(64.0) * 64))
    assert runs[0] == [str(cache), value, "compiled", "True"]  # and stored
    assert runs[1] == [str(cache), value, "loaded", "True"]
    assert os.listdir(cache)
