"""Checkpoints that survive interruption, and exact resumption.

A checkpoint holds every variable that training changes: the model's weights
(`save_weights`: for an `FSPDistiller` the student, the terms' own layers and
stage weights), the states of the random generators inside the model (the
in-step augmentation's `SeedGenerator`, which `save_weights` leaves out), and
the variables of the active stage's optimizer (step count, momentum), with
the epoch and the stage's name. With the training data's order a function of
`(seed, epoch)` only (`keras_fsp.training.loop.epoch_stream`,
`keras_fsp.inputs.DeviceArrays`), a resumed run on the CPU ends with exactly
the weights of an uninterrupted one.

Checkpoints are written atomically: made in memory, the free space checked,
written into a temporary folder beside the final one with a `manifest.json`
(each file's size and sha256) last, read back and verified, then renamed;
the previous checkpoint is deleted only after the new one is complete
(renamed to a temporary name first), so a kill or a full disk at any moment
leaves a loadable checkpoint, and whatever a kill left half done (`.tmp-*`)
is deleted at the next start. Resumption takes the newest checkpoint that
verifies against its manifest, saying which ones it skipped and why: a
damaged file costs an epoch, not the run. The files are backend-agnostic
(Keras weights, NumPy arrays, JSON).
"""

import errno
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
import zipfile
import zlib

import keras
import numpy as np

from keras_fsp import compat
from keras_fsp.callbacks import as_float
from keras_fsp.training.files import (TMP, atomic_write_text, check_free_space, fsync_dir, read_json,
                                      sha256, umask, write_new)

LATEST = "latest"
WEIGHTS_FILE = "model.weights.h5"
STATE_FILE = "state.npz"
INFO_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: with MANIFEST_FILE; 1 (no manifest) is still read, unverified

_NAME = re.compile(r"^epoch-(\d{6,})$")
# What a damaged file raises when it is loaded (a model that does not fit the
# checkpoint raises ValueError instead, which is not a damaged checkpoint).
_DAMAGED = (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _finite_logs(logs):
    """JSON-ready copy of the scalar logs."""
    out = {}
    for k, v in (logs or {}).items():
        f = as_float(v)
        if f is not None:
            out[k] = f if math.isfinite(f) else str(f)
    return out


def _stage_name(model):
    stage = getattr(model, "stage", None)
    return getattr(stage, "name", None)


def _seed_states(model):
    """The `SeedGenerator` states inside `model` (not in `model.weights`)."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _learning_rates(optimizer):
    """The constant learning rates (variables) of an optimizer and of the
    one a `LossScaleOptimizer` wraps; a schedule is none."""
    optimizers = (optimizer, getattr(optimizer, "inner_optimizer", None))
    rates = [compat.learning_rate(o) for o in optimizers if o is not None]
    return [r for r in rates if isinstance(r, keras.Variable)]


def _optimizer_of(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "Compile the model before saving or restoring a checkpoint: "
            "the checkpoint holds its optimizer's state."
        )
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    return optimizer


def verify_checkpoint(path):
    """`(info, None)` for an intact checkpoint folder (its `state.json`), or
    `(None, why)`: every file must have the size and sha256 that its
    `manifest.json`, written last, recorded."""
    try:
        manifest = read_json(os.path.join(path, MANIFEST_FILE))
        listed = {name: (int(f["size"]), str(f["sha256"])) for name, f in manifest["files"].items()}
    except FileNotFoundError:
        try:  # format 1, before manifests: complete if its files are there
            info = read_json(os.path.join(path, INFO_FILE))
            if info.get("format") == 1 and all(
                    os.path.isfile(os.path.join(path, n)) for n in (WEIGHTS_FILE, STATE_FILE)):
                return info, None
        except (OSError, ValueError, AttributeError):
            pass
        return None, f"it has no {MANIFEST_FILE} (its write did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"its {MANIFEST_FILE} is unreadable ({type(e).__name__})"
    for name in (WEIGHTS_FILE, STATE_FILE, INFO_FILE):
        if name not in listed:
            return None, f"its {MANIFEST_FILE} does not list {name}"
    for name, (size, digest) in listed.items():
        try:
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
        except OSError as e:
            return None, f"{name} is unreadable ({e.strerror or type(e).__name__})"
        if len(data) != size:
            return None, f"{name} has {len(data)} bytes, {size} were written (truncated or damaged)"
        if sha256(data) != digest:
            return None, f"{name} does not match its sha256 checksum (damaged)"
    try:
        info = read_json(os.path.join(path, INFO_FILE))
        int(info["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its {INFO_FILE} is unreadable ({type(e).__name__})"
    return info, None


class Checkpoint:
    """A complete checkpoint on disk: `epoch` epochs done, in `stage`."""

    def __init__(self, path, info):
        self.path = path
        self.info = info
        self.epoch = int(info["epoch"])
        self.stage = info.get("stage")

    @property
    def name(self):
        return os.path.basename(self.path)

    def __repr__(self):
        return f"Checkpoint(epoch={self.epoch}, stage={self.stage!r}, path={self.path!r})"


class Checkpoints:
    """Atomic checkpoints in one folder (a run's `checkpoints/`, see
    `keras_fsp.training.RunFolder`), and resumption.

    Args:
        path: the folder; created at the first save, inside a folder that
            must exist.
        keep: how many of the latest checkpoints to keep (at least 1; the
            previous one is deleted only once the new one is complete).
        log: called with a line for each checkpoint that `restore` skips
            (damaged or incomplete) and why; default `warnings.warn`.

    Layout: `epoch-000007/` holds `model.weights.h5`,
    `state.npz` (optimizer variables, random-generator states),
    `state.json` (epoch, stage, logs) and, written last, `manifest.json`
    (each file's size and sha256); `latest` names the newest,
    for people: resumption takes the newest checkpoint that verifies, so a
    damaged one or a damaged pointer costs an epoch, not the run.
    """

    def __init__(self, path, keep=2, log=None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}.")
        self.path = str(path)
        self.keep = int(keep)
        self.log = log or (lambda message: warnings.warn(message, stacklevel=3))

    # ---------------------------------------------------------------- lookup

    def _folders(self):
        """`(epoch, path)` of the folders named like checkpoints, newest first."""
        try:
            names = os.listdir(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = [(int(m.group(1)), os.path.join(self.path, n))
                 for n in names if (m := _NAME.match(n))]
        return sorted(found, reverse=True)

    def _intact(self, report=False):
        """The checkpoints that verify, newest first; with `report`, each
        one skipped is logged with the reason."""
        for _, path in self._folders():
            info, why = verify_checkpoint(path)
            if info is not None:
                yield Checkpoint(path, info)
            elif report:
                self.log(f"checkpoint {os.path.basename(path)} skipped: {why}; "
                         "trying the one before")

    def checkpoints(self):
        """The intact checkpoints, oldest first."""
        return list(self._intact())[::-1]

    def latest(self):
        """The newest intact checkpoint (see `verify_checkpoint`), or None."""
        return next(self._intact(), None)

    def _remove_partial(self):
        """Deletes what killed writes and deletions left (`.tmp-*`)."""
        try:
            names = os.listdir(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if name.startswith(TMP):
                path = os.path.join(self.path, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.remove(path)
                    except OSError:
                        pass

    def _aside(self, path):
        """Renames a checkpoint folder to a `.tmp-` name; returns the name."""
        tmp = tempfile.mkdtemp(prefix=f"{TMP}old-{os.path.basename(path)}-", dir=self.path)
        os.rmdir(tmp)
        os.replace(path, tmp)
        return tmp

    def _discard(self, path):
        """Deletes a checkpoint folder. Renamed first: a kill halfway through
        leaves a `.tmp-` folder, which the next start deletes, not a
        half-deleted checkpoint."""
        shutil.rmtree(self._aside(path), ignore_errors=True)

    def _prune(self, epoch):
        """Deletes the folders before `epoch` but the newest `keep - 1`
        intact ones (damaged ones go too). Later folders stay until training
        gets there again and replaces them."""
        kept = 1  # the checkpoint of `epoch`
        for folder_epoch, path in self._folders():
            if folder_epoch >= epoch:
                continue
            if kept < self.keep and verify_checkpoint(path)[0] is not None:
                kept += 1
            else:
                self._discard(path)

    # ------------------------------------------------------------------ save

    def save(self, model, epoch, logs=None, extra=None):
        """Writes the checkpoint for `epoch` completed epochs, atomically.

        The files are made in memory, the free space is checked, then they
        are written into a temporary folder, read back and checked against
        their sha256, and the folder is renamed into place. A failure
        (`OSError`: disk full, folder not writable or vanished) deletes the
        temporary folder and leaves the earlier checkpoints as they were.

        Args:
            model: the compiled model (an `FSPDistiller` or any Keras model).
                The folder holding `path` must exist.
            epoch: the number of completed epochs (the next run's
                `initial_epoch`).
            logs: the epoch's logs, kept in `state.json`.
            extra: more JSON-serialisable facts for `state.json`.

        Returns:
            the `Checkpoint` written.
        """
        epoch = int(epoch)
        if not os.path.isdir(self.path):
            os.mkdir(self.path)  # not makedirs: a vanished run folder is an error
        self._remove_partial()
        optimizer = _optimizer_of(model)
        seeds = _seed_states(model)
        arrays = {}
        for i, v in enumerate(optimizer.variables):
            arrays[f"optimizer/{i}"] = np.asarray(keras.ops.convert_to_numpy(v))
        for i, v in enumerate(seeds):
            arrays[f"seed/{i}"] = np.asarray(keras.ops.convert_to_numpy(v))
        state = io.BytesIO()
        np.savez(state, **arrays)
        info = {
            "format": FORMAT_VERSION,
            "epoch": epoch,
            "stage": _stage_name(model),
            "optimizer": type(optimizer).__name__,
            "optimizer_variables": len(optimizer.variables),
            "seed_states": [v.path for v in seeds],
            "weights": len(model.weights),
            "backend": keras.backend.backend(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "logs": _finite_logs(logs),
            **(extra or {}),
        }
        files = {
            WEIGHTS_FILE: compat.weights_h5_bytes(model),
            STATE_FILE: state.getvalue(),
            INFO_FILE: json.dumps(info, indent=2).encode("utf-8"),
        }
        manifest = {"format": FORMAT_VERSION,
                    "files": {n: {"size": len(d), "sha256": sha256(d)} for n, d in files.items()}}
        files[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode("utf-8")  # last
        name = f"epoch-{epoch:06d}"
        check_free_space(self.path, sum(len(d) for d in files.values()),
                         f"checkpoint {name}")
        final = os.path.join(self.path, name)
        tmp = tempfile.mkdtemp(prefix=f"{TMP}{name}-", dir=self.path)
        old = None
        try:
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 otherwise
            for file, data in files.items():
                write_new(os.path.join(tmp, file), data)
            _, why = verify_checkpoint(tmp)  # what reached the disk
            if why is not None:
                raise OSError(errno.EIO, f"checkpoint {name} read back damaged: {why}", tmp)
            fsync_dir(tmp)
            if os.path.exists(final):  # the same epoch again (e.g. after a damaged one)
                old = self._aside(final)
            os.replace(tmp, final)
            fsync_dir(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not os.path.exists(final):
                os.replace(old, final)
            raise
        atomic_write_text(os.path.join(self.path, LATEST), name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(epoch)
        return Checkpoint(final, info)

    # --------------------------------------------------------------- restore

    def restore(self, model, checkpoint=None):
        """Restores the newest intact (or the given) checkpoint into `model`.

        `model` must be built and compiled as it was when the checkpoint was
        written. An `FSPDistiller` is put in the checkpoint's stage
        (`set_stage`) and that stage's optimizer gets its saved state. A
        checkpoint that does not verify, load or fit the model (damaged, or
        tampered with and its manifest recomputed) is skipped, with a line to
        `log` saying why, for the one before; when none fits, the first
        misfit is raised (the model is not the one that wrote them).
        Leftovers of killed writes are deleted first.

        The optimizers' learning rates are not restored: like a schedule, a
        constant learning rate is a setting of the code that builds the
        optimizer, so a run may resume with another one.

        Returns:
            the number of completed epochs (`initial_epoch` for `fit`), 0
            when there is no checkpoint.
        """
        self._remove_partial()
        misfit = None
        for candidate in [checkpoint] if checkpoint is not None else self._intact(report=True):
            try:
                return self._load(model, candidate)
            except (*_DAMAGED, ValueError) as e:
                if checkpoint is not None:
                    raise
                if isinstance(e, ValueError) and misfit is None:
                    misfit = e
                self.log(f"checkpoint {candidate.name} skipped: it does not load "
                         f"({type(e).__name__}: {str(e)[:200]}); trying the one before")
        if misfit is not None:
            raise misfit
        return 0

    def _load(self, model, checkpoint):
        info = checkpoint.info
        if info.get("stage") is not None:
            if not hasattr(model, "set_stage"):
                raise ValueError(
                    f"{checkpoint.path} was written by a distiller in stage "
                    f"{info['stage']!r}; got a {type(model).__name__}."
                )
            model.set_stage(info["stage"])
        if len(model.weights) != info.get("weights", len(model.weights)):
            raise ValueError(
                f"{checkpoint.path} holds {info['weights']} weights; this model "
                f"has {len(model.weights)}: it is not the model that wrote it."
            )
        with np.load(os.path.join(checkpoint.path, STATE_FILE)) as state:
            arrays = {k: state[k] for k in state.files}
        optimizer = _optimizer_of(model)
        # A constant learning rate is a setting, as a schedule is: the
        # optimizer's own (a run may resume with another), not the
        # checkpoint's, which load_weights (it holds the compiled optimizer
        # too) and the optimizer's variables below would restore.
        rates = [(v, keras.ops.convert_to_numpy(v)) for v in _learning_rates(optimizer)]
        model.load_weights(os.path.join(checkpoint.path, WEIGHTS_FILE))
        seeds = _seed_states(model)
        saved_seeds = sorted(
            (int(k.split("/")[1]), v) for k, v in arrays.items() if k.startswith("seed/")
        )
        if len(saved_seeds) != len(seeds):
            raise ValueError(
                f"{checkpoint.path} holds {len(saved_seeds)} random-generator "
                f"states; the model has {len(seeds)}."
            )
        for variable, (_, value) in zip(seeds, saved_seeds):
            variable.assign(value)
        saved = sorted(
            (int(k.split("/")[1]), v)
            for k, v in arrays.items()
            if k.startswith("optimizer/")
        )
        if len(saved) != len(optimizer.variables):
            raise ValueError(
                f"{checkpoint.path} holds {len(saved)} optimizer variables; the "
                f"optimizer of stage {_stage_name(model)!r} has "
                f"{len(optimizer.variables)}: the model or its stages differ "
                "from the run that wrote the checkpoint."
            )
        for variable, (_, value) in zip(optimizer.variables, saved):
            if tuple(variable.shape) != tuple(value.shape):
                raise ValueError(
                    f"{checkpoint.path}: optimizer variable {variable.path} has "
                    f"shape {tuple(variable.shape)}, saved {tuple(value.shape)}."
                )
            variable.assign(value)
        for variable, value in rates:
            variable.assign(value)
        return checkpoint.epoch
