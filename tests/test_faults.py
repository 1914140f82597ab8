"""Fault injection: no fault loses work or ends in a traceback.

Damaged checkpoints (each file, each kind of damage), a full disk, unwritable
and vanished run folders, kills (at random moments, inside a checkpoint's
write, inside a stale checkpoint's deletion), bad data, NaN stops and the
Python API's mistakes. Each case checks the exit code and the one-line
message, and where the run can continue, that it ends with exactly the
weights of an uninterrupted run.

Three levels: `ResumableRun` on a tiny model (fast); the `keras-fsp` command
in this process (`cli.run`) on tiny digits runs; and the command in
subprocesses (`tests/fault_worker.py`) for kills and the full disk (a tmpfs,
which needs root: skipped otherwise). Run alone with
`python -m pytest -q tests/test_faults.py`.
"""

import contextlib
import json
import zipfile
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")  # the digits data set of the keras-fsp runs

from keras_fsp import FSPDistiller, Stage  # noqa: E402
from keras_fsp.apps import cli  # noqa: E402
from keras_fsp.training import checkpoints, files, run_folder  # noqa: E402
from tests.helpers import checkpoints_of as _checkpoints  # noqa: E402
from tests.helpers import start_fault_worker  # noqa: E402
from tests.helpers import h5_contents  # noqa: E402
from keras_fsp.callbacks import StageSchedule  # noqa: E402
from keras_fsp.papers import cifar_resnet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The keras-fsp command's faults are backend-independent (files, folders,
# processes): they run in the TensorFlow suite, as tests/test_cli.py does;
# checkpoints and preflight run on both backends.
command = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                             reason="the keras-fsp command's faults run in the TensorFlow suite")


# ------------------------------------------------------------------ helpers


def _values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def _h5_arrays(path):
    return {name: value for name, (value, _) in h5_contents(path).items() if value is not None}


def _assert_same_weights(path, reference):
    arrays = _h5_arrays(path)
    assert sorted(arrays) == sorted(reference)
    for key, value in reference.items():
        assert np.array_equal(arrays[key], value), key


def _overwrite_h5_data(path):
    """Overwrites 64 bytes inside the data of the largest dataset with NaNs:
    the file still opens and loads."""
    import h5py

    with h5py.File(path, "r") as f:
        sets = []
        f.visititems(lambda k, v: sets.append(v) if isinstance(v, h5py.Dataset) else None)
        offset = max(sets, key=lambda v: v.size).id.get_offset()
    data = bytearray(open(path, "rb").read())
    data[offset:offset + 64] = np.full(16, np.nan, "float32").tobytes()
    open(path, "wb").write(bytes(data))


def _garble(path, start=0, count=64):
    data = bytearray(open(path, "rb").read())
    data[start:start + count] = bytes(range(count))[: len(data[start:start + count])]
    open(path, "wb").write(bytes(data))


def _truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


# What each damage does to a checkpoint folder, and what the log then says.
DAMAGE = {
    "truncated weights": (lambda c: _truncate(os.path.join(c, checkpoints.WEIGHTS_FILE)),
                          "model.weights.h5 has"),
    "garbled weights": (lambda c: _garble(os.path.join(c, checkpoints.WEIGHTS_FILE)),
                        "model.weights.h5 does not match its sha256 checksum"),
    "empty weights": (lambda c: _truncate(os.path.join(c, checkpoints.WEIGHTS_FILE), 0),
                      "model.weights.h5 has 0 bytes"),
    "weights data overwritten": (lambda c: _overwrite_h5_data(os.path.join(c, checkpoints.WEIGHTS_FILE)),
                                 "model.weights.h5 does not match its sha256 checksum"),
    "truncated state": (lambda c: _truncate(os.path.join(c, checkpoints.STATE_FILE)), "state.npz has"),
    "garbled state": (lambda c: _garble(os.path.join(c, checkpoints.STATE_FILE), count=40),
                      "state.npz does not match its sha256 checksum"),
    "no manifest": (lambda c: os.remove(os.path.join(c, checkpoints.MANIFEST_FILE)),
                    "it has no manifest.json"),
}


@contextlib.contextmanager
def _tmpfs(path, size):
    """A tmpfs of `size` mounted at `path` (root only; skips otherwise)."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------- ResumableRun level


def _small_model(seed=0, rate=0.1):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(rate, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.ones((4, 3)), np.zeros(4), verbose=0)
    return model


def _two_checkpoints(folder):
    """Checkpoints of epochs 1 and 2; returns the run and the state saved at 1."""
    run = _checkpoints(folder, log=lambda m: None)
    os.makedirs(folder, exist_ok=True)
    model = _small_model()
    run.save(model, 1)
    first = _values(model.weights) + _values(model.optimizer.variables)
    model.fit(np.ones((4, 3)), np.ones(4), verbose=0)
    run.save(model, 2)
    return run, first


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tmp_path, damage):
    run, first = _two_checkpoints(tmp_path)
    newest = os.path.join(run.path, "epoch-000002")
    harm, why = DAMAGE[damage]
    harm(newest)
    assert checkpoints.verify_checkpoint(newest)[0] is None
    assert run.latest().epoch == 1
    lines = []
    fresh = _small_model(seed=1)
    assert _checkpoints(tmp_path, log=lines.append).restore(fresh) == 1
    for want, got in zip(first, _values(fresh.weights) + _values(fresh.optimizer.variables)):
        assert np.array_equal(want, got)
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint epoch-000002 skipped: {why}"), lines
    assert lines[0].endswith("trying the one before")


def test_a_damaged_latest_pointer_is_not_needed(tmp_path):
    run, _ = _two_checkpoints(tmp_path)
    for pointer in (b"\xff\xfe\x00bad", b"epoch-000009\n", b""):
        (tmp_path / "checkpoints" / "latest").write_bytes(pointer)
        assert run.latest().epoch == 2
        assert run.restore(_small_model(seed=1)) == 2
    os.remove(tmp_path / "checkpoints" / "latest")
    assert run.latest().epoch == 2


def test_the_default_log_of_a_skipped_checkpoint_is_a_warning(tmp_path):
    run, _ = _two_checkpoints(tmp_path)
    _truncate(os.path.join(run.path, "epoch-000002", checkpoints.STATE_FILE))
    with pytest.warns(UserWarning, match="checkpoint epoch-000002 skipped: state.npz has"):
        assert _checkpoints(tmp_path).restore(_small_model(seed=1)) == 1


def test_a_checkpoint_without_manifest_from_format_1_still_loads(tmp_path):
    run, _ = _two_checkpoints(tmp_path)
    newest = os.path.join(run.path, "epoch-000002")
    os.remove(os.path.join(newest, checkpoints.MANIFEST_FILE))
    info = json.loads(open(os.path.join(newest, checkpoints.INFO_FILE)).read())
    open(os.path.join(newest, checkpoints.INFO_FILE), "w").write(json.dumps({**info, "format": 1}))
    assert run.latest().epoch == 2  # unverifiable, but complete
    _truncate(os.path.join(newest, checkpoints.WEIGHTS_FILE))  # damaged: found when loading
    lines = []
    assert _checkpoints(tmp_path, log=lines.append).restore(_small_model(seed=1)) == 1
    assert "epoch-000002 skipped: it does not load (" in lines[0]


def test_a_full_disk_writes_nothing_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run, _ = _two_checkpoints(tmp_path)
    before = sorted(os.listdir(run.path))
    model = _small_model()
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: free)
    with pytest.raises(OSError, match=r"No space left on device: checkpoint epoch-000003 needs "
                                      r"0\.0 MB, 0\.0 MB free") as error:
        run.save(model, 3)
    assert error.value.errno == 28
    monkeypatch.undo()
    assert sorted(os.listdir(run.path)) == before

    # The disk fills up halfway through the write: the partial folder goes.
    def write_half(path, data):
        with open(path, "xb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(checkpoints, "write_new", write_half)
    with pytest.raises(OSError, match="No space left"):
        run.save(model, 3)
    assert sorted(os.listdir(run.path)) == before
    assert run.latest().epoch == 2


def test_a_checkpoint_is_read_back_and_verified_after_writing(tmp_path, monkeypatch):
    run, _ = _two_checkpoints(tmp_path)
    write = checkpoints.write_new

    def write_damaged(path, data):  # what a failing disk might do
        write(path, data[:-1] + b"!" if path.endswith(checkpoints.STATE_FILE) else data)

    monkeypatch.setattr(checkpoints, "write_new", write_damaged)
    with pytest.raises(OSError, match="checkpoint epoch-000003 read back damaged: state.npz "
                                      "does not match its sha256 checksum"):
        run.save(_small_model(), 3)
    assert sorted(os.listdir(run.path)) == ["epoch-000001", "epoch-000002", "latest"]


def test_a_vanished_run_folder_is_an_error_not_created_again(tmp_path):
    run, _ = _two_checkpoints(tmp_path / "run")
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        run.save(_small_model(), 3)
    assert not (tmp_path / "run").exists()


def test_a_kill_inside_a_deletion_leaves_nothing_after_the_next_start(tmp_path, monkeypatch):
    run, _ = _two_checkpoints(tmp_path)
    rmtree = shutil.rmtree

    def killed_halfway(path, *args, **kwargs):
        os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        run.save(_small_model(), 3)  # keep=2: deletes epoch 1
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert _checkpoints(tmp_path).restore(_small_model(seed=1)) == 3
    assert sorted(os.listdir(run.path)) == ["epoch-000002", "epoch-000003", "latest"]


def test_leftovers_of_killed_writes_are_deleted_at_the_next_start(tmp_path):
    run, _ = _two_checkpoints(tmp_path)
    for name in (".tmp-epoch-000003-abc", ".tmp-old-epoch-000001-def"):
        os.mkdir(os.path.join(run.path, name))
        open(os.path.join(run.path, name, checkpoints.WEIGHTS_FILE), "wb").write(b"half")
    open(os.path.join(run.path, ".tmp-xyz"), "w").write("epoch-0000")
    assert run.restore(_small_model(seed=1)) == 2
    assert sorted(os.listdir(run.path)) == ["epoch-000001", "epoch-000002", "latest"]


def test_damaged_checkpoints_older_than_a_new_one_are_pruned(tmp_path):
    run, _ = _two_checkpoints(tmp_path)
    run.keep = 1
    _truncate(os.path.join(run.path, "epoch-000001", checkpoints.STATE_FILE))
    os.mkdir(os.path.join(run.path, "epoch-000000"))  # half-deleted, old code
    run.save(_small_model(), 3)
    assert sorted(os.listdir(run.path)) == ["epoch-000003", "latest"]


def test_the_learning_rate_is_the_optimizers_own_not_the_checkpoints(tmp_path):
    run = _checkpoints(tmp_path)
    model = _small_model(rate=0.1)
    run.save(model, 1)
    fresh = _small_model(seed=1, rate=0.01)
    assert run.restore(fresh) == 1
    assert float(keras.ops.convert_to_numpy(fresh.optimizer.learning_rate)) == pytest.approx(0.01)
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables):
        if "learning_rate" not in a.path:  # step count and momentum are restored
            assert np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


# ------------------------------------------------------------ Python API

SHAPE = (8, 8, 3)


def _pair(teacher_shape=SHAPE, student_shape=SHAPE, teacher_classes=10, student_classes=10):
    keras.utils.set_random_seed(0)
    return (cifar_resnet(8, input_shape=teacher_shape, num_classes=teacher_classes, name="teacher"),
            cifar_resnet(8, input_shape=student_shape, num_classes=student_classes, name="student"))


def _xy(n=16, classes=10):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n,) + SHAPE).astype("float32"), (np.arange(n) % classes).astype("int32")


def test_teacher_and_student_with_other_input_shapes_are_refused_at_construction():
    teacher, student = _pair(teacher_shape=(16, 16, 3))
    with pytest.raises(ValueError, match=r"The teacher takes inputs of shape \(16, 16, 3\) and "
                                         r"the student \(8, 8, 3\)"):
        FSPDistiller(teacher, student, stage="task")


def test_other_class_counts_are_refused_before_any_training():
    # A task -> kd schedule: the kd stage would fail only at the switch.
    teacher, student = _pair(student_classes=5)
    distiller = FSPDistiller(teacher, student, stage="task")
    distiller.compile(optimizer=keras.optimizers.SGD(0.01))
    before = _values(student.weights)
    x, y = _xy(classes=5)
    with pytest.raises(ValueError, match=r"Stage 'kd' uses the 'kd' term: the 'kd' term compares "
                                         r"the networks' logits class by class, but the teacher "
                                         r"has 10 classes and the student 5"):
        distiller.fit(x, y, epochs=2, batch_size=8, verbose=0,
                      callbacks=[StageSchedule({0: "fsp", 1: "kd"}, verbose=0)])
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(student.weights)))
    # A stage of its own naming the term: refused at construction.
    with pytest.raises(ValueError, match="the teacher has 10 classes and the student 5"):
        FSPDistiller(teacher, student, stages={"dkd": Stage("dkd", {"dkd": 1.0, "task": 1.0})})


def test_same_model_and_shared_optimizers_are_refused_at_construction():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="same model object"):
        FSPDistiller(teacher, teacher)
    shared = keras.optimizers.SGD(0.1)
    with pytest.raises(ValueError, match="share one optimizer instance"):
        FSPDistiller(teacher, student, stages={"a": Stage("a", {"task": 1.0}, optimizer=shared),
                                               "b": Stage("b", {"kd": 1.0}, optimizer=shared)})
    # Stages known only to a schedule: refused when fit starts.
    distiller = FSPDistiller(teacher, student, stage="task")
    distiller.compile(optimizer=keras.optimizers.SGD(0.01))
    schedule = StageSchedule({0: Stage("a", {"task": 1.0}, optimizer=shared),
                              1: Stage("b", {"kd": 1.0}, optimizer=shared)}, verbose=0)
    with pytest.raises(ValueError, match="Stages 'a' and 'b' share one optimizer instance"):
        distiller.fit(*_xy(), epochs=2, batch_size=8, verbose=0, callbacks=[schedule])


@pytest.mark.parametrize("case", ["nan x", "inf x", "label 10", "negative label", "nan validation x",
                                  "validation label 12"])
def test_bad_arrays_are_refused_before_any_training(case):
    teacher, student = _pair()
    distiller = FSPDistiller(teacher, student, stage="kd")
    distiller.compile(optimizer=keras.optimizers.SGD(0.01))
    x, y = _xy()
    xv, yv = x.copy(), y.copy()
    expected = {
        "nan x": ("x holds NaN or inf values in 1 example(s), the first at index 3", (x, 3, np.nan)),
        "inf x": ("x holds NaN or inf values in 1 example(s), the first at index 3", (x, 3, np.inf)),
        "label 10": ("y has label 10 at index 5 (1 label(s) outside the model's 10 classes, 0 to 9)",
                     (y, 5, 10)),
        "negative label": ("y has label -1 at index 5", (y, 5, -1)),
        "nan validation x": ("validation x holds NaN", (xv, 0, np.nan)),
        "validation label 12": ("validation y has label 12", (yv, 0, 12)),
    }
    message, (array, index, value) = expected[case]
    array[index] = value
    before = _values(student.weights)
    with pytest.raises(ValueError, match=re.escape(message)):
        distiller.fit(x, y, epochs=1, batch_size=8, verbose=0, validation_data=(xv, yv))
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(student.weights)))


# ---------------------------------------------------------------- keras-fsp


# As tests/test_cli.py: digits, 3 steps of 432 an epoch; the FSP recipe is 1
# epoch of FSP, then 2 of the task.
TINY = ["--dataset=digits", "--teacher_depth=8", "--student_depth=8", "--batch_size=432",
        "--schedule_scale=0.0001", "--verbose=0"]


def _run(*args):
    return cli.run(["keras-fsp", *args])


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def distill(runs_dir):
    """The arguments of a distill run (but --model_dir) and the weights of the
    same run uninterrupted."""
    teacher = runs_dir / "teacher"
    _run("train-teacher", *TINY, f"--model_dir={teacher}")
    args = ["distill", "--method=fsp", *TINY, f"--teacher={teacher}"]
    _run(*args, f"--model_dir={runs_dir / 'reference'}")
    return args, _h5_arrays(runs_dir / "reference" / "student.weights.h5")


@pytest.fixture(scope="module")
def prefix(runs_dir, distill):
    """A run stopped after 2 of its 3 epochs (checkpoints of epochs 1 and 2)."""
    args, _ = distill
    _run(*args, "--epochs=2", f"--model_dir={runs_dir / 'prefix'}")
    return runs_dir / "prefix"


def _copy(prefix, folder):
    shutil.copytree(prefix, folder)
    return folder


# One damage of each file: the checkpoint reader skips all of DAMAGE the same
# way (test_a_damaged_checkpoint_is_skipped_for_the_one_before); here the
# command line resumes past it.
@pytest.mark.large
@pytest.mark.parametrize("damage", ["garbled weights", "truncated state", "no manifest"])
@command
def test_cli_resumes_from_the_newest_intact_checkpoint(distill, prefix, tmp_path, damage):
    args, reference = distill
    run_dir = _copy(prefix, tmp_path / "run")
    harm, why = DAMAGE[damage]
    harm(run_dir / "checkpoints" / "epoch-000002")
    result = _run(*args, f"--model_dir={run_dir}")
    assert result["initial_epoch"] == 1 and result["complete"]
    assert f"checkpoint epoch-000002 skipped: {why}" in (run_dir / "log.txt").read_text()
    _assert_same_weights(run_dir / "student.weights.h5", reference)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-000002", "epoch-000003", "latest"]


@pytest.mark.large
@command
def test_cli_ignores_a_non_utf8_latest_pointer_even_with_overwrite(distill, prefix, tmp_path):
    args, reference = distill
    run_dir = _copy(prefix, tmp_path / "run")
    (run_dir / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00bad")
    result = _run(*args, f"--model_dir={run_dir}")
    assert result["initial_epoch"] == 2 and result["complete"]
    _assert_same_weights(run_dir / "student.weights.h5", reference)

    run_dir = _copy(prefix, tmp_path / "again")
    (run_dir / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00bad")
    result = _run(*args, "--epochs=1", "--overwrite", f"--model_dir={run_dir}")
    assert result["initial_epoch"] == 0 and result["epochs_done"] == 1


@pytest.mark.large
@command
def test_val_loss_of_a_resumed_run_equals_the_uninterrupted_one(distill, runs_dir, tmp_path):
    # Stopped in the FSP stage, resumed across the switch to the task stage:
    # the test function is rebuilt at the switch, as in the uninterrupted run.
    args, reference = distill
    _run(*args, "--epochs=1", f"--model_dir={tmp_path}")
    _run(*args, f"--model_dir={tmp_path}")
    rows = [r.split(",") for r in (tmp_path / "metrics.csv").read_text().splitlines()]
    ref = [r.split(",") for r in (runs_dir / "reference" / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("val_loss")
    assert rows[0] == ref[0] and len(rows) == len(ref) == 4
    assert [r[column] for r in rows[1:]] == [r[column] for r in ref[1:]]
    assert all(r[column] for r in rows[1:])
    _assert_same_weights(tmp_path / "student.weights.h5", reference)


def _npz(folder, case):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.random((40, 8, 8, 1), dtype=np.float32), rng.random((12, 8, 8, 1), dtype=np.float32)
    y_train, y_test = np.arange(40) % 3, np.arange(12) % 3
    if case == "nan in x_train":
        x_train[5, 1, 1, 0] = np.nan
    elif case == "inf in x_train":
        x_train[5, 1, 1, 0] = np.inf
    elif case == "nan in x_test":
        x_test[7, 2, 2, 0] = np.nan
    elif case == "label 200":
        y_train[3] = 200
    elif case == "test-only label":
        y_test[4] = 3
    elif case == "single class":
        y_train[:], y_test[:] = 0, 0
    elif case == "label 10^9":
        y_train[3] = 10**9
    elif case == "label 3*10^9":
        y_train = y_train.astype("int64")
        y_train[3] = 3 * 10**9
    elif case == "empty training split":
        x_train, y_train = x_train[:0], y_train[:0]
    path = folder / f"{case.replace(' ', '_')}.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


BAD_DATA = {
    "nan in x_train": "x_train holds NaN or inf values in 1 example(s), the first at index 5: "
                      "every loss would be NaN; remove or repair those examples.",
    "inf in x_train": "x_train holds NaN or inf values in 1 example(s), the first at index 5: "
                      "every loss would be NaN; remove or repair those examples.",
    "nan in x_test": "x_test holds NaN or inf values in 1 example(s), the first at index 7: "
                     "every loss would be NaN; remove or repair those examples.",
    "label 200": "y_train's labels go up to 200 but 197 below it have no example (e.g. 3): "
                 "number the classes 0 to K-1, or give class_names.",
    "test-only label": "y_test has label(s) 3 that no training example has: the test labels must "
                       "be among the training labels.",
    "single class": "y_train holds a single class (0): a classifier needs at least 2.",
    # Checked in the labels' own dtype, before anything is made from them.
    "label 10^9": "y_train's labels go up to 1000000000 but 999999997 below it have no example "
                  "(e.g. 3): number the classes 0 to K-1, or give class_names.",
    "label 3*10^9": "y_train has label 3000000000 at index 3: number the classes 0 to K-1.",
    "empty training split": "the train split is empty: it needs at least one image.",
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
@command
def test_cli_refuses_bad_data_before_training(tmp_path, case, capsys):
    path = _npz(tmp_path, case)
    argv = ["keras-fsp", "train-teacher", f"--dataset=npz:{path}", "--teacher_depth=8",
            "--batch_size=16", "--schedule_scale=0.00003", "--verbose=0",
            f"--model_dir={tmp_path / 'run'}"]
    with pytest.raises(cli.CLIError) as error:
        cli.run(argv)
    assert error.value.code == 2
    assert error.value.message.startswith(f"--dataset npz:{path}: ")
    assert error.value.message.endswith(BAD_DATA[case])
    assert not (tmp_path / "run").exists()
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"keras-fsp: error: {error.value.message}\n"


@command
def test_cli_refuses_an_infinite_learning_rate_scale(tmp_path):
    with pytest.raises(cli.CLIError, match=r"--learning_rate_scale must be a finite number; got inf"):
        _run("train-teacher", *TINY, "--learning_rate_scale=inf", f"--model_dir={tmp_path}")


def _read_only_dir(tmp_path):
    """A folder this process cannot write: a read-only tmpfs for root (who
    ignores permissions), permissions otherwise."""
    folder = tmp_path / "ro"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        return contextlib.nullcontext(folder)
    return _tmpfs(folder, "1m,ro")


@command
def test_cli_refuses_an_unwritable_model_dir_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    cases = [(tmp_path / "file" / "run", "Not a directory"),
             (tmp_path / "file", "is a file")]
    with _read_only_dir(tmp_path) as folder:
        cases += [(folder / "run", ("Read-only file system", "Permission denied"))]
        cases += [(folder, ("Read-only file system", "Permission denied"))]
        for model_dir, why in cases:
            argv = ["keras-fsp", "train-teacher", *TINY, f"--model_dir={model_dir}"]
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("keras-fsp: error: ") and err.count("\n") == 1, err
            assert any(w in err for w in ((why,) if isinstance(why, str) else why)), err
            if why != "is a file":
                assert f"make {model_dir} writable" in err or "is not a folder" in err, err


@pytest.mark.large
@command
def test_cli_stops_with_one_line_when_the_model_dir_vanishes(distill, tmp_path, monkeypatch):
    args, _ = distill
    run_dir = tmp_path / "run"
    save = checkpoints.Checkpoints.save

    def vanish_then_save(self, model, epoch, *a, **k):
        if epoch == 2:
            shutil.rmtree(run_dir)
        return save(self, model, epoch, *a, **k)

    monkeypatch.setattr(checkpoints.Checkpoints, "save", vanish_then_save)
    with pytest.raises(cli.CLIError) as error:
        _run(*args, f"--model_dir={run_dir}")
    assert error.value.code == 1
    assert error.value.message == (
        f"cannot write {run_dir}/checkpoints: No such file or directory; {run_dir} vanished or a "
        "part of its path is not a folder: restore it or choose another --model_dir; no "
        "checkpoint is kept")
    assert not run_dir.exists()


@pytest.mark.large
@command
def test_cli_nan_stop_gives_a_command_that_continues_at_a_lower_learning_rate(
        distill, prefix, tmp_path, capsys):
    args, _ = distill
    run_dir = _copy(prefix, tmp_path / "run")
    # Continuing with a million times the learning rate: the last update of
    # epoch 3 makes the network's outputs NaN.
    with pytest.raises(cli.CLIError) as error:
        _run(*args, f"--model_dir={run_dir}", "--learning_rate_scale=1e6")
    message = error.value.message
    assert error.value.code == 1 and "\n" not in message
    assert message.startswith("val_loss became nan in stage 'task' at the end of epoch 3; ")
    assert (f"; the last good checkpoint (epoch 2) is kept in {run_dir}/checkpoints/epoch-000002; "
            "to go on at a tenth of the learning rate, run `") in message
    command = message.split("`")[1]
    assert command == " ".join(["keras-fsp", *args, f"--model_dir={run_dir}",
                                "--learning_rate_scale=100000"])

    # Following the advice works: each command resumes at epoch 2, and one
    # that is low enough completes the run.
    scale = 1e5
    for _ in range(6):
        try:
            result = cli.run(shlex.split(command))
            break
        except cli.CLIError as e:
            assert "(epoch 2) is kept" in e.message, e.message
            command = e.message.split("`")[1]
            scale /= 10
            assert command.endswith(f"--learning_rate_scale={scale:g}"), command
    else:
        pytest.fail("six tenfold reductions of the learning rate did not complete the run")
    assert result["initial_epoch"] == 2 and result["complete"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["learning_rate_scale"] == scale
    assert config["history"] == [{"from_epoch": 0, "learning_rate_scale": 1.0},
                                 {"from_epoch": 2, "learning_rate_scale": scale}]
    log = (run_dir / "log.txt").read_text()
    assert "--learning_rate_scale 1.0 -> 1000000.0 from epoch 2" in log
    assert (f"--learning_rate_scale 1.0 -> {float(scale)!r} from epoch 2; config.json's history"
            in log)


@pytest.mark.large
@command
def test_cli_overwrite_moves_the_earlier_run_aside_and_says_so(distill, prefix, tmp_path, capsys):
    args, _ = distill
    run_dir = _copy(prefix, tmp_path / "run")
    kept = _h5_arrays(run_dir / "checkpoints" / "epoch-000002" / checkpoints.WEIGHTS_FILE)
    result = _run(*args, "--epochs=1", "--overwrite", f"--model_dir={run_dir}")
    assert result["initial_epoch"] == 0 and result["epochs_done"] == 1
    aside = run_dir / run_folder.OVERWRITTEN / "1"
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("--overwrite: the earlier run ("))
    moved = line[len("--overwrite: the earlier run ("):line.index(")")].split(", ")
    assert {"config.json", "log.txt", "metrics.csv", "checkpoints"} <= set(moved), line
    assert f") moved to {aside}; delete it" in line
    assert sorted(os.listdir(aside)) == sorted(moved)
    _assert_same_weights(aside / "checkpoints" / "epoch-000002" / checkpoints.WEIGHTS_FILE, kept)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-000001", "latest"]
    # Once more: the next earlier run goes into a folder of its own; nothing is deleted.
    _run(*args, "--epochs=1", "--overwrite", f"--model_dir={run_dir}")
    assert f"moved to {run_dir / run_folder.OVERWRITTEN / '2'};" in capsys.readouterr().out
    _assert_same_weights(aside / "checkpoints" / "epoch-000002" / checkpoints.WEIGHTS_FILE, kept)
    assert sorted(os.listdir(run_dir / run_folder.OVERWRITTEN)) == ["1", "2"]


# ---------------------------------------------------------- subprocesses


def _command(*args, fault="", stop_after=None):
    """Runs `keras-fsp args` in a subprocess, killed after `stop_after`
    seconds if given; returns (exit code, stderr)."""
    process = start_fault_worker(*args, fault=fault)
    try:
        _, err = process.communicate(timeout=stop_after or 300)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
    return process.returncode, err


def _error_lines(err):
    """stderr without TensorFlow's and absl's start-up chatter."""
    return [line for line in err.splitlines()
            if line.strip() and not line.startswith(("WARNING: All log messages", "I0000", "W0000",
                                                      "E0000"))]


@pytest.mark.large
@command
def test_a_full_disk_ends_with_one_line_and_the_run_continues_once_freed(distill, prefix, tmp_path):
    args, reference = distill
    with _tmpfs(tmp_path / "disk", "64m") as disk:
        run_dir = disk / "run"
        # Another program fills the disk once checkpoint 2 is written.
        code, err = _command(*args, f"--model_dir={run_dir}", fault=f"fill:2:{disk / 'junk'}")
        lines = _error_lines(err)
        assert code == 1, err  # not 139 (segmentation fault)
        assert "Traceback" not in err and len(lines) == 1, err
        # (the epoch's metrics.csv or its checkpoint, whichever is written first)
        assert lines[0].startswith(f"keras-fsp: error: cannot write {run_dir}")
        assert ": No space left on device: " in lines[0] and " needs " in lines[0]
        assert lines[0].endswith(
            f"free space on that disk, or move {run_dir} to a larger one and pass its new "
            f"--model_dir; the last good checkpoint (epoch 2) is kept in {run_dir}/checkpoints/"
            "epoch-000002: then run the same command again to continue")
        assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-000001", "epoch-000002", "latest"]
        os.remove(disk / "junk")  # freed
        code, err = _command(*args, f"--model_dir={run_dir}")
        assert code == 0, err
        _assert_same_weights(run_dir / "student.weights.h5", reference)


@pytest.mark.large
@command
def test_kills_inside_saves_and_deletions_lose_nothing(distill, tmp_path):
    args, reference = distill
    run_dir = tmp_path / "run"
    command = [*args, f"--model_dir={run_dir}"]
    # Killed halfway through the weights of epoch 2's checkpoint: a
    # temporary folder is left, epoch 1 is intact.
    code, err = _command(*command, fault="write:5")
    assert code == -signal.SIGKILL, err
    names = sorted(os.listdir(run_dir / "checkpoints"))
    assert names[0].startswith(".tmp-epoch-000002-") and names[1:] == ["epoch-000001", "latest"]
    # Killed while epoch 1, stale once epoch 3 is written, is being deleted.
    code, err = _command(*command, fault="discard")
    assert code == -signal.SIGKILL, err
    # The next start deletes what was left half done, and ends as the
    # uninterrupted run.
    result = _run(*command)
    assert result["initial_epoch"] == 3 and result["complete"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch-000002", "epoch-000003", "latest"]
    _assert_same_weights(run_dir / "student.weights.h5", reference)


@pytest.mark.large
@command
def test_kills_at_random_moments_lose_nothing(distill, tmp_path):
    args, reference = distill
    run_dir = tmp_path / "run"
    command = [*args, f"--model_dir={run_dir}"]
    started = time.monotonic()
    code, err = _command(*command, "--epochs=1")  # how long the start-up and an epoch take
    assert code == 0, err
    epoch = time.monotonic() - started
    shutil.rmtree(run_dir)
    rng = random.Random(0)
    for _ in range(3):
        code, err = _command(*command, stop_after=rng.uniform(0.6, 1.2) * epoch)
        assert code in (0, -signal.SIGKILL), err
    code, err = _command(*command)
    assert code == 0, err
    assert not [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".tmp-")]
    _assert_same_weights(run_dir / "student.weights.h5", reference)


# ----------------------------------------------------- reliability, round two


def _holder(run_dir):
    """A process holding `run_dir`'s lock (tests/fault_worker.py), started."""
    process = start_fault_worker(fault=f"hold_lock:{run_dir}", stdout=subprocess.PIPE,
                      stderr=subprocess.DEVNULL)
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.mark.large
@command
def test_one_run_per_folder_a_second_process_is_refused_naming_the_first(distill, tmp_path):
    args, reference = distill
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        for extra in ([], ["--learning_rate_scale=0.5"], ["--overwrite"]):
            with pytest.raises(cli.CLIError, match=(
                    rf"^--model_dir {run_dir} is in use by process {holder.pid} on .* \(a test "
                    r"holding the lock, since .*\): wait for it to end, or choose another folder$")):
                _run(*args, *extra, f"--model_dir={run_dir}")
        assert sorted(os.listdir(run_dir)) == [run_folder.LOCK]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock: nothing blocks the run.
    result = _run(*args, f"--model_dir={run_dir}")
    assert result["complete"]
    _assert_same_weights(run_dir / "student.weights.h5", reference)


def _teacher_file(runs_dir, folder, change):
    model = keras.saving.load_model(runs_dir / "teacher" / "teacher.keras", compile=False)
    model.set_weights([change(w) for w in model.get_weights()])
    path = folder / "changed.keras"
    model.save(path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda w: np.where(np.arange(w.size).reshape(w.shape) == 0, np.nan, w) if w.ndim == 4 else w,
     r"weight .* is NaN or infinite; the file is damaged: train the teacher again or pass another "
     r"--teacher\.$"),
    (lambda w: np.full_like(w, 1e30),
     r"gives NaN or infinite outputs on training images: its weights are broken \(too large\?\); "
     r"train it again or pass another --teacher\.$"),
    (lambda w: np.zeros_like(w),
     r"scores \d+\.\d% on 512 training images, no better than chance \(10\.0%\): it has nothing "
     r"to teach; pass --allow_weak_teacher to distil from it anyway\.$"),
], ids=["nan weight", "weights 1e30", "at chance"])
@command
def test_a_broken_teacher_is_refused_before_it_teaches(distill, runs_dir, tmp_path, change, message):
    args, _ = distill
    teacher = _teacher_file(runs_dir, tmp_path, change)
    with pytest.raises(cli.CLIError, match=rf"^--teacher {teacher} {message}" if "weight" not in
                       message[:8] else rf"^--teacher {teacher}: {message}") as error:
        _run(*args, f"--teacher={teacher}", f"--model_dir={tmp_path / 'run'}")
    assert error.value.code == 2 and not (tmp_path / "run").exists()


@pytest.mark.large
@command
def test_a_weak_teacher_teaches_when_asked_to(distill, runs_dir, tmp_path):
    args, _ = distill
    teacher = _teacher_file(runs_dir, tmp_path, np.zeros_like)
    result = _run(*args, f"--teacher={teacher}", "--allow_weak_teacher", "--epochs=1",
                  f"--model_dir={tmp_path / 'run'}")
    assert result["epochs_done"] == 1
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "no better than chance (10.0%) (--allow_weak_teacher)" in log


@pytest.mark.parametrize("free", [32 * 1024, 200 * 1024])
@command
def test_too_little_space_at_the_start_is_one_line_for_every_subcommand(distill, runs_dir, tmp_path,
                                                                       monkeypatch, capsys, free):
    args, _ = distill
    usage = shutil.disk_usage(tmp_path)._replace(free=free)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage)
    model = runs_dir / "reference"
    for name, argv in {"distill": [*args, f"--model_dir={tmp_path / 'd'}"],
                       "evaluate": ["evaluate", f"--model={model}", f"--model_dir={tmp_path / 'e'}"],
                       "export": ["export", f"--model={model}", f"--model_dir={tmp_path / 'x'}",
                                  "--formats=keras,saved_model"]}.items():
        if name == "evaluate" and free > 64 * 1024 + 4096:
            continue  # a few kB of result fit
        assert cli.main(["keras-fsp", *argv]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("keras-fsp: error: cannot write ") and err.count("\n") == 1, err
        assert "No space left on device: " in err and "MB free; free space on that disk" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("subcommand", ["distill", "evaluate"])
@command
def test_a_folder_of_the_users_own_files_is_never_written(distill, runs_dir, tmp_path, subcommand):
    args, _ = distill
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "metrics.csv").write_text("my,data\n1,2\n")
    (mine / "notes.txt").write_text("mine")
    before = _snapshot(mine)
    argv = ([*args] if subcommand == "distill"
            else ["evaluate", f"--model={runs_dir / 'reference'}"])
    with pytest.raises(cli.CLIError, match=(
            rf"^--model_dir {mine} holds files keras_fsp did not write \(config.json, notes.txt\): "
            r"it writes only into an empty folder or one of its own runs; choose another folder$")):
        _run(*argv, f"--model_dir={mine}")
    assert _snapshot(mine) == before


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.large
@command
def test_sigterm_keeps_the_checkpoint_says_one_line_and_the_run_resumes(distill, tmp_path):
    args, reference = distill
    run_dir = tmp_path / "run"
    command = [*args, f"--model_dir={run_dir}"]
    process = start_fault_worker(*command)
    checkpoints_dir = run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints_dir / "epoch-000001").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run ended before SIGTERM reached it")
    lines = _error_lines(err)
    assert process.returncode == 143, err
    assert len(lines) == 1 and lines[0].startswith("keras-fsp: error: terminated (SIGTERM); the last "
                                                   "checkpoint is epoch "), err
    assert lines[0].endswith(f"in {run_dir}: run the same command again to continue"), err
    assert "terminated (SIGTERM)" in (run_dir / "log.txt").read_text()
    result = _run(*command)
    assert result["complete"] and result["initial_epoch"] >= 1
    _assert_same_weights(run_dir / "student.weights.h5", reference)


@command
def test_an_export_interrupted_between_its_renames_is_put_back_at_the_next_start(distill, runs_dir,
                                                                                 tmp_path):
    out = tmp_path / "exported"
    model = runs_dir / "reference"
    _run("export", f"--model={model}", f"--model_dir={out}", "--formats=keras,saved_model")
    saved = _snapshot(out / "export")
    # What a kill between the two renames of a replacing export leaves: the
    # old SavedModel moved into the staging folder of a process now gone,
    # the new one never put in place; and a staging folder of a killed write.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    staging = out / f".tmp-export-{gone}-abc"
    staging.mkdir()
    (staging / "target").write_text("export")
    os.replace(out / "export", staging / ".replaced")
    (out / f".tmp-export-{gone}-def").mkdir()
    (out / f".tmp-export-{gone}-def" / "model.keras").write_bytes(b"")
    _run("export", f"--model={model}", f"--model_dir={out}", "--formats=keras")
    assert _snapshot(out / "export") == saved  # put back, then left alone
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


@pytest.mark.large
@command
def test_reproduce_fails_naming_the_runs_that_failed(tmp_path, capsys):
    argv = ["keras-fsp", "reproduce", "cifar10-resnet26-to-resnet8", "--methods=kd", "--seeds=0",
            f"--dataset=npz:{tmp_path / 'missing.npz'}", f"--runs_dir={tmp_path / 'runs'}",
            f"--results_dir={tmp_path / 'results'}"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("keras-fsp: error: reproduce cifar10-resnet26-to-resnet8: 1 run(s) failed: "
                          "teacher-seed0 (each run's process.log under ")
    summary = json.loads((tmp_path / "results" / "cifar10_resnet26_to_resnet8.json").read_text())
    assert summary["rows"]["kd"]["complete"] is False


def test_a_tampered_checkpoint_falls_back_to_the_one_before(tmp_path):
    run, first = _two_checkpoints(tmp_path)
    newest = os.path.join(run.path, "epoch-000002")
    # A pickled object array in state.npz, the manifest recomputed to match.
    import io as _io

    buffer = _io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(os.path.join(newest, checkpoints.STATE_FILE), "w") as z:
        z.writestr("optimizer/0.npy", buffer.getvalue())
    manifest = json.loads(open(os.path.join(newest, checkpoints.MANIFEST_FILE)).read())
    data = open(os.path.join(newest, checkpoints.STATE_FILE), "rb").read()
    manifest["files"][checkpoints.STATE_FILE] = {"size": len(data), "sha256": files.sha256(data)}
    open(os.path.join(newest, checkpoints.MANIFEST_FILE), "w").write(json.dumps(manifest))
    assert checkpoints.verify_checkpoint(newest)[0] is not None  # it verifies: tampered, not damaged
    lines = []
    fresh = _small_model(seed=1)
    assert _checkpoints(tmp_path, log=lines.append).restore(fresh) == 1
    for want, got in zip(first, _values(fresh.weights) + _values(fresh.optimizer.variables)):
        assert np.array_equal(want, got)
    assert len(lines) == 1 and "epoch-000002 skipped: it does not load (ValueError: Object arrays" in lines[0]


@pytest.mark.large
@command
def test_a_teacher_replaced_during_a_run_is_said_and_the_checkpoints_is_used(distill, runs_dir,
                                                                          tmp_path):
    args, reference = distill
    teacher = shutil.copytree(runs_dir / "teacher", tmp_path / "teacher")
    run_dir = tmp_path / "run"
    _run(*args, f"--teacher={teacher}", "--epochs=1", f"--model_dir={run_dir}")
    replaced = keras.saving.load_model(teacher / "teacher.keras", compile=False)
    replaced.set_weights([w * 1.01 for w in replaced.get_weights()])  # same shapes, other weights
    replaced.save(teacher / "teacher.keras")
    result = _run(*args, f"--teacher={teacher}", f"--model_dir={run_dir}")
    assert result["complete"] and result["initial_epoch"] == 1
    assert ("the teacher's weights come from the checkpoint: the teacher given differs from the one "
            "this run started with") in (run_dir / "log.txt").read_text()
    _assert_same_weights(run_dir / "student.weights.h5", reference)
