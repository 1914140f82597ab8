"""Files written so that no interruption leaves half of one: atomic writes
(temporary file, fsync, rename) with the free space checked before anything
is written. Plain Python and NumPy; the weights' bytes come from Keras'
own writer (`keras_fsp.compat.weights_h5_bytes`)."""

import errno
import hashlib
import json
import os
import shutil
import tempfile

from keras_fsp import compat

# Prefix of what a write or deletion in progress owns; left over, it is deleted.
TMP = ".tmp-"
# Kept free beyond a file's bytes (file-system blocks, directory entries).
SPARE_BYTES = 1 << 16


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def _mb(size):
    return f"{size / 1e6:.1f} MB"


def check_free_space(folder, size, what):
    """Raises `OSError(ENOSPC)` naming both sizes when `size` bytes (and a
    little to spare) do not fit on the disk holding `folder`, before anything
    is written: a write that fills the disk halfway fails later and less
    clearly (inside h5py it can even crash the interpreter)."""
    free = shutil.disk_usage(folder).free
    if free < size + SPARE_BYTES:
        raise OSError(errno.ENOSPC, f"No space left on device: {what} needs {_mb(size)}, "
                      f"{_mb(free)} free", folder)


def write_new(path, data):
    """Writes `data` (bytes) into a new file, flushed to disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path, data):
    """Writes `data` to `path` atomically (temporary file, fsync, rename).

    The folder must exist: a run folder that vanished is an error, not
    silently created again empty."""
    folder = os.path.dirname(os.path.abspath(path))
    check_free_space(folder, len(data), os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP, dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 otherwise
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write_text(path, text):
    """Writes `text` to `path` atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_weights(model, path):
    """`model.save_weights(path)`, atomically and with the free space checked
    first (h5py never writes into a full disk)."""
    atomic_write_bytes(path, compat.weights_h5_bytes(model))


def write_json(path, obj):
    """Writes `obj` as indented, sorted JSON to `path`, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path):
    """The JSON object in `path` (read as UTF-8 bytes: a file that is not
    UTF-8 raises `ValueError`, not a decoding error of the platform's
    encoding)."""
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))
