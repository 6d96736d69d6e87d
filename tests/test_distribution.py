"""`keras.distribution` on JAX: every rule trained with `DataParallel` over 8 simulated CPU
devices (`--xla_force_host_platform_device_count=8`, in a process of its own,
tests/distribution_worker.py) ends where one device ends, within float32 rounding;
Kolen–Pollack's `B − W` shrinks by exactly `(1 − lr·λ)` per step there too. (One SPMD program:
the weight mirror draws its whole noise batch once, as on one device, and XLA shards it.)"""

import os
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribution_worker.py")
RULES = ("bp", "fa", "ss", "wm", "kp", "frsf", "brsf", "dfa", "sa", "ia")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distribution") / "trained.npz")
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, WORKER, out], env=env, capture_output=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout.decode()[-3000:] + result.stderr.decode()[-3000:]
    return np.load(out)


def test_the_mesh_has_eight_devices_and_replicates_the_weights(trained):
    assert int(trained["devices"]) == 8
    for rule in RULES:
        assert int(trained[f"mesh/{rule}/kernel_devices"]) == 8


@pytest.mark.parametrize("rule", RULES)
def test_data_parallel_training_equals_one_device(trained, rule):
    keys = [key for key in trained.files if key.startswith(f"one/{rule}/weights/")]
    assert keys
    scale = max(float(np.abs(trained[key]).max()) for key in keys)
    for key in keys:
        np.testing.assert_allclose(trained["mesh" + key[len("one"):]], trained[key],
                                   rtol=0, atol=1e-5 * scale, err_msg=key)


def test_kolen_pollack_invariant_on_the_mesh(trained):
    lr, decay, steps = 0.1, 0.2, 4  # parity_worker._compile, distribution_worker.STEPS
    for index in range(2):
        before = trained[f"mesh/kp/difference_before/{index}"]
        after = trained[f"mesh/kp/difference_after/{index}"]
        np.testing.assert_allclose(after, (1 - lr * decay) ** steps * before, rtol=1e-4,
                                   atol=1e-6 * float(np.abs(before).max()))
