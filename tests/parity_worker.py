"""Run by tests/test_parity.py once per Keras backend (`KERAS_BACKEND` set by the caller):
writes, for the same weights and batches, every rule's outputs and gradients on every layer
family, and the weights after two training steps of every rule, to an `.npz` file; saves a
trained model for the other backend to load, and loads the other backend's.

    python tests/parity_worker.py compute OUT.npz SAVED.keras
    python tests/parity_worker.py load OTHER.keras OUT.npz

Weights are set from NumPy (`_set_weights`), not drawn by Keras's initializers (whose draws
differ between backends), so both processes start from identical values.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_wt  # noqa: E402
from keras_wt import backend  # noqa: E402
from keras_wt import layers as wt  # noqa: E402
from families import FAMILIES, family_model  # noqa: E402

RULES = ("bp", "fa", "ss", "wm", "kp", "frsf", "brsf", "dfa", "sa", "ia")
FAMILY_RULES = ("fa", "ss", "brsf", "sa")  # kp and wm send their error as fa does
# Rules whose training steps draw no random numbers outside `keras_wt.backend.stateless_bits`
# (the mirror's noise comes from the backend's own float transforms; see test_parity.py).
TRAINED_RULES = ("bp", "fa", "ss", "kp", "frsf", "brsf", "dfa", "sa", "ia")


def _set_weights(model, seed):
    rng = np.random.RandomState(seed)
    for index, variable in enumerate(sorted(model.weights, key=lambda v: v.path)):
        if "int" in str(variable.dtype):  # a [seed, step] state
            variable.assign(np.array([1000 + 17 * index, 5]).astype(variable.dtype))
        else:
            variable.assign(0.3 * rng.randn(*variable.shape).astype("float32"))


def _gradients(model, x, dy):
    """`{"y", "dx", path: gradient}` of `sum(model(x)·dy) + model's losses`."""
    trainable = model.trainable_variables
    non_trainable = [v.value for v in model.non_trainable_variables]

    def objective(x, *values):
        y, _, losses = model.stateless_call(list(values), non_trainable, x, return_losses=True)
        total = ops.sum(y * dy)
        for loss in losses:
            total = total + loss
        return total

    def gradients(x, *values):
        return backend.vjp(objective, (x, *values))

    if keras.backend.backend() == "jax":  # one compilation, not one per op (much faster)
        import jax

        gradients = jax.jit(gradients)
    x = ops.convert_to_tensor(x)
    y = model(x)
    grads = gradients(x, *[v.value for v in trainable])
    found = {"y": np.asarray(y), "dx": np.asarray(grads[0])}
    for variable, gradient in zip(trainable, grads[1:]):
        found[variable.path] = np.asarray(gradient)
    return found


def _mlp(feedback):
    model = keras.Sequential([
        keras.Input((8,)),
        wt.Dense(16, activation="tanh", feedback=feedback, name="hidden"),
        wt.Dense(3, feedback=feedback, name="top"),
    ], name=f"mlp_{feedback}")
    return keras_wt.dfa.maybe_direct(model, feedback)


def _compile(model, feedback):
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    if feedback == "kp":
        optimizer = keras_wt.optimizers.KolenPollack(optimizer, weight_decay=0.2)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def _batches():
    rng = np.random.RandomState(7)
    x = rng.randn(32, 8).astype("float32")
    return x, np.argmax(x @ rng.randn(8, 3), axis=1)


def compute(out, saved):
    found = {}
    for name, make, shape in FAMILIES:
        for feedback in FAMILY_RULES:
            model = family_model(make, feedback, shape)
            _set_weights(model, 1)
            rng = np.random.RandomState(2)
            x = rng.randn(*shape).astype("float32")
            dy = rng.randn(*model(x).shape).astype("float32")
            for key, value in _gradients(model, x, dy).items():
                found[f"gradients/{name}/{feedback}/{key}"] = value
    x, y = _batches()
    for feedback in RULES:
        model = _mlp(feedback)
        _set_weights(model, 3)
        dy = np.random.RandomState(4).randn(32, 3).astype("float32")
        for key, value in _gradients(model, x, dy).items():
            found[f"gradients/mlp/{feedback}/{key}"] = value
        if feedback in TRAINED_RULES:
            # Measuring advanced TensorFlow's per-step [seed, step] (a backward pass there),
            # not JAX's (a training forward pass there): start both from the same state.
            _set_weights(model, 3)
            _compile(model, feedback)
            model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # two steps
            for variable in model.weights:
                found[f"trained/{feedback}/{variable.path}"] = np.asarray(variable.value)
            if feedback == "kp":
                model.save(saved)
                found["saved/outputs"] = np.asarray(model(x))
    np.savez(out, **found)


def load(other, out):
    """Loads the other backend's saved Kolen–Pollack model, records its outputs, trains it two
    more steps and records its weights."""
    x, y = _batches()
    model = keras.saving.load_model(other)
    found = {"loaded/outputs": np.asarray(model(x))}
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for variable in model.weights:
        found[f"loaded/{variable.path}"] = np.asarray(variable.value)
    np.savez(out, **found)


if __name__ == "__main__":
    {"compute": compute, "load": load}[sys.argv[1]](*sys.argv[2:])
