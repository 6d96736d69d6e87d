"""Test setup: quiet TensorFlow, two logical CPU devices for MirroredStrategy, fixed seeds."""

import gc
import gzip
import os
import struct

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


# --- a tiny MNIST-format dataset for the command-line tests ----------------------------------

N_TRAIN, N_TEST, BATCH = 48, 24, 16


def write_idx(path, array):
    """Writes a uint8 array as a gzipped IDX file (the MNIST format)."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for k, label in enumerate(labels):
            images[k, 2 * label:2 * label + 4, 4:24] = 250
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(directory)


def tiny_flags(data_dir, save_dir, algo, *extra):
    return [
        "--dataset", "mnist", "--data_dir", data_dir, "--algo", algo,
        "--size_hidden_layers", "6", "--batch_size", str(BATCH), "--save_dir", str(save_dir),
        "--verbose", "0", *extra,
    ]


