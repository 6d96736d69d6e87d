"""TensorFlow and JAX compute the same thing: for the same weights and batch, every rule's outputs
and every weight's gradient on every layer family, and the weights after two training steps,
agree between the backends (each run in its own process, tests/parity_worker.py); a model saved
under one backend loads and trains under the other.

Differences are measured per case (a rule on a layer family, or a trained model) relative to
the largest magnitude in that case: a gradient that is zero in exact arithmetic (the key bias
of attention, which softmax ignores) is rounding noise on both backends, and relative to itself
it would be anything.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity_worker.py")
GRADIENT_TOLERANCE = 1e-5  # the target: max relative difference per weight
TRAINED_TOLERANCE = 1e-5


def _run(backend, *args):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, WORKER, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait(process):
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output.decode(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    paths = {backend: (str(folder / f"{backend}.npz"), str(folder / f"{backend}.keras"))
             for backend in ("tensorflow", "jax")}
    running = [_run(backend, "compute", *paths[backend]) for backend in paths]
    for process in running:
        _wait(process)
    # Each backend loads the model the other saved.
    loads = {backend: str(folder / f"{backend}_loaded.npz") for backend in paths}
    running = [_run("tensorflow", "load", paths["jax"][1], loads["tensorflow"]),
               _run("jax", "load", paths["tensorflow"][1], loads["jax"])]
    for process in running:
        _wait(process)
    return ({backend: np.load(paths[backend][0]) for backend in paths},
            {backend: np.load(loads[backend]) for backend in loads})


def _cases(arrays, prefix):
    cases = {}
    for key in arrays.files:
        if key.startswith(prefix):
            cases.setdefault("/".join(key.split("/")[:3]), []).append(key)
    return cases


def _worst(tf_arrays, jax_arrays, keys):
    scale = max(float(np.abs(tf_arrays[key]).max()) for key in keys)
    return max(float(np.abs(tf_arrays[key] - jax_arrays[key]).max()) for key in keys) / scale


def test_every_rule_and_layer_family_has_the_same_outputs_and_gradients(results):
    computed, _ = results
    tf_arrays, jax_arrays = computed["tensorflow"], computed["jax"]
    cases = _cases(tf_arrays, "gradients/")
    rules = {case.split("/")[2] for case in cases if case.startswith("gradients/mlp/")}
    assert len(rules) == 10 and len(cases) >= 10 + 13 * 4
    differences = {}
    for case, keys in cases.items():
        assert all(key in jax_arrays.files for key in keys), case
        assert [key.rsplit("/", 1)[-1] for key in keys].count("dx") == 1
        differences[case] = _worst(tf_arrays, jax_arrays, keys)
    assert max(differences.values()) <= GRADIENT_TOLERANCE, sorted(
        differences.items(), key=lambda item: -item[1])[:5]


def test_every_rule_trains_the_same_two_steps(results):
    computed, _ = results
    tf_arrays, jax_arrays = computed["tensorflow"], computed["jax"]
    cases = _cases(tf_arrays, "trained/")
    assert {case.split("/")[1] for case in cases} == {
        "bp", "fa", "ss", "kp", "frsf", "brsf", "dfa", "sa", "ia"}
    for case, keys in cases.items():
        assert _worst(tf_arrays, jax_arrays, keys) <= TRAINED_TOLERANCE, case


def test_a_model_saved_under_one_backend_loads_and_trains_under_the_other(results):
    computed, loaded = results
    for saver, loader in (("tensorflow", "jax"), ("jax", "tensorflow")):
        np.testing.assert_allclose(loaded[loader]["loaded/outputs"],
                                   computed[saver]["saved/outputs"], rtol=1e-5, atol=1e-6)
    # The same saved model (up to the backends' rounding) trained two more steps on each.
    tf_loaded, jax_loaded = loaded["tensorflow"], loaded["jax"]
    keys = [key for key in tf_loaded.files if key != "loaded/outputs"]
    assert keys and all(key in jax_loaded.files for key in keys)
    assert _worst(tf_loaded, jax_loaded, keys) <= TRAINED_TOLERANCE
    saved = {key.split("/", 2)[2].split("/", 1)[-1]: key
             for key in computed["tensorflow"].files if key.startswith("trained/kp/")}
    moved = [key for key in keys if key.endswith("/kernel")]
    assert moved and all(  # the two more steps did change every kernel
        not np.allclose(tf_loaded[key], computed["tensorflow"][saved[key.split("/", 1)[1]]])
        for key in moved
    )
