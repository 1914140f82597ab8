"""Test setup: TensorFlow backend unless KERAS_BACKEND says otherwise; on
TensorFlow, two logical CPUs so that MirroredStrategy can be tested."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ["KERAS_BACKEND"] == "jax":
    # Two host devices, to test Keras' DataParallel distribution on the CPU.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    )

import keras  # noqa: E402
import pytest  # noqa: E402

if keras.backend.backend() == "jax":
    import jax

    # One compilation cache for the suite's processes (tests/run_all.sh makes
    # it): many tests compile the same programs (the same small networks,
    # steps and batch shapes), and a later one loads them instead. Set here,
    # not through JAX's environment variables, so that the processes the
    # tests start choose their own cache.
    if os.environ.get("KERAS_FSP_TEST_JAX_CACHE"):
        jax.config.update("jax_compilation_cache_dir", os.environ["KERAS_FSP_TEST_JAX_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    _cpus = tf.config.list_physical_devices("CPU")
    # Must happen before TensorFlow initialises its devices.
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "large: slower tests (seconds to minutes)")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session(free_memory=False)


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over two logical CPUs for the whole session (a
    second strategy in one process is unreliable)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute needs the TensorFlow backend")
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
