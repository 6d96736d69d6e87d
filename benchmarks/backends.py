"""Step time of every rule against stock Keras, on the Keras backend it runs on (issue #23).

The reference MLP (784-500-10, sigmoid, batch 128; the first layer's unused `B` dropped, as
`keras-wt-train` builds it), compiled with `jit_compile=True`, for the stock Keras model and for
every rule (`kp` with `KolenPollack`, `wm` with `MirrorCallback`, its noise batch the training
batch, one mirror step after every training step, inside it, with the default Rademacher noise;
`wm/normal` with the normal noise that was the default before issue #21). Every variant trains with
`model.fit` on the same in-memory batches, `--steps` steps per `fit` call; the variants run
**interleaved, in a shuffled order per round**, in one process, so that machine drift hits them
alike. Reported: the median over rounds of each variant's time per step, its ratio to stock
Keras (median of the per-round ratios) with a 95% bootstrap interval over rounds.

Run it once per backend; each run's ratios are against stock Keras on the same backend in the
same process:

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/backends.py --write BENCHMARKS.md
    KERAS_BACKEND=jax .venv/bin/python benchmarks/backends.py --write BENCHMARKS.md

`--write` replaces the table between the `backends:<backend>` markers of the file (adding them
at its end if needed).
"""

import argparse
import datetime
import os
import platform
import time

import keras
import numpy as np

import keras_wt
from keras_wt import layers as wt

from markers import write_block  # benchmarks/markers.py

RULES = ("bp", "fa", "ss", "kp", "wm", "frsf", "brsf", "dfa", "sa", "ia")
# `wm` with normal noise, the default before issue #21 (`wm` itself has the default, Rademacher
# noise: ±σ from one random bit, no float transform of the generator's words)
NORMAL = "wm/normal"


def build(variant):
    keras.utils.set_random_seed(1)
    if variant == "keras":
        model = keras.Sequential([keras.Input((784,)),
                                  keras.layers.Dense(500, activation="sigmoid"),
                                  keras.layers.Dense(10)])
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        callbacks = []
    else:
        rule = variant.split("/")[0]
        model = keras.Sequential([keras.Input((784,)),
                                  wt.Dense(500, activation="sigmoid", feedback=rule),
                                  wt.Dense(10, feedback=rule)])
        model = keras_wt.dfa.maybe_direct(model, rule)
        keras_wt.drop_unused_feedback(model)
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        if rule == "kp":
            optimizer = keras_wt.optimizers.KolenPollack(optimizer, weight_decay=1e-4)
        callbacks = []
        if rule == "wm":
            noise = "normal" if variant == NORMAL else None  # None: the default
            callbacks = [keras_wt.callbacks.MirrorCallback(0.05, 1.0, decay=0.5, batch_size=128,
                                                           warmup_steps=0,
                                                           noise_distribution=noise)]
    model.compile(optimizer=optimizer, jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, callbacks


def measure(steps, rounds, variants, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.rand(128 * steps, 784).astype("float32")
    y = rng.randint(0, 10, 128 * steps)
    built = {v: build(v) for v in variants}
    for model, callbacks in built.values():  # compile and warm up
        model.fit(x, y, batch_size=128, epochs=2, verbose=0, callbacks=callbacks, shuffle=False)
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in rng.permutation(variants):
            model, callbacks = built[variant]
            start = time.perf_counter()
            model.fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=callbacks,
                      shuffle=False)
            times[variant].append((time.perf_counter() - start) / steps)
    return {v: np.asarray(t) for v, t in times.items()}


def table(times, steps, rounds):
    backend = keras.backend.backend()
    stock = times["keras"]
    rng = np.random.RandomState(1)
    lines = [
        f"Backend `{backend}` (Keras {keras.__version__}), {platform.processor() or 'CPU'} "
        f"with {os.cpu_count()} cores, {datetime.date.today()}: reference MLP, batch 128, "
        f"`jit_compile=True`, {steps} steps per `fit`, {rounds} interleaved rounds.",
        "",
        "| variant | ms / step (median) | × stock Keras (95% interval) |",
        "|---|---|---|",
    ]
    for variant, t in times.items():
        ratios = t / stock
        boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(2000)]
        low, high = np.percentile(boot, [2.5, 97.5])
        lines.append(f"| {'stock Keras' if variant == 'keras' else f'`{variant}`'} | "
                     f"{1000 * np.median(t):.2f} | {np.median(ratios):.2f} "
                     f"({low:.2f}–{high:.2f}) |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 rounds of bp, kp and wm")
    parser.add_argument("--write", metavar="FILE")
    args = parser.parse_args()
    variants = ("keras",) + (("bp", "kp", "wm") if args.quick else RULES + (NORMAL,))
    rounds = 3 if args.quick else args.rounds
    text = table(measure(args.steps, rounds, variants), args.steps, rounds)
    print(text)
    if args.write:
        write_block(args.write, text, f"backends:{keras.backend.backend()}")


if __name__ == "__main__":
    main()
