"""Quick start: model.fit with keras_wt layers on Fashion-MNIST (offline), for one algorithm.

    python examples/quickstart.py --algo kp --epochs 2
"""

import argparse
import logging

import keras

import keras_wt
from keras_wt.algorithms import Learning
from keras_wt import layers as wt
from keras_wt.app.data import datasets

parser = argparse.ArgumentParser()
parser.add_argument("--algo", choices=keras_wt.ALGORITHMS, default="kp")
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")

train = datasets.load("fashion_mnist", "train", batch_size=128, flatten=True)
test = datasets.load("fashion_mnist", "test", batch_size=1000, flatten=True)
model = keras.Sequential([
    keras.Input((784,)),
    wt.Dense(256, activation="relu", feedback=args.algo),
    wt.Dense(10, feedback=args.algo),
])
learns = keras_wt.algorithms.get(args.algo).learns_feedback  # None, "optimizer" or "mirror"
optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
if learns == Learning.OPTIMIZER:  # Kolen-Pollack: W and B get identical updates and identical decay
    optimizer = keras_wt.optimizers.KolenPollack(optimizer, weight_decay=1e-3)
callbacks = []
if learns == Learning.MIRROR:  # weight mirror: B learns from noise between training steps
    callbacks.append(keras_wt.callbacks.MirrorCallback(learning_rate=0.05, noise_std=1.0, decay=1.0, warmup_steps=100))
model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
model.fit(train, epochs=args.epochs, callbacks=callbacks)

x, y = next(iter(test))
logging.info("test accuracy (%s): %.4f", keras_wt.algorithms.LONG_NAMES[args.algo], model.evaluate(test, verbose=0)[1])
logging.info("weight angles (deg): %s", {k: round(v, 1) for k, v in keras_wt.alignment.weight_angles(model).items()})
logging.info("delta angles (deg):  %s", {k: round(v, 1) for k, v in keras_wt.alignment.delta_angles(model, x, y).items()})
