"""Epoch time of the reference MLP against training steps per host call (`steps_per_execution`),
as a ratio to one step per call in the same process (#21).

The reference MLP (784-500-10, sigmoid, summed sigmoid cross-entropy, plain SGD, batch 128)
with `--algo` (default `fa`) is fitted on random Fashion-MNIST-shaped data for `--steps` steps
per epoch (default 400, which every tested value divides) with each value of
`--steps_per_call`; every round fits each value once, in a shuffled order, for 2 epochs, and
times the second (the first traces). Printed: the median over rounds of each value's epoch time
over that of 1 step per call. The rule of `steps_per_execution="auto"`
(`keras_wt.app.config.MAX_STEPS_PER_EXECUTION`) rests on this table (BENCHMARKS.md).

    python benchmarks/steps_per_call.py --rounds 3
"""

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_wt  # noqa: E402
from keras_wt import models  # noqa: E402

BATCH = 128


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start


def epoch_seconds(algo, steps, steps_per_call, x, y):
    """Seconds of the second epoch of `steps` steps at `steps_per_call` steps per call."""
    keras.utils.set_random_seed(0)
    model = models.mlp(input_shape=(784,), hidden=(500,), feedback=algo, seed=0)
    model.compile(keras.optimizers.SGD(0.2), models.SummedSigmoidCrossEntropy(),
                  steps_per_execution=steps_per_call)
    timer = _EpochTimer()
    model.fit(x, y, batch_size=BATCH, epochs=2, steps_per_epoch=steps, shuffle=False,
              verbose=0, callbacks=[timer])
    return timer.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", default="fa", choices=keras_wt.ALGORITHMS)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--steps_per_call", type=int, nargs="+",
                        default=[1, 2, 5, 10, 20, 50, 100])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((args.steps * BATCH, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.steps * BATCH).astype("int32")
    times = {k: [] for k in args.steps_per_call}
    for _ in range(args.rounds):
        order = list(args.steps_per_call)
        random.shuffle(order)
        for k in order:
            times[k].append(epoch_seconds(args.algo, args.steps, k, x, y))
    base = statistics.median(times[1]) if 1 in times else None
    print(f"{args.algo}, {args.steps} steps per epoch, batch {BATCH}, {args.rounds} rounds")
    print("steps per call | epoch time / 1 step per call | ms per step")
    for k in args.steps_per_call:
        median = statistics.median(times[k])
        ratio = f"{median / base:.2f}" if base else "-"
        print(f"{k:>14} | {ratio:>28} | {1000 * median / args.steps:.2f}")


if __name__ == "__main__":
    main()
