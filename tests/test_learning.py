"""Every algorithm learns a small synthetic task; WM, KP and SA align B with W, FA does not."""

import keras
import numpy as np
import pytest

import keras_wt
from keras_wt import layers as wt
from keras_wt.alignment import weight_angles
from keras_wt.callbacks import MirrorCallback
from keras_wt.optimizers import KolenPollack

RNG = np.random.RandomState(0)
X = RNG.randn(512, 10).astype("float32")
# A nonlinear teacher the network must learn through its hidden layers.
TEACHER = RNG.randn(10, 3)
Y = np.argmax(np.tanh(X @ TEACHER) + 0.3 * np.sin(3 * X[:, :3]), axis=1)


def _train(feedback, epochs=15):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            wt.Dense(32, activation="tanh", feedback=feedback),
            wt.Dense(32, activation="tanh", feedback=feedback),
            wt.Dense(3, feedback=feedback),
        ]
    )
    model = keras_wt.dfa.maybe_direct(model, feedback)  # dfa: the output error's route
    sgd = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer = KolenPollack(sgd, weight_decay=0.5) if feedback == "kp" else sgd
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    callbacks = []
    if feedback == "wm":
        callbacks.append(MirrorCallback(learning_rate=0.05, noise_std=1.0, decay=0.5, batch_size=64))
    before = weight_angles(model)
    initial_loss = model.evaluate(X, Y, verbose=0)[0]
    history = model.fit(X, Y, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks)
    return model, initial_loss, history.history["loss"][-1], before, weight_angles(model)


@pytest.mark.parametrize("feedback", keras_wt.ALGORITHMS)
def test_every_algorithm_lowers_the_training_loss(feedback):
    model, initial, final, before, after = _train(feedback)
    assert final < 0.6 * initial, (initial, final)
    accuracy = model.evaluate(X, Y, verbose=0)[1]
    assert accuracy > 0.7, accuracy  # chance: about 1/3
    if feedback == "sa":  # B → W by its local loss
        assert all(angle < 10 for angle in after.values()), after
    hidden = [name for name in after][:2]
    if feedback in ("wm", "kp"):
        for name in hidden:
            assert before[name] > 60
            assert after[name] < 0.5 * before[name], (before, after)
            assert after[name] < 25, after
    if feedback == "fa":
        assert all(angle > 20 for angle in after.values()), after
