"""The convnet recipe's training step with `bp`, `kp` and `wm` (issue #21, items 4 and 5).

Each network is built, compiled and given its mirror exactly as `keras-wt-train` builds them
(`keras_wt.app`: the recipe's SGD with momentum, cosine schedule and weight decay; Kolen–Pollack's
decay budget; the first layer's unused `B` dropped), and trained with `model.fit` on the same
in-memory random batches, `--steps` steps per `fit` call and per host call. Variants:

* `bp`, `kp`;
* `wm`: the recipe's weight mirror today (`keras_wt.app.config.RECIPE_MIRROR` with the budget
  `RECIPE_MIRROR_COST`: noise batches for 8°, at most 2,048, the mirror's products at most a
  tenth of the training step's, the layers over that budget sharing a common cap and mirroring
  at their own smaller rates; Rademacher noise);
* `wm (v3)`: the recipe's second cheaper mirror in issue #21 (`RECIPE_MIRROR_V3`: normal noise
  and a budget of a fifth of the step, `RECIPE_MIRROR_V3_COST`); `wm (v3, ±σ)`: that budget
  with today's Rademacher noise;
* `wm (cap 128)`: the recipe's first cheaper mirror in issue #21 (`RECIPE_MIRROR_V2`, no
  budget: at most 128 per layer, a capped layer at its own rate);
* `wm (v1)`: the recipe before issue #21 (`RECIPE_MIRROR_V1`, no budget: at most 2,048 per
  layer, every layer at η = 0.05);
* `wm (n = batch)`: a noise batch equal to the training batch at every layer (the rows of
  `step_time.py`);
* `wm (every 2)`: today's, mirroring after every second training step (`--mirror_every 2`),
  with the budget's noise batches doubled (the same samples per training step, half the
  mirror steps).

`resnet18-224` is one replica of the ImageNet recipe on a v3-8 (the global batch of 1024): 128
images at 224² and, for `wm`, an eighth of each layer's noise batch (every noise batch is split
over the replicas; the rates do not change the cost). Warm-up mirror steps are left out (they
run once, before training). The variants run
**interleaved, in a shuffled order per round**, in one process; reported are the median time per
step and its ratio to `bp` (the median of the per-round ratios, with a 95% bootstrap interval),
without XLA (the trainer compiles with XLA by default, which on this CPU makes the convnets' own
steps several times slower: no guide to an accelerator).

Per layer, the mirror's share: each `wm` layer's noise batch `n` and rate `η`, and the time of
that layer's mirror step alone (a `WeightMirror` of that one layer, on a copy of the network),
as a fraction of `bp`'s step.

    .venv/bin/python benchmarks/recipe_step.py --write BENCHMARKS.md
    .venv/bin/python benchmarks/recipe_step.py --models cnn --rounds 3     # a quick look
    .venv/bin/python benchmarks/recipe_step.py --models cnn --clock cpu    # the work, not the VM

`--clock cpu` times the steps in the process's CPU time (all threads), which a VM's steal time
and speed switches do not enter: the work each variant does (with the thread pools' spinning).

`--write` replaces the table between the `recipe-step` markers of the file.
"""

import argparse
import dataclasses
import datetime
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_wt  # noqa: E402
from keras_wt.app import callbacks as app_callbacks  # noqa: E402
from keras_wt.app import cli, published, training  # noqa: E402
from keras_wt.app.config import (RECIPE_MIRROR, RECIPE_MIRROR_V1,  # noqa: E402
                                 RECIPE_MIRROR_V2, RECIPE_MIRROR_V3, RECIPE_MIRROR_V3_COST,
                                 DataConfig, ModelConfig)

from markers import write_block  # noqa: E402  (benchmarks/markers.py)

# name -> (keras_wt.models name, input shape, classes, training batch, replicas emulated)
NETWORKS = {
    "cnn": ("cnn", (28, 28, 1), 10, 128, 1),
    "resnet18-32": ("resnet18", (32, 32, 3), 10, 64, 1),
    # One replica of the ImageNet recipe on a v3-8: 128 of the global 1024 images, and 1/8 of
    # each layer's noise batch (the mirror splits every noise batch over the replicas).
    "resnet18-224": ("resnet18", (224, 224, 3), 1000, 128, 8),
}
# Without XLA: on this CPU XLA makes the convnets' own steps 2–7x slower (BENCHMARKS.md, "Not
# keras_wt: XLA on CPU"), which is no guide to an accelerator; the trainer's default is XLA.
JIT_COMPILE = False
VARIANTS = {  # name: (algo, mirror, the budget TrainConfig.mirror_cost, or None: the recipe's)
    "bp": ("bp", None, None),
    "kp": ("kp", None, None),
    "wm": ("wm", RECIPE_MIRROR, None),
    "wm (v3)": ("wm", RECIPE_MIRROR_V3, RECIPE_MIRROR_V3_COST),
    "wm (v3, ±σ)": ("wm", RECIPE_MIRROR, RECIPE_MIRROR_V3_COST),
    "wm (cap 128)": ("wm", RECIPE_MIRROR_V2, 0.0),
    "wm (v1)": ("wm", RECIPE_MIRROR_V1, 0.0),
    "wm (n = batch)": ("wm", "batch", None),
    "wm (every 2)": ("wm", dataclasses.replace(RECIPE_MIRROR, every=2), None),
}
# The variants whose mirror is timed layer by layer.
SHARES = ("wm", "wm (v3)", "wm (cap 128)", "wm (v1)")


def config_for(network, variant):
    name, shape, classes, batch, replicas = NETWORKS[network]
    algo, mirror, cost = VARIANTS[variant]
    flags, _ = cli.parse_args(["--model", "cnn", "--algo", algo,
                                             "--dataset", "fashion_mnist"])
    config = published.train_config(flags)  # the convnet recipe: optimizer, decay budget
    if mirror == "batch":
        mirror = dataclasses.replace(RECIPE_MIRROR, batch_size=batch * replicas)
    mirror = dataclasses.replace(mirror or RECIPE_MIRROR, warmup_steps=0, seed=config.seed)
    config = dataclasses.replace(
        config, data=DataConfig(dataset="fashion_mnist", batch_size=batch, num_classes=classes),
        model=ModelConfig(name=name, options={} if name.startswith("resnet")
                          else config.model.options, dtype="float32"),
        mirror=mirror, model_dir=None,
    )
    if cost is not None:
        config.mirror_cost = cost
    # The whole run's mirror: its budget from the global batch (all replicas together).
    whole = dataclasses.replace(config, data=dataclasses.replace(
        config.data, batch_size=batch * replicas))
    config.mirror = whole.resolved_mirror(0)
    return config, shape


def build(network, variant, steps):
    config, shape = config_for(network, variant)
    keras.utils.set_random_seed(1)
    model = training.build_model(config, shape)
    config.jit_compile = JIT_COMPILE
    training.compile_model(model, config, steps_per_epoch=5 * steps, steps_per_execution=steps)
    replicas = NETWORKS[network][4]
    if replicas > 1 and config.algo == "wm":  # one replica's share of every noise batch
        mirror = keras_wt.mirror.WeightMirror(model, config=config.mirror)
        config.mirror = dataclasses.replace(config.mirror, max_cost=None, batch_size={
            key: -(-n // replicas) for key, n in zip(mirror.keys, mirror.batch_sizes)})
    callback = app_callbacks.create_mirror_callback(model, config.mirror)
    return model, [callback] if callback else [], config


def batches(network, steps, seed=0):
    _, shape, classes, batch, _ = NETWORKS[network]
    rng = np.random.RandomState(seed)
    return (rng.rand(batch * steps, *shape).astype("float32"),
            rng.randint(0, classes, batch * steps))


# `--clock`: wall time, or the process's CPU time (every thread's), which a VM's steal time and
# speed switches leave out: the work each variant does.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(network, variants, steps, rounds, seed=0, clock="wall"):
    x, y = batches(network, steps, seed)
    batch = NETWORKS[network][3]
    built = {v: build(network, v, steps) for v in variants}
    for model, callbacks, _ in built.values():  # compile and warm up
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks,
                  shuffle=False)
    rng = np.random.RandomState(seed)
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in rng.permutation(list(variants)):
            model, callbacks, _ = built[variant]
            start = CLOCKS[clock]()
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks,
                      shuffle=False)
            times[variant].append((CLOCKS[clock]() - start) / steps)
    mirrors = {v: cbs[0].mirror for v, (_, cbs, _) in built.items() if cbs}
    return {v: np.asarray(t) for v, t in times.items()}, mirrors


def layer_shares(network, variant, bp_seconds, repeats):
    """Per `wm` layer of `variant`: (key, n, η, median seconds of its mirror step alone, as a
    fraction of `bp_seconds`), `n` the noise batch of the whole run (a replica draws
    `n / replicas` of it, what is timed)."""
    model, _, config = build(network, variant, steps=1)
    recipe = keras_wt.mirror.WeightMirror(model, config=config_for(network, variant)[0].mirror)
    timed = keras_wt.mirror.WeightMirror(model, config=config.mirror)
    rows = []
    for index, (layer, key) in enumerate(zip(recipe.layers, recipe.keys)):
        alone = keras_wt.mirror.WeightMirror([layer], config=dataclasses.replace(
            config.mirror, batch_size=timed.batch_sizes[index]))
        alone(0)  # trace
        seconds = []
        for counter in range(1, repeats + 1):
            start = time.perf_counter()
            alone(counter)
            seconds.append(time.perf_counter() - start)
        rows.append((key, recipe.batch_sizes[index], recipe.learning_rates[index],
                     float(np.median(seconds)) / bp_seconds))
    return rows


def ratio_interval(ratios, rng, resamples=2000):
    boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(resamples)]
    return np.percentile(boot, [2.5, 97.5])


def report(results, clock="wall"):
    rng = np.random.RandomState(1)
    measured = "wall time" if clock == "wall" else "the process's CPU time (all threads)"
    lines = [
        f"keras_wt {keras_wt.__version__}, Keras {keras.__version__} "
        f"({keras.backend.backend()}), {platform.processor() or 'CPU'} with {os.cpu_count()} "
        f"cores, {datetime.date.today()}: `rounds` interleaved rounds of `steps` steps per `fit` "
        f"call and per host call, without XLA (on this CPU XLA makes the convnets' steps several "
        f"times slower); steps timed in {measured}.",
        "",
        "| network | batch | steps | rounds | variant | ms / step | × `bp` (95% interval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for network, (times, steps, rounds, _) in results.items():
        batch = NETWORKS[network][3]
        for variant, t in times.items():
            low, high = ratio_interval(t / times["bp"], rng)
            lines.append(f"| {network} | {batch} | {steps} | {rounds} | `{variant}` | "
                         f"{1000 * np.median(t):.1f} | {np.median(t / times['bp']):.2f} "
                         f"({low:.2f}–{high:.2f}) |")
    lines += ["", "Per `wm` layer (the recipe, and before it): its noise batch `n`, its rate `η`, "
              "and its mirror step alone as a fraction of `bp`'s step.", "",
              "| network | recipe | layer | n | η | mirror step / `bp` step |",
              "|---|---|---|---|---|---|"]
    for network, (_, _, _, shares) in results.items():
        for variant, rows in shares.items():
            for key, n, eta, share in rows:
                lines.append(f"| {network} | `{variant}` | {key} | {n} | {eta:.3g} | "
                             f"{share:.3f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="time the steps in wall time or in the process's CPU time")
    parser.add_argument("--write", metavar="FILE")
    args = parser.parse_args()
    variants = ["bp"] + [v for v in args.variants if v != "bp"]
    results = {}
    for network in args.models:
        steps = 1 if network == "resnet18-224" else args.steps
        rounds = min(args.rounds, 5) if network == "resnet18-224" else args.rounds
        times, _ = measure(network, variants, steps, rounds, clock=args.clock)
        bp_seconds = float(np.median(times["bp"]))
        shares = {v: layer_shares(network, v, bp_seconds, repeats=max(args.rounds, 5))
                  for v in variants if v in SHARES}
        results[network] = (times, steps, rounds, shares)
        print(report({network: results[network]}, args.clock), flush=True)
    text = report(results, args.clock)
    print(text)
    if args.write:
        write_block(args.write, text, "recipe-step")


if __name__ == "__main__":
    main()
