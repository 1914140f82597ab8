"""The `keras-fsp` command with a fault injected, for `tests/test_faults.py`.

`python -m tests.fault_worker ARGS...` runs `keras-fsp ARGS...` (its exit
status is the command's); the environment variable `FAULT` picks the fault:

- `write:N`: SIGKILL halfway through the N-th file written into a
  checkpoint's temporary folder (4 files a checkpoint: N = 5 is the second
  checkpoint's weights);
- `discard`: SIGKILL halfway through deleting a stale checkpoint folder
  (after its first file; `shutil.rmtree`, whatever the code around it);
- unset: no fault.
"""

import os
import re
import signal
import sys


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _inject(fault):
    from keras_fsp.training import checkpoints

    if fault.startswith("write:"):
        target, calls, write = int(fault.split(":")[1]), [0], checkpoints.write_new

        def write_then_die(path, data):
            calls[0] += 1
            if calls[0] == target:
                with open(path, "xb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                _die()
            write(path, data)

        checkpoints.write_new = write_then_die
    elif fault.startswith("fill:"):
        # Another program fills the disk after checkpoint N: a junk file takes
        # all but a little of the free space of the file system holding PATH.
        _, after, junk = fault.split(":", 2)
        save = checkpoints.Checkpoints.save

        def save_then_fill(self, model, epoch, logs=None):
            written = save(self, model, epoch, logs)
            if epoch == int(after):
                import shutil

                free = shutil.disk_usage(os.path.dirname(junk)).free
                with open(junk, "wb") as f:
                    f.write(b"\0" * max(0, free - 64 * 1024))
            return written

        checkpoints.Checkpoints.save = save_then_fill
    elif fault.startswith("hold_lock:"):  # another process in the run folder, idle
        import time

        from keras_fsp.training import RunFolder

        with RunFolder(fault.split(":", 1)[1]).lock("a test holding the lock"):
            print("locked", flush=True)
            time.sleep(600)
    elif fault == "discard":
        import shutil

        rmtree = shutil.rmtree

        def rmtree_then_die(path, *args, **kwargs):
            # A stale checkpoint (renamed first, or not): not a temporary one.
            if re.match(r"(\.tmp-old-)?epoch-", os.path.basename(str(path))):
                os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
                _die()
            rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree_then_die
    elif fault:
        raise ValueError(f"unknown FAULT {fault!r}")


if __name__ == "__main__":
    _inject(os.environ.get("FAULT", ""))
    from keras_fsp.apps import cli

    sys.exit(cli.main(["keras-fsp", *sys.argv[1:]]))
