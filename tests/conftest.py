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


gc.collect()
gc.freeze()  # TensorFlow's and Keras's import-time objects: never garbage, never scanned again


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="also run the tests marked long (campaigns of many subprocesses)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="a long campaign: run with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


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
    # What survived is frozen (left out of every later collection): a full collection scans every
    # tracked object, and the objects TensorFlow and Keras keep across tests made this teardown
    # take 4-5 s per test by the end of the suite (test_layers, test_saving and test_more_layers:
    # 163 s with 70 s of teardown, 72 s frozen). Garbage a later test makes is still collected.
    gc.freeze()


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




# --- comparing run folders ---------------------------------------------------------------------


def read_text(run_dir, name):
    with open(os.path.join(run_dir, name), encoding="utf-8", newline="") as f:
        return f.read()


def model_state(path):
    """`({weight path: value}, {optimizer variable index: value})` of a saved `model.keras`."""
    import keras_wt  # noqa: F401  (registers the layers)

    model = keras.saving.load_model(path)
    return {v.path: v.numpy() for v in model.weights}, {
        f"optimizer/{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}


def tensorboard_scalars(run_dir):
    """`{(split, tag, step): value}` of every scalar in a run's TensorBoard events; a
    (tag, step) written twice fails."""
    found = {}
    for split in ("train", "validation"):
        directory = os.path.join(run_dir, "tensorboard", split)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
                for value in event.summary.value:
                    key = (split, value.tag, event.step)
                    assert key not in found, f"{key} written twice in {run_dir}"
                    found[key] = float(tf.make_ndarray(value.tensor))
    return found


def assert_same_run(a, b, epochs=None):
    """The run folders `a` (uninterrupted) and `b` hold the same model (weights, `B`, optimizer
    state) and the same records, every epoch once: `results.json` (but the epochs' `seconds`),
    `history.csv` byte for byte (`epochs` rows, when given), TensorBoard's scalars."""
    import json

    (wa, oa), (wb, ob) = model_state(os.path.join(a, "model.keras")), model_state(
        os.path.join(b, "model.keras"))
    assert list(wa) == list(wb) and any("feedback_" in k for k in wa)
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)
    assert list(oa) == list(ob)
    for key in oa:
        np.testing.assert_array_equal(oa[key], ob[key], err_msg=key)
    ra, rb = json.loads(read_text(a, "results.json")), json.loads(read_text(b, "results.json"))
    assert list(ra) == list(rb)
    for key in ra:
        ra[key].pop("seconds"), rb[key].pop("seconds", None)
        assert ra[key] == rb[key], key
    history = read_text(b, "history.csv")
    assert history == read_text(a, "history.csv")
    if epochs is not None:
        assert len(history.splitlines()) == 1 + epochs  # a header, then each epoch once
    scalars = tensorboard_scalars(a)
    assert scalars and tensorboard_scalars(b) == scalars
