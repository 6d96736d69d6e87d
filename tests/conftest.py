"""Test setup: quiet TensorFlow, two logical CPU devices for MirroredStrategy, fixed seeds."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # devices already initialised by an earlier import
    pass


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.utils.set_random_seed(1234)
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")
    # Free the input iterators a test leaves behind: the prefetching threads of an unreferenced
    # but not yet collected MirroredStrategy iterator can hold TensorFlow's inter-op threads (two
    # on a 2-core machine) and stall the next test for minutes.
    gc.collect()


@pytest.fixture(scope="session")
def two_cpu_strategy():
    """One MirroredStrategy over two logical CPUs for the whole session: strategies created
    one after another in a process reuse collective instance keys, which aborts collectives."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        pytest.skip("two logical CPU devices are not available")
    return tf.distribute.MirroredStrategy(devices[:2])


def assert_allclose(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)
