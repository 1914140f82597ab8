"""`keras-fsp reproduce`'s order of runs: with `compile_first`, the later
seeds of a method wait for its first run's first epoch (they load its
compiled programs then), while other methods start at once."""

import json
import os
import sys
import time

import keras
import pytest

from keras_fsp.apps import reproduce

# Backend-agnostic and made of processes: the TensorFlow suite covers it.
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="no Keras in it; run once")

# A stand-in for one training: it logs its start, writes its first epoch's
# row of metrics.csv after 0.6 s, then its result.
FAKE = """
import json, os, sys, time
run_dir, events = sys.argv[1], sys.argv[2]
def note(what):
    with open(events, "a") as f:
        f.write(json.dumps([what, os.path.basename(run_dir), time.time()]) + "\\n")
note("start")
time.sleep(0.6)
note("epoch")  # (before the row: a run that waits for the row starts after this note)
with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
    f.write("epoch,loss\\n1,0.5\\n")
time.sleep(0.2)
with open(os.path.join(run_dir, "metrics.json"), "w") as f:
    json.dump({"complete": True, "test_accuracy": 0.5}, f)
"""


def _runs(tmp_path):
    events = str(tmp_path / "events.jsonl")
    runs = []
    for method, seed in (("a", 0), ("a", 1), ("a", 2), ("b", 0)):
        run_dir = str(tmp_path / f"{method}-seed{seed}")
        runs.append(reproduce.Run(method, seed, [sys.executable, "-c", FAKE, run_dir, events],
                                  run_dir))
    return runs, events


def _events(path):
    with open(path) as f:
        return {(what, name): t for what, name, t in map(json.loads, f)}


@pytest.mark.parametrize("compile_first", [True, False])
def test_later_seeds_of_a_method_wait_for_its_first_epoch(tmp_path, compile_first):
    runs, events = _runs(tmp_path)
    codes = reproduce.execute(runs, parallel=4, log=lambda _: None, compile_first=compile_first)
    assert codes == {r.name: 0 for r in runs}
    t = _events(events)
    first_epoch = t["epoch", "a-seed0"]
    later = [t["start", "a-seed1"], t["start", "a-seed2"]]
    if compile_first:
        assert min(later) >= first_epoch  # they waited for it
        assert t["start", "b-seed0"] < first_epoch  # another method did not
    else:
        assert max(later) < first_epoch  # all four at once
    assert all(reproduce._complete(r.run_dir) for r in runs)


def test_a_first_run_that_fails_before_its_first_epoch_lets_the_next_seed_start(tmp_path):
    runs, events = _runs(tmp_path)
    runs[0].argv = [sys.executable, "-c", "import sys; sys.exit(3)"]
    started = time.time()
    codes = reproduce.execute(runs[:2], parallel=2, log=lambda _: None, compile_first=True)
    assert codes == {"a-seed0": 3, "a-seed1": 0}
    assert _events(events)["start", "a-seed1"] >= started
    assert not os.path.exists(os.path.join(runs[0].run_dir, "metrics.csv"))


def test_each_ended_run_is_one_line_that_says_whether_it_failed_stopped_or_completed(tmp_path):
    runs, _ = _runs(tmp_path)
    stopped = ("import json, os, sys; json.dump({'complete': False}, "
               "open(os.path.join(sys.argv[1], 'metrics.json'), 'w'))")
    runs[1].argv = [sys.executable, "-c", stopped, runs[1].run_dir]
    runs[2].argv = [sys.executable, "-c", "import sys; sys.exit(3)"]
    lines = []
    codes = reproduce.execute(runs[:3], parallel=3, log=lines.append)
    assert codes == {"a-seed0": 0, "a-seed1": 0, "a-seed2": 3}
    ended = sorted(line for line in lines if not line.endswith(": started"))
    assert ended == [
        "a-seed0: complete, test accuracy 0.5, None s",
        "a-seed1: stopped before its last epoch (--max_minutes); run the command again to resume it",
        "a-seed2: failed, exit 3 (its process.log says why)"]
