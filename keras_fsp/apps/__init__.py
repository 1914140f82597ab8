"""Applications built on the keras_fsp library: the `keras-fsp` command line
(`cli`), the training harness shared by the command line, the examples and
the demo (`training`), resumable runs and checkpoints (`runs`), input
pipelines (`data`), pictures (`visualize`), the offline demo (`demo`) and the
results reproducer (`reproduce`).

Submodules load on first use (`keras_fsp.apps.runs`), so importing keras_fsp
stays light.
"""

import importlib

_SUBMODULES = ("cli", "data", "demo", "reproduce", "runs", "training", "visualize")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_fsp.apps.{name}")
    raise AttributeError(f"module 'keras_fsp.apps' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
