"""Seconds per epoch of the reference MLP as `keras-wt-train` trains it, against stock Keras (#12).

Every run trains the reference MLP (784-500-10, sigmoid, summed sigmoid cross-entropy, plain
SGD at the published learning rate, batch 128, Fashion-MNIST, 469 steps per epoch) on the
trainer's own input pipeline (`keras_wt.app.data.pipelines.train_dataset`: every epoch's order a function
of `(seed, epoch)`) for `--epochs` epochs; the first `--skip` (2: tracing, and the trainer's
retrace at the steps per call it tunes after its first epoch) are not counted. Measured per
epoch by a callback: **training** (from `on_epoch_begin` to the start of evaluation, or to
`on_epoch_end` when the epoch is not evaluated) and the **whole epoch** (to the end of every
other callback's `on_epoch_end`: evaluation of the 10,000 test images and the alignment probe).

Versions:

* `keras`, `keras spe=<k>`: the stock Keras MLP (the `bp` model stripped to
  `keras.layers.Dense`, same weights) compiled like the trainer (same loss, optimizer, metric),
  at 1 or `k` steps per call, and fitted on the same dataset with no callbacks and no
  evaluation: the tight stock loop. Each version is divided by the stock loop at the steps per
  call of its counted epochs (the trainer's `"auto"` tunes them after the first epoch:
  `keras_wt.app.config.TrainConfig.tuned_steps_per_execution`);
* `hand-written XLA loop`: the MLP's epoch with no Keras and no `tf.data` (`run_loop`): its
  step written by hand, the whole epoch in one XLA call over the images held in memory;
  divided by the stock loop at a whole epoch per call. A floor for what any Keras loop could
  reach on this CPU, not a way to train;
* `<algo>`: `keras_wt.app.training.train` with `keras_wt.app.published.train_config` of
  `keras-wt-train --algo <algo>` (alignment probe and evaluation every epoch; no run folder, so
  nothing written), except that the first layer's `B`, which no gradient uses, is dropped
  (`keep_unused_feedback=False`; the CLI keeps it for the published figures);
* `<algo> as published`: what `keras-wt-train --algo <algo>` runs: that `B` kept (and updated
  or mirrored), with `steps_per_execution="auto"`;
* `<algo> before #12`: the `B` kept and one step per call, as the CLI ran before issue #12;
* `wm no mirror steps`: `wm` with `mirror_every` beyond the run (the mirror's share of `wm`);
* `bp run folder`: `bp` writing its run folder (results, CSV, TensorBoard, backup) each epoch;
* `published code <algo>` (with `--published_dir`, for bp, fa, kp, wm): the published NumPy
  code's own epoch, in a child process with its own OpenBLAS kernel (`published_code.py`); the
  `/ published` column divides each keras_wt version by the published code of its algorithm.

Runs are interleaved: every round runs each version once, in a shuffled order, so machine
drift hits all alike; each figure is the median over rounds of a run's median epoch.

Two floors are printed: the MLP's FLOPs per epoch (2·3 products per layer and example, minus the
first layer's input gradient) at the machine's peak matmul rate (a large square matmul) and at
the rate of the MLP's own products (its three matmul shapes, timed alone).

Usage (from the repository root; pause other jobs for numbers worth recording):

    python benchmarks/epoch_time.py --rounds 3 --epochs 4 [--published_dir CHECKOUT]
"""

import argparse
import dataclasses
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_wt  # noqa: E402
from keras_wt.app import published  # noqa: E402
from keras_wt.app import training  # noqa: E402
from keras_wt.app.cli import parse_args as cli_args  # noqa: E402
from keras_wt.app.data.datasets import load_numpy  # noqa: E402
from keras_wt.app.data.pipelines import epoch_permutation  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import published_code  # noqa: E402

logger = logging.getLogger("keras_wt.benchmarks")


class EpochTimer(keras.callbacks.Callback):
    """Training seconds (epoch begin → evaluation begin or epoch end) and whole-epoch seconds."""

    def __init__(self):
        super().__init__()
        self.train, self.whole = [], []
        self._start = self._train_end = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._train_end = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if self._start is not None and self._train_end is None:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = time.perf_counter()
        self.train.append((self._train_end or end) - self._start)
        self.whole.append(end - self._start)

    def on_train_end(self, logs=None):
        self.steps_per_execution = self.model.steps_per_execution  # the last epochs'


def _config(algo, epochs, **overrides):
    flags, _ = cli_args(["--algo", algo, "--n_epochs", str(epochs), "--verbose", "0"])
    config = published.train_config(flags)
    config.model_dir = None
    for key, value in overrides.items():  # a component's setting as <component>_<field>
        if key == "keep_unused_feedback":
            config.model = dataclasses.replace(config.model, keep_unused_feedback=value)
        elif key.startswith("mirror_"):
            config.mirror = dataclasses.replace(config.mirror, **{key[len("mirror_"):]: value})
        else:
            setattr(config, key, value)
    return config


def run_cli(algo, epochs, **overrides):
    """`keras_wt.app.training.train` as `keras-wt-train --algo <algo>` runs it (with overrides)."""
    timer = EpochTimer()
    if overrides.get("model_dir") == "<tmp>":
        with tempfile.TemporaryDirectory() as directory:
            overrides["model_dir"] = directory
            training.train(_config(algo, epochs, **overrides), callbacks=[timer])
    else:
        training.train(_config(algo, epochs, **overrides), callbacks=[timer])
    return timer


def run_stock(epochs, steps_per_execution=1, jit_compile=None):
    """The stock Keras MLP, compiled like the trainer, fitted on the trainer's dataset."""
    config = _config("bp", epochs, steps_per_execution=steps_per_execution)
    keras.utils.set_random_seed(config.seed)
    make_train, _, input_shape, num_train = training._data(config)
    steps = config.data.resolved_steps_per_epoch(num_train)
    model = keras_wt.strip(training.build_model(config, input_shape))
    config.jit_compile = jit_compile  # None: as the trainer (XLA on a CPU or GPU)
    training.compile_model(model, config, steps)
    timer = EpochTimer()
    model.fit(make_train(0), epochs=epochs, steps_per_epoch=steps, callbacks=[timer], verbose=0)
    return timer


def _rate(shapes, repeats):
    """GFLOP/s of `tf.matmul` over `shapes` [(m, k, n)], timed in a compiled loop."""
    mats = [(tf.random.normal((m, k)), tf.random.normal((k, n))) for m, k, n in shapes]

    @tf.function
    def products():
        return [tf.reduce_sum(tf.matmul(a, b)) for a, b in mats]

    products()
    start = time.perf_counter()
    for _ in range(repeats):
        [t.numpy() for t in products()]
    seconds = (time.perf_counter() - start) / repeats
    return sum(2 * m * k * n for m, k, n in shapes) / seconds / 1e9


def floors(batch=128, widths=(784, 500, 10), examples=60000):
    """`(flops per epoch, peak GFLOP/s, MLP GFLOP/s, floor at peak s, floor at MLP rate s)`."""
    layers = list(zip(widths[:-1], widths[1:]))
    # forward, kernel gradient and (except the first layer) input gradient, per layer.
    shapes = []
    for i, (d_in, d_out) in enumerate(layers):
        shapes += [(batch, d_in, d_out), (d_in, batch, d_out)]
        if i:
            shapes.append((batch, d_out, d_in))
    flops = sum(2 * m * k * n for m, k, n in shapes) * examples / batch
    peak = _rate([(2048, 2048, 2048)], 5)
    mlp = _rate(shapes, 200)
    return flops, peak, mlp, flops / peak / 1e9, flops / mlp / 1e9


VERSIONS = {
    # name: (kind, algo, overrides)
    "keras": ("stock", None, {}),
    "keras spe=7": ("stock", None, {"steps_per_execution": 7}),
    "keras spe=67": ("stock", None, {"steps_per_execution": 67}),
    "keras spe=469": ("stock", None, {"steps_per_execution": 469}),
    "keras no XLA": ("stock", None, {"jit_compile": False}),
    "hand-written XLA loop": ("loop", None, {}),
}


def run_loop(epochs):
    """The MLP's epoch without Keras or `tf.data`: its forward pass, gradients and SGD step written
    by hand, the whole epoch in one XLA call (a `tf.while_loop` over its 469 batches of 128, each
    gathered from the scaled training images held in memory in the trainer's shuffled order;
    the last wraps around to the epoch's start, so every batch is full). What this CPU does with
    the MLP's arithmetic when nothing else is in the way: not a loop anyone trains with."""
    config = _config("bp", epochs)
    (x, y), _ = load_numpy(config.data.dataset)
    x = tf.constant(x.reshape(len(x), -1).astype("float32") / 255.0)
    y = tf.one_hot(tf.constant(y.astype("int32")), 10)
    n, batch = int(x.shape[0]), config.data.batch_size
    steps = -(-n // batch)
    rng = tf.random.Generator.from_seed(config.seed)
    widths = (784, 500, 10)
    kernels = [tf.Variable(rng.normal((a, b)) * 0.05) for a, b in zip(widths[:-1], widths[1:])]
    biases = [tf.Variable(tf.zeros(b)) for b in widths[1:]]
    variables = kernels + biases
    learning_rate = config.optimizer.learning_rate

    def step(images, labels):
        with tf.GradientTape() as tape:
            h = tf.sigmoid(images @ kernels[0] + biases[0])
            logits = h @ kernels[1] + biases[1]
            loss = tf.reduce_mean(tf.reduce_sum(
                tf.nn.sigmoid_cross_entropy_with_logits(labels, logits), axis=-1))
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(learning_rate * g)
        return loss

    @tf.function(jit_compile=True)
    def epoch(order):
        def body(i, total):
            index = tf.gather(order, (i * batch + tf.range(batch)) % n)
            return i + 1, total + step(tf.gather(x, index), tf.gather(y, index))
        return tf.while_loop(lambda i, _: i < steps, body, (0, 0.0))[1]

    timer = EpochTimer()
    for e in range(epochs):
        order = epoch_permutation(n, config.seed, e)
        start = time.perf_counter()
        epoch(order).numpy()
        timer.train.append(time.perf_counter() - start)
    timer.whole = [math.nan] * epochs
    timer.steps_per_execution = steps
    return timer


def run_published(published_dir, algo, epochs, data_path):
    """The published code's epochs (training only; it has no whole-epoch figure here)."""
    timer = EpochTimer()
    timer.train = published_code.epoch_seconds(published_dir, algo, epochs, data_path)
    timer.whole = [math.nan] * len(timer.train)
    timer.steps_per_execution = None
    return timer


def versions(algos, extra, extra_algos, published_dir=None):
    table = dict(VERSIONS)
    for algo in algos:
        if published_dir and algo in published_code.CLASSES:
            table[f"published code {algo}"] = ("published", algo, {})
        table[f"{algo}"] = ("cli", algo, {"keep_unused_feedback": False})
        if "published" in extra and algo in extra_algos:
            table[f"{algo} as published"] = ("cli", algo, {})
        if "before" in extra and algo in extra_algos:
            table[f"{algo} before #12"] = ("cli", algo, {"steps_per_execution": 1})
        if "nomirror" in extra and algo == "wm":
            table["wm no mirror steps"] = (
                "cli", algo, {"keep_unused_feedback": False, "mirror_every": 10**9})
        if "runfolder" in extra and algo == "bp":
            table["bp run folder"] = ("cli", algo, {"keep_unused_feedback": False,
                                                    "model_dir": "<tmp>"})
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=list(keras_wt.ALGORITHMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs per run (the first --skip not counted)")
    parser.add_argument("--skip", type=int, default=2,
                        help="first epochs not counted: tracing, and the trainer's retrace at "
                        "its tuned steps per call")
    parser.add_argument("--extra", nargs="*", default=["published", "before", "nomirror",
                                                        "runfolder"],
                        help="extra versions (module docstring): published, before, nomirror, "
                        "runfolder")
    parser.add_argument("--extra-algos", nargs="*", default=["bp", "kp", "wm"],
                        help="the algorithms that get the 'published' and 'before' versions")
    parser.add_argument("--only", nargs="*", help="run only these version names")
    parser.add_argument("--published_dir",
                        help="a checkout of the published code: adds its epochs (bp, fa, kp, wm)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("keras_wt").setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)  # each run's figures (a child of the logger silenced above)
    table = versions(args.algos, args.extra, args.extra_algos, args.published_dir)
    data_dir = tempfile.TemporaryDirectory()
    data_path = os.path.join(data_dir.name, "fashion_mnist.npz")
    if args.published_dir:
        published_code.check_checkout(args.published_dir)
        published_code.save_data(data_path, load_numpy("fashion_mnist"))
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only}
    results = {name: ([], []) for name in table}
    calls = {}  # name -> the steps per call of its counted epochs
    rng = random.Random(0)
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        order = list(table)
        rng.shuffle(order)
        for name in order:
            kind, algo, overrides = table[name]
            if kind == "stock":
                timer = run_stock(args.epochs, **overrides)
            elif kind == "loop":
                timer = run_loop(args.epochs)
            elif kind == "published":
                timer = run_published(args.published_dir, algo, args.epochs, data_path)
            else:
                timer = run_cli(algo, args.epochs, **overrides)
            results[name][0].append(statistics.median(timer.train[args.skip:]))
            results[name][1].append(statistics.median(timer.whole[args.skip:]))
            calls[name] = timer.steps_per_execution
            logger.info("%s: training %.3f s, whole epoch %.3f s (load %.1f)", name,
                        results[name][0][-1], results[name][1][-1], os.getloadavg()[0])
    load.append(os.getloadavg()[0])
    data_dir.cleanup()
    flops, peak, mlp_rate, floor_peak, floor_mlp = floors()
    # Each version against the stock loop at its own steps per call (that of its counted epochs).
    stock = {calls[name]: statistics.median(results[name][0])
             for name in results if table[name][0] == "stock" and name != "keras no XLA"}
    # (The hand-written loop, one call per epoch, against the stock loop at 469 steps per call.)
    lines = [
        f"1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end; "
        f"{args.rounds} rounds x {args.epochs} epochs (the first {args.skip} not counted), "
        "medians.",
        f"Floors: {flops / 1e9:.1f} GFLOP per epoch; peak matmul {peak:.0f} GFLOP/s -> "
        f"{floor_peak:.2f} s; the MLP's own products {mlp_rate:.0f} GFLOP/s -> {floor_mlp:.2f} s.",
        "",
        "| version | steps per call | training s/epoch | / keras at its steps per call | "
        "/ published | whole epoch s (eval + probe) |",
        "|---|---|---|---|---|---|",
    ]
    for name, (train, whole) in results.items():
        t, w = statistics.median(train), statistics.median(whole)
        algo = table[name][1]
        code = results.get(f"published code {algo}")
        against = "—" if code is None else f"{t / statistics.median(code[0]):.2f}"
        whole_text = "—" if math.isnan(w) else f"{w:.3f}"
        same = stock.get(calls[name])
        ratio = "—" if same is None else f"{t / same:.2f}"
        spc = "—" if calls[name] is None else calls[name]
        lines.append(f"| {name} | {spc} | {t:.3f} | {ratio} | {against} | {whole_text} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
