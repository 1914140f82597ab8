"""Where training runs: the device's name, whether it is an accelerator, and
JAX's persistent cache of compiled programs."""

import os

import keras


def device_name():
    """The accelerator training runs on, e.g. "NVIDIA H100 80GB HBM3", or "cpu"."""
    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        return device.device_kind if device.platform != "cpu" else "cpu"
    return "cpu"


def on_accelerator():
    """Whether training runs on JAX with a GPU or TPU."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() != "cpu"


def use_compilation_cache(path):
    """On JAX, keeps XLA's compiled programs in `path` (JAX's persistent
    compilation cache), so that a later run of the same networks (another
    seed, a resumed run, the next method of a table) loads them instead of
    compiling again: on a GPU compilation is a sizeable part of a short
    run (BENCHMARKS.md). A cache the user configured is left as it is. Call
    it before anything is compiled: JAX decides at the first compilation
    whether the process uses a cache.

    Returns the cache folder in use, or None."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current or not path:
        return current or None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program, not only those over JAX's default second: the many small
    # ones (weight initialisers, one per shape) add up to seconds on a GPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
