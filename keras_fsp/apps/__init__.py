"""Applications built on the keras_fsp library: the `keras-fsp` command line
(`cli`: its flags in `config`, its subcommands in `commands`, the networks
it builds and loads in `networks`), datasets registered by name (`data`),
pictures (`visualize`), the offline demo (`demo`) and the results
reproducer (`reproduce`).

Submodules load on first use (`keras_fsp.apps.cli`), so importing keras_fsp
stays light.
"""

import importlib

_SUBMODULES = ("cli", "commands", "config", "data", "demo", "networks", "reproduce", "visualize")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_fsp.apps.{name}")
    raise AttributeError(f"module 'keras_fsp.apps' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
