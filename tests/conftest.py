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
import tensorflow as tf  # noqa: E402  (tf.data and event files, on every backend)

BACKEND = keras.backend.backend()

# The test files that use only keras, keras.ops, NumPy and keras_wt, and so run on every
# backend keras_wt implements: `script/test` runs the suite under TensorFlow, then again under
# `KERAS_BACKEND=jax`, which collects only these.
BACKEND_NEUTRAL_FILES = ("test_backends.py",)

if BACKEND == "tensorflow":
    _cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:  # devices already initialised by an earlier import
        pass


def pytest_ignore_collect(collection_path, config):
    if (BACKEND != "tensorflow" and collection_path.name.startswith("test_")
            and collection_path.suffix == ".py"
            and collection_path.name not in BACKEND_NEUTRAL_FILES):
        return True
    return None


gc.collect()
gc.freeze()  # TensorFlow's and Keras's import-time objects: never garbage, never scanned again


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="also run the tests marked long (campaigns of many subprocesses)")


# The tests the development loop leaves out (`script/test -m "not slow"`, about 3 minutes on 2
# cores; the whole suite, which CI runs, has them): whole files of end-to-end runs and
# subprocesses, and elsewhere every test that took 2 s or more in a measured run of the suite.
SLOW_FILES = ("test_preemption.py", "test_training.py", "test_run_faults.py",
              "test_experiment.py", "test_keras_hub.py", "test_multiworker.py", "test_sweep.py",
              "test_parity.py", "test_distribution.py", "test_jax_cli.py")
SLOW_TESTS = (
    "test_every_algorithm_lowers_the_training_loss",
    "test_keras_applications_convert_completely_with_identical_outputs",
    "test_two_replicas_train_like_one_device",
    "test_a_subclassed_model_mirrors_and_measures_as_the_functional_model",
    "test_backup_and_restore_resume_continues_exactly",
    "test_a_loss_learned_b_carries_the_error_before_its_update_of_the_same_step",
    "test_mirror_in_train_step_equals_mirror_after_every_batch",
    "test_training_is_bit_for_bit_the_same_without_the_unused_b",
    "test_trainer_models_load_after_import_keras_wt_alone",
    "test_xla_training_steps_equal_eager_ones",
    "test_mirror_reaches_the_fixed_point_on_both_kernels",
    "test_local_loss_updates_b_once_per_call_on_noise_of_each_kernel_input",
    "test_kolen_pollack_keeps_both_kernel_pairs_of_every_layer_in_step",
    "test_forward_and_bp_gradients_are_bit_for_bit_the_stock_layer",
    "test_example_script_runs_on_a_tiny_dataset",
    "test_every_rule_trains_with_fit_in_every_wrapper",
    "test_alignment_reports_both_kernels_of_every_recurrent_layer",
    "test_under_xla",
    "test_under_mirrored_strategy_with_xla_per_replica",
    "test_under_mirrored_strategy_replicas_agree",
    "test_the_kp_training_step_graph_grows_linearly_with_depth",
    "test_fa_resnet20_with_feedback_equal_to_forward_kernels_has_backprop_gradients",
    "test_fa_resnet20_trains_under_mirrored_strategy",
    "test_fa_cnn_trains_with_xla",
    "test_xla_mirror_step_with_per_layer_batches_equals_eager_formula",
    "test_xla_mirror_step_equals_eager_formula",
    "test_the_mirroring_training_step_graph_grows_linearly_with_depth",
    "test_residual_angle_of_a_frozen_dense_layer_follows_the_finite_sample_law",
    "test_residual_angle_depends_on_the_noise_fourth_moment",
    "test_mirror_in_train_step_under_mirrored_strategy",
    "test_mirror_in_train_step_across_fits_and_after_an_aborted_fit",
    "test_mirror_in_an_xla_train_step_draws_the_xla_mirrors_noise",
    "test_callback_between_calls_with_steps_per_execution_runs_the_same_mirror_steps",
    "test_auto_batch_size_reaches_the_target_angle",
    "test_strip_returns_an_uncompiled_model_that_loads_without_keras_wt",
    "test_every_rule_lowers_the_training_loss_with_fit",
    "test_mirror_steps_are_reproducible_and_follow_the_step_count",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
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


# --- a user's layer keras_wt has no twin for ------------------------------------------------


@keras.saving.register_keras_serializable(package="tests")
class MyCell(keras.layers.Layer):
    """A user's recurrent cell with a kernel of its own: keras_wt has no twin for it."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1] + self.units, self.units), name="kernel")

    def call(self, inputs, states):
        h = keras.ops.tanh(keras.ops.matmul(keras.ops.concatenate([inputs, states[0]], -1), self.kernel))
        return h, [h]

    def get_config(self):
        return dict(super().get_config(), units=self.units)
