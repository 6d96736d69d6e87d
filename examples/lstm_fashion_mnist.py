"""An LSTM (or GRU) without weight transport, reading Fashion-MNIST row by row.

Each image is a sequence of 28 time steps of 28 pixels. The recurrent layer's input kernel and
recurrent kernel each carry a feedback kernel: the error crosses the input kernel through
`B_in` and every time step through `B_rec` (DESIGN.md §1). Writes a JSON file with, per epoch,
the training loss and accuracy, the test accuracy, and the weight angle (W vs B) and delta angle
(the error the rule sends vs backprop's, on a fixed probe batch) of every feedback layer:
`<name>_input`, `<name>_recurrent` and the classifier.

    python examples/lstm_fashion_mnist.py --algo kp --epochs 3 --out lstm_kp.json
    python examples/lstm_fashion_mnist.py --algo wm --cell gru --limit 5000 --epochs 1   # quick look

Every rule of `keras_wt.ALGORITHMS` but `dfa` (which the recurrent layers refuse) runs: `kp`
trains with `KolenPollack`, `wm` with `MirrorCallback`, `sa`/`ia` learn `B` through the model's
own optimizer.
"""

import argparse
import json
import logging

import keras

import keras_wt
from keras_wt.algorithms import Learning
from keras_wt import layers as wt
from keras_wt.app.data import datasets

RULES = tuple(a for a in keras_wt.ALGORITHMS if not keras_wt.algorithms.get(a).direct)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", choices=RULES, default="kp")
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Adam's")
    parser.add_argument("--kp_weight_decay", type=float, default=2.0, help="λ of KolenPollack (B − W shrinks by 1 − lr·λ per step)")
    parser.add_argument("--weight_decay", type=float, default=0.0,
                        help="Adam's decoupled decay of the kernels (not biases), for rules other than kp: "
                             "the same decay as KolenPollack's λ, as a control (backprop with KP's decay)")
    parser.add_argument("--mirror_learning_rate", type=float, default=0.1, help="η_m of MirrorCallback (wm)")
    parser.add_argument("--mirror_noise_std", type=float, default=1.0, help="σ of the mirror noise (wm)")
    parser.add_argument("--mirror_decay", type=float, default=1.0,
                        help="λ_m of the mirror (wm): B settles at (σ²/λ_m)·W. Keep σ²/λ_m = 1: with B_rec = c·W_rec "
                             "the error is scaled by c at each crossing of the recurrent kernel, c^k after k "
                             "steps, while the cell state's path is not (0.5, c = 2: 31 %% test accuracy after "
                             "3 epochs, delta angles 90°; 1.0: 84.6 %%; RESULTS.md)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="training images used (default: all)")
    parser.add_argument("--test_limit", type=int, default=None, help="test images used (default: all)")
    parser.add_argument("--probe", type=int, default=256, help="test images of the delta-angle probe")
    parser.add_argument("--data_dir", default=None, help="where the Fashion-MNIST files are")
    parser.add_argument("--out", default=None, help="JSON file of the per-epoch results")
    parser.add_argument("--verbose", type=int, default=2)
    return parser.parse_args(argv)


def rows(images):
    """(N, 28, 28, 1) uint8 images -> (N, 28, 28) float sequences: 28 steps of 28 pixels."""
    return images[..., 0].astype("float32") / 255.0


def build(args):
    layer = {"lstm": wt.LSTM, "gru": wt.GRU}[args.cell]
    inputs = keras.Input((28, 28))
    h = layer(args.units, feedback=args.algo, name=args.cell)(inputs)
    outputs = wt.Dense(10, feedback=args.algo, name="classifier")(h)
    return keras.Model(inputs, outputs, name=f"{args.cell}_{args.algo}")


def training_setup(algo, args):
    """The optimizer and callbacks each rule needs."""
    optimizer = keras.optimizers.Adam(args.learning_rate, weight_decay=args.weight_decay or None)
    if args.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    callbacks = []
    learns = keras_wt.algorithms.get(algo).learns_feedback  # None, "optimizer", "mirror", "loss"
    if learns == Learning.OPTIMIZER:  # Kolen-Pollack: W and B get identical updates and decay
        optimizer = keras_wt.optimizers.KolenPollack(optimizer, weight_decay=args.kp_weight_decay)
    if learns == Learning.MIRROR:  # weight mirror: B learns from noise, each kernel from its own
        callbacks.append(keras_wt.callbacks.MirrorCallback(
            learning_rate=args.mirror_learning_rate, noise_std=args.mirror_noise_std,
            decay=args.mirror_decay, noise_distribution="normal",  # as RESULTS.md ran
            batch_size="auto", warmup_steps=100))
    return optimizer, callbacks


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = datasets.load_numpy("fashion_mnist", args.data_dir)
    x_train, y_train = rows(x_train[: args.limit]), y_train[: args.limit]
    x_test, y_test = rows(x_test[: args.test_limit]), y_test[: args.test_limit]
    model = build(args)
    optimizer, callbacks = training_setup(args.algo, args)
    probe = (x_test[: args.probe], y_test[: args.probe])
    callbacks.append(keras_wt.callbacks.AlignmentCallback(probe))
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(
        x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
        validation_data=(x_test, y_test), callbacks=callbacks, verbose=args.verbose,
    ).history
    epochs = []
    for epoch in range(len(history["loss"])):
        def angles(kind, epoch=epoch):
            prefix = f"{kind}/"
            return {key[len(prefix):]: float(values[epoch]) for key, values in history.items()
                    if key.startswith(prefix)}

        epochs.append({
            "epoch": epoch + 1,
            "loss": float(history["loss"][epoch]),
            "accuracy": float(history["accuracy"][epoch]),
            "test_accuracy": float(history["val_accuracy"][epoch]),
            "weight_angle": angles("weight_angle"),
            "delta_angle": angles("delta_angle"),
            "gradient_angle": angles("gradient_angle"),
            "norm_ratio": angles("norm_ratio"),
        })
        logging.info(
            "epoch %d: test accuracy %.4f; weight angles %s; delta angles %s",
            epoch + 1, epochs[-1]["test_accuracy"],
            {k: round(v, 1) for k, v in epochs[-1]["weight_angle"].items()},
            {k: round(v, 1) for k, v in epochs[-1]["delta_angle"].items()},
        )
    result = {"algo": args.algo, "cell": args.cell, "units": args.units, "seed": args.seed,
              "train_examples": int(len(x_train)), "epochs": epochs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, allow_nan=True)
    return result


if __name__ == "__main__":
    main()
