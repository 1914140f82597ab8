"""TensorFlow's C++ log lines kept out of the `keras-fsp` command's stderr.

TensorFlow 2.21 logs through Abseil before Abseil's logging is initialised,
and such lines go to stderr whatever `TF_CPP_MIN_LOG_LEVEL` says ("oneDNN
custom operations are on", "Could not find cuda drivers", "failed call to
cuInit"). The command's output is its own, so it reads its stderr through
a pipe and drops those lines below the level asked for: `TF_CPP_MIN_LOG_LEVEL`
(0 shows every line, 1 hides INFO, 2 also WARNING, 3 also ERROR), by default
3. Everything else (Python's warnings, the command's errors, tracebacks)
passes through unchanged; the filter is removed at exit.
"""

import atexit
import os
import re
import sys
import threading

# `I0000 00:00:1796137020.343065   27151 port.cc:153] ...` (Abseil's prefix).
_NATIVE = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
# Lines of their own that belong to those messages.
_NATIVE_TOO = (b"WARNING: All log messages before absl::InitializeLog() is called",
               b"To enable the following instructions: ")
_HIDDEN = {0: b"", 1: b"I", 2: b"IW", 3: b"IWE"}


def filter_stderr():
    """Routes fd 2 through a thread that drops TensorFlow's native log lines
    (see the module's docstring); a no-op where fd 2 cannot be replaced."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")
    hidden = _HIDDEN.get(int(level) if level.isdigit() else 3, b"IWE")
    if not hidden:
        return
    try:
        real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except OSError:
        return

    def forward():
        with os.fdopen(read, "rb") as pipe, os.fdopen(real, "wb", buffering=0) as out:
            for line in pipe:
                match = _NATIVE.match(line)
                if (match and match.group(1) in hidden) or line.startswith(_NATIVE_TOO):
                    continue
                out.write(line)

    thread = threading.Thread(target=forward, name="keras_fsp-stderr", daemon=True)
    thread.start()

    def restore():
        sys.stderr.flush()
        try:  # fd 2 the real stderr again, which closes the pipe's last writer
            os.dup2(real, 2)
        except OSError:
            return
        thread.join(timeout=5)  # it forwards what is left, then ends

    atexit.register(restore)
