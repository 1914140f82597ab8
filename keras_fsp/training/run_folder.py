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
        overwritten/       an earlier run moved aside by `--overwrite`
        process.log        the output of a run started by `keras-fsp reproduce`

and what `keras-fsp export` writes into a folder: `model.keras`, `export/`,
`model.tflite`, `model_int8.tflite`, `model.onnx`.
"""

import csv
import io
import os
import shutil
import tempfile
import time

from keras_fsp.training.checkpoints import Checkpoints
from keras_fsp.training.files import TMP, atomic_write_text, read_json, write_json

CONFIG = "config.json"
LOG = "log.txt"
METRICS = "metrics.csv"
RESULT = "metrics.json"
PARTS = ".parts.json"
CHECKPOINTS = "checkpoints"
SAVED_MODEL = "export"
TENSORBOARD = "tensorboard"
OVERWRITTEN = "overwritten"
PROCESS_LOG = "process.log"
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
    OUTPUTS = (CONFIG, LOG, METRICS, RESULT, PARTS, CHECKPOINTS, SAVED_MODEL, TENSORBOARD,
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
        """Moves what a run wrote into `overwritten/` (replacing what an
        earlier call put there). Returns `(names moved, whether an earlier
        overwritten/ was replaced)`."""
        present = [n for n in self.OUTPUTS if os.path.lexists(self.file(n))]
        if not present:
            return [], False
        aside = self.file(OVERWRITTEN)
        replaced = os.path.lexists(aside)
        if replaced:
            shutil.rmtree(aside)
        os.mkdir(aside)
        for name in present:
            os.replace(self.file(name), os.path.join(aside, name))
        return present, replaced

    def trained_network(self, stems=NETWORKS):
        """The path of the first `<stem>.keras` the folder holds, or None."""
        for stem in stems:
            path = self.file(keras_file(stem))
            if os.path.isfile(path):
                return path
        return None
