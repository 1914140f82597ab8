"""A training run's folder: every file in it is named here, and read or
written through `RunFolder`.

    runs/kd-seed0/
        config.json        the settings of the run (the command line's flags)
        log.txt            what the run said, with times
        metrics.csv        one row per epoch: every term's loss, the stage
        metrics.json       the result (test accuracy, history, files), once
        .parts.json        the training time of the parts before a resume
        checkpoints/       the latest intact epochs (`keras_fsp.training.checkpoints`)
        student.weights.h5 the trained network's weights, and
        student.keras      the network itself once the run is complete
        export/            the network as a SavedModel (command line, TensorFlow)
        tensorboard/       TensorBoard logs, when asked for
        overwritten/1/     earlier runs moved aside by `--overwrite` (never deleted)
        process.log        the output of a run started by `keras-fsp reproduce`
        .lock              held (an OS file lock) while a process works here

and what `keras-fsp export` writes into a folder: `model.keras`, `export/`,
`model.tflite`, `model_int8.tflite`, `model.onnx`.
"""

import contextlib
import csv
import io
import os
import shutil
import socket
import tempfile
import time

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

from keras_fsp.training.checkpoints import Checkpoints
from keras_fsp.training.files import TMP, atomic_write_text, read_json, write_json

CONFIG = "config.json"
LOG = "log.txt"
METRICS = "metrics.csv"
CURVES = "curves.png"
RESULT = "metrics.json"
PARTS = ".parts.json"
CHECKPOINTS = "checkpoints"
SAVED_MODEL = "export"
TENSORBOARD = "tensorboard"
OVERWRITTEN = "overwritten"
PROCESS_LOG = "process.log"
LOCK = ".lock"
#: What `keras-fsp export --formats` writes, by format.
EXPORT_FILES = {"keras": "model.keras", "saved_model": SAVED_MODEL, "litert": "model.tflite",
                "litert_int8": "model_int8.tflite", "onnx": "model.onnx"}
#: The stems of the networks a run saves (`<stem>.weights.h5`, `<stem>.keras`),
#: in the order a trained network is looked for.
NETWORKS = ("student", "teacher", "model")


def weights_file(stem):
    return f"{stem}.weights.h5"


def keras_file(stem):
    return f"{stem}.keras"


class Log:
    """Lines to stdout and, once a file is opened, to that file too (what
    came before is written when it opens)."""

    def __init__(self, path=None, echo=True):
        self.path, self.echo, self.pending = None, echo, []
        if path is not None:
            self.open(path)

    def open(self, path):
        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for line in self.pending:
            self._write(line)
        self.pending = []

    def _write(self, line):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def __call__(self, message, echo=None):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        if self.echo if echo is None else echo:
            print(message, flush=True)
        if self.path is None:
            self.pending.append(line)
        else:
            self._write(line)


class FolderBusyError(RuntimeError):
    """Another process works in the run folder."""


class ForeignFilesError(ValueError):
    """The folder holds files keras_fsp did not write."""


# Locks this process holds: real path -> [open lock file, depth].
_HELD = {}


def _float_or_none(raw):
    try:
        return float(raw)
    except ValueError:
        return None


class RunFolder:
    """One run's folder (see the module's docstring for its files).

    Args:
        path: the folder; nothing is created until something is written.
    """

    #: What a run writes (`--overwrite` moves these aside).
    OUTPUTS = (CONFIG, LOG, METRICS, CURVES, RESULT, PARTS, CHECKPOINTS, SAVED_MODEL, TENSORBOARD,
               *(weights_file(n) for n in NETWORKS), *(keras_file(n) for n in NETWORKS))

    def __init__(self, path):
        self.path = str(path)

    def __repr__(self):
        return f"RunFolder({self.path!r})"

    def file(self, name):
        """The path of `name` inside the folder."""
        return os.path.join(self.path, name)

    def create(self):
        os.makedirs(self.path, exist_ok=True)

    def checkpoints(self, log=None, keep=2):
        """The run's `Checkpoints` (see `keras_fsp.training.checkpoints`)."""
        return Checkpoints(self.file(CHECKPOINTS), keep=keep, log=log)

    def open_log(self, log=None):
        """`log` (default a new `Log`) writing into the folder's log file."""
        log = log or Log()
        if log.path is None:
            log.open(self.file(LOG))
        return log

    def exists(self):
        return os.path.isdir(self.path)

    # ------------------------------------------------------------ JSON files

    def _read(self, name):
        try:
            value = read_json(self.file(name))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def read_config(self):
        """The run's settings, or None when missing or unreadable."""
        return self._read(CONFIG)

    def write_config(self, config):
        write_json(self.file(CONFIG), config)

    def read_result(self):
        """The run's result (`metrics.json`), or None when there is none."""
        return self._read(RESULT)

    def write_result(self, result):
        write_json(self.file(RESULT), result)

    def earlier_train_seconds(self):
        """The training time of the parts before the last resume."""
        return float((self._read(PARTS) or {}).get("train_seconds", 0.0))

    def write_train_seconds(self, seconds):
        write_json(self.file(PARTS), {"train_seconds": seconds})

    # ----------------------------------------------------------- metrics.csv

    def metrics_rows(self):
        """The rows of `metrics.csv` (dicts of strings), one per epoch."""
        try:
            with open(self.file(METRICS), newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        except FileNotFoundError:
            return []

    def write_metrics_rows(self, rows):
        """Rewrites `metrics.csv` (atomically) with the union of the rows'
        columns, `epoch` first."""
        columns = ["epoch"]
        for row in rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.file(METRICS), buffer.getvalue())

    def keep_metrics_before(self, epoch):
        """Keeps the rows of the epochs before `epoch` (those after a resumed
        checkpoint run again); returns them."""
        rows = []
        for row in self.metrics_rows():
            try:
                if int(row.get("epoch", "")) < epoch:
                    rows.append(row)
            except ValueError:
                continue
        if os.path.isfile(self.file(METRICS)):
            self.write_metrics_rows(rows)
        return rows

    def history(self):
        """`{column: [value per epoch]}` of `metrics.csv`: floats (None where
        an epoch has no value), the `stage` column as names."""
        rows = self.metrics_rows()
        columns = list(rows[0]) if rows else []
        return {k: [(r.get(k) or None) if k == "stage" else _float_or_none(r.get(k, ""))
                    for r in rows] for k in columns}

    # ------------------------------------------------------------ the folder

    def probe_writable(self):
        """Creates the folder and writes and deletes a file in it: raises the
        `OSError` of a read-only or full disk, no permission or a file in
        the path before anything else is written."""
        self.create()
        fd, probe = tempfile.mkstemp(prefix=f"{TMP}probe-", dir=self.path)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)

    def move_aside(self):
        """Moves what a run wrote into a new numbered folder `overwritten/N/`
        (earlier ones stay: nothing is deleted). Returns `(names moved, the
        folder they went to)`; `([], None)` when there was nothing."""
        present = [n for n in self.OUTPUTS if os.path.lexists(self.file(n))]
        if not present:
            return [], None
        aside = self.file(OVERWRITTEN)
        os.makedirs(aside, exist_ok=True)
        taken = [int(n) for n in os.listdir(aside) if n.isdigit()]
        target = os.path.join(aside, str(max(taken, default=0) + 1))
        os.mkdir(target)
        for name in present:
            os.replace(self.file(name), os.path.join(target, name))
        return present, target

    def foreign_files(self, extra=()):
        """The entries of the folder that keras_fsp did not write (a run's
        outputs, `extra` names, and staging folders are its own; so is a
        `config.json` that a keras_fsp command wrote)."""
        try:
            names = os.listdir(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        own = {*self.OUTPUTS, OVERWRITTEN, PROCESS_LOG, LOCK, *extra}
        foreign = sorted(n for n in names if n not in own and not n.startswith(TMP))
        config = self._read(CONFIG)
        if os.path.lexists(self.file(CONFIG)) and not (config and "subcommand" in config):
            foreign.insert(0, CONFIG)  # a config.json of the user's own
        return foreign

    def check_own(self, extra=()):
        """Raises `ForeignFilesError` naming the files keras_fsp did not
        write, so that it never replaces one of the user's."""
        foreign = self.foreign_files(extra)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise ForeignFilesError(
                f"{self.path} holds files keras_fsp did not write ({shown}): it writes only into "
                "an empty folder or one of its own runs; choose another folder")

    def clean_staging(self):
        """Deletes what interrupted writes left in the folder (`.tmp-*`),
        first putting back an export an interruption left half replaced
        (`keras_fsp.export.recover`). Call it holding the folder's lock."""
        from keras_fsp.export import recover

        recover(self.path)
        for name in os.listdir(self.path) if self.exists() else []:
            if name.startswith(TMP) and not name.startswith(f"{TMP}export-"):
                path = self.file(name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(path)

    @contextlib.contextmanager
    def lock(self, what="a run"):
        """Holds the folder's lock for the body: one process at a time works
        in a run folder. An OS file lock, released by the kernel when the
        process dies (a killed run never blocks its own resumption);
        re-entrant in one process.

        Raises:
            FolderBusyError: naming the process that holds it.
        """
        self.create()
        path = os.path.realpath(self.file(LOCK))
        held = _HELD.get(path)
        if held is not None:
            held[1] += 1
        else:
            f = open(path, "a+", encoding="utf-8")
            if fcntl is not None:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    f.close()
                    raise FolderBusyError(
                        f"{self.path} is in use by {holder}: wait for it to end, or choose "
                        "another folder") from None
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {socket.gethostname()} ({what}, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            f.flush()
            held = _HELD[path] = [f, 1]
        try:
            yield self
        finally:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[path]
                held[0].close()  # releases the lock

    def trained_network(self, stems=NETWORKS):
        """The path of the first `<stem>.keras` the folder holds, or None."""
        for stem in stems:
            path = self.file(keras_file(stem))
            if os.path.isfile(path):
                return path
        return None
