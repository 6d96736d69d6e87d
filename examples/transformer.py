"""A small Transformer without weight transport: Fashion-MNIST rows as tokens.

Each image is a sequence of 28 tokens (its rows, with a one-hot row index appended as the
position). One stock Keras model is built once and `keras_wt.convert`ed to every algorithm
asked for, so all start from the same weights; its attention projections (query, key, value,
output) become feedback `EinsumDense` layers, while the attention products `QKᵀ` and `AV`,
which hold no weight, keep their exact gradients. Prints test accuracy and the angle between
W and B of the attention projections.

    python examples/transformer.py --algos bp fa kp wm --epochs 3 --train 30000   # ~2 min on 2 CPU cores
"""

import argparse
import logging

import keras
import numpy as np

import keras_wt
from keras_wt.app.data import datasets

parser = argparse.ArgumentParser()
parser.add_argument("--algos", nargs="+", choices=keras_wt.ALGORITHMS, default=["bp", "fa", "kp", "wm"])
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--train", type=int, default=30000, help="training images used")
parser.add_argument("--batch_size", type=int, default=128)
parser.add_argument("--kp_weight_decay", type=float, default=2.0)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")
keras.utils.set_random_seed(0)


def tokens(images):
    """(N, 28, 28, 1) uint8 images -> (N, 28, 56) float tokens: the row, then its position."""
    rows = images[..., 0].astype("float32") / 255.0
    positions = np.broadcast_to(np.eye(28, dtype="float32"), rows.shape[:1] + (28, 28))
    return np.concatenate([rows, positions], axis=-1)


def transformer(width=64, heads=4, mlp=128, classes=10):
    inputs = keras.Input((28, 56))
    h = keras.layers.Dense(width, name="embed")(inputs)
    a = keras.layers.MultiHeadAttention(heads, width // heads, name="attention")(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    m = keras.layers.Dense(mlp, activation="gelu")(h)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(width)(m))
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(classes)(h))


(x_train, y_train), (x_test, y_test) = datasets.load_numpy("fashion_mnist")
x_train, y_train = tokens(x_train[: args.train]), y_train[: args.train]
x_test = tokens(x_test)
stock = transformer()
results = {}
for algo in args.algos:
    model = keras_wt.convert(stock, algo, strict=True)
    optimizer = keras.optimizers.Adam(1e-3)
    callbacks = []
    learns = keras_wt.algorithms.get(algo).learns_feedback  # None, "optimizer" or "mirror"
    if learns == "optimizer":  # Kolen-Pollack: W and B get identical updates and decay
        optimizer = keras_wt.optimizers.KolenPollack(optimizer, weight_decay=args.kp_weight_decay)
    if learns == "mirror":  # weight mirror: B learns from noise between training steps
        callbacks.append(
            keras_wt.callbacks.MirrorCallback(
                learning_rate=0.1, noise_std=1.0, decay=0.5, batch_size=64, warmup_steps=100,
                noise_distribution="normal",  # the noise of RESULTS.md's runs
            )
        )
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, callbacks=callbacks, verbose=2)
    accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)[1]
    angles = {
        name.rsplit("_", 1)[-1]: angle
        for name, angle in keras_wt.alignment.weight_angles(model).items()
        if name.startswith("attention_")
    }
    results[algo] = accuracy, angles
    logging.info(
        "%-18s test accuracy %.4f; W-B angles of the attention projections (deg): %s",
        keras_wt.algorithms.LONG_NAMES[algo],
        accuracy,
        {name: round(value, 1) for name, value in angles.items()},
    )

logging.info("\n| algorithm | test accuracy | query | key | value | output |\n|---|---|---|---|---|---|")
for algo, (accuracy, angles) in results.items():
    logging.info(
        "| %s | %.4f | %s |", algo, accuracy, " | ".join(f"{angles[p]:.1f}" for p in ("query", "key", "value", "output"))
    )
