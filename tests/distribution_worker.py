"""Run by tests/test_distribution.py in a process of its own: trains every rule on JAX with
`keras.distribution.DataParallel` over 8 simulated CPU devices and on one device, from the same
weights and batches, and writes the weights of both (and Kolen–Pollack's `B − W` before and
after) to an `.npz` file.

    python tests/distribution_worker.py OUT.npz
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_wt  # noqa: E402
from parity_worker import RULES, _batches, _compile, _mlp, _set_weights  # noqa: E402

STEPS = 4  # two epochs of two batches of 16


def train(feedback, found, prefix):
    model = _mlp(feedback)
    _set_weights(model, 3)
    _compile(model, feedback)
    pairs = list(keras_wt.feedback_pairs(model).values())
    for index, (w, b) in enumerate(pairs):
        found[f"{prefix}/{feedback}/difference_before/{index}"] = np.asarray(b.value - w.value)
    callbacks = []
    if feedback == "wm":
        callbacks = [keras_wt.callbacks.MirrorCallback(0.1, 1.0, decay=0.5, batch_size=64,
                                                       warmup_steps=2)]
    x, y = _batches()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    assert int(model.optimizer.iterations.numpy()) == STEPS
    for index, (w, b) in enumerate(pairs):
        found[f"{prefix}/{feedback}/difference_after/{index}"] = np.asarray(b.value - w.value)
    for variable in model.weights:
        found[f"{prefix}/{feedback}/weights/{variable.path}"] = np.asarray(variable.value)
    if prefix == "mesh":
        kernel = model.trainable_variables[0].value
        found[f"mesh/{feedback}/kernel_devices"] = np.asarray(len(kernel.sharding.device_set))


def main(out):
    assert len(jax.devices()) == 8, jax.devices()
    found = {}
    for feedback in RULES:
        train(feedback, found, "one")
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
    for feedback in RULES:
        train(feedback, found, "mesh")
    found["devices"] = np.asarray(len(keras.distribution.list_devices()))
    np.savez(out, **found)


if __name__ == "__main__":
    main(sys.argv[1])
