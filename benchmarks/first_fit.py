"""The first `fit` call of deep models, per feedback rule, against stock Keras (issue #18).

The first call of `model.fit` traces the training step, compiles it and runs it once; on a deep
model that is what a user waits for before anything trains (and a TPU pays it at every
compilation). Here it is measured for:

* **a chain of N convolutions** (`--depths`, default 10, 50 and 150): `Input(16×16×8)`, N ×
  `Conv2D(8, 3, padding="same", activation="relu")`, global average pooling, `Dense(10)`; the
  stock Keras model and its `keras_wt.convert(model, rule)` copy for every rule of
  `keras_wt.ALGORITHMS`, compiled as `keras_wt.app.training` compiles them (`SGD(0.01, momentum=0.9)`
  with weight decay 1e-4; `KolenPollack` around it for `kp`; a `MirrorCallback` for `wm`), and
  fitted on one batch of 8 for one step. Every version runs **in the same process**, in rounds,
  one fresh model per version and round in a shuffled order, so a machine that slows down slows
  all of them alike; the table gives the median seconds of stock Keras and every version's ratio
  to it (median over rounds of the per-round ratio, with the rounds' range).
* **`NASNetMobile`** (`--nasnet`, `keras.applications.NASNetMobile(weights=None,
  input_shape=(32, 32, 3), classes=10)`, converted the same way, batch 8): its first `fit` for
  stock Keras and `--nasnet-rules` (default `fa` and `kp`), each version in **its own process**
  so that its peak resident memory (`ru_maxrss`) is its own; the versions alternate over rounds.
  The process's memory includes TensorFlow itself (about 0.6–0.8 GB), the same for all.

What is timed is the `fit` call only: building and converting the model are not counted.

Usage (from the repository root):

    python benchmarks/first_fit.py --quick                     # one round; ~5 min on 2 cores
    python benchmarks/first_fit.py --rounds 3 --nasnet --write BENCHMARKS.md

`--write PATH` replaces the block between `<!-- first_fit:begin -->` and
`<!-- first_fit:end -->` in `PATH` (appending it if there is none); the text around it stays.
"""

import argparse
import datetime
import gc
import json
import logging
import os
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_wt  # noqa: E402
from keras_wt import mirror as mirror_lib  # noqa: E402
from keras_wt import schedules  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import machine_description  # noqa: E402

logger = logging.getLogger("keras_wt.benchmarks")

STOCK = "keras"
BATCH = 8
CHAIN_INPUT = (16, 16, 8)
NASNET_INPUT = (32, 32, 3)
KP_TARGET = 1.5  # issue #18: kp's first fit on a 150-convolution chain ≤ 1.5x fa's
BEGIN_MARK = "<!-- first_fit:begin -->"
END_MARK = "<!-- first_fit:end -->"


def conv_chain(depth):
    """The stock Keras chain of `depth` convolutions."""
    layers = [keras.Input(CHAIN_INPUT)]
    layers += [keras.layers.Conv2D(8, 3, padding="same", activation="relu") for _ in range(depth)]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def nasnet():
    return keras.applications.NASNetMobile(weights=None, input_shape=NASNET_INPUT, classes=10,
                                           classifier_activation=None)


def prepare(build, rule):
    """`(model, callbacks)`: the stock model of `build()`, or its copy converted to `rule`,
    compiled as `keras_wt.app.training` compiles it."""
    model = build()
    if rule != STOCK:
        model = keras_wt.convert(model, rule)
    model.compile(
        schedules.create_optimizer("bp" if rule == STOCK else rule, 0.01, momentum=0.9,
                                   weight_decay=1e-4),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks = []
    if rule != STOCK and mirror_lib.wm_layers(model):
        callbacks.append(keras_wt.callbacks.MirrorCallback(0.05, 1.0, decay=1.0, batch_size=BATCH))
    return model, callbacks


def first_fit_seconds(build, rule, seed=0):
    """Seconds of the first `fit` call (trace, compile, one step) of `prepare(build, rule)`."""
    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(seed)
    model, callbacks = prepare(build, rule)
    shape = tuple(model.input_shape[1:])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH,) + shape).astype("float32")
    y = rng.integers(0, 10, BATCH)
    started = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)
    return time.perf_counter() - started


def chain_benchmark(depths, rules, rounds, rng):
    """`{depth: {version: [seconds per round]}}`, versions interleaved in one process."""
    versions = [STOCK] + list(rules)
    first_fit_seconds(lambda: conv_chain(2), STOCK)  # TensorFlow's own first-call costs
    results = {depth: {v: [] for v in versions} for depth in depths}
    for r in range(rounds):
        for depth in depths:
            order = list(versions)
            rng.shuffle(order)
            for version in order:
                seconds = first_fit_seconds(lambda: conv_chain(depth), version, seed=r)
                results[depth][version].append(seconds)
                logger.info("round %d, %d convolutions, %s: %.2f s", r + 1, depth, version, seconds)
    return results


def _worker(version):
    """Runs in a child process: one NASNetMobile version; prints its measurements as JSON."""
    seconds = first_fit_seconds(nasnet, version)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def nasnet_benchmark(rules, rounds, rng, timeout):
    """`{version: [(seconds, peak RSS bytes)]}`, each measurement in a fresh process."""
    versions = [STOCK] + list(rules)
    results = {v: [] for v in versions}
    for r in range(rounds):
        order = list(versions)
        rng.shuffle(order)
        for version in order:
            command = [sys.executable, os.path.abspath(__file__), "--worker", version]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                      check=True)
            except subprocess.TimeoutExpired:
                logger.warning("NASNetMobile %s: no first step within %d s", version, timeout)
                results[version].append((float("inf"), float("nan")))
                continue
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            results[version].append((measured["seconds"], measured["peak_rss"]))
            logger.info("round %d, NASNetMobile %s: %.1f s, %.2f GiB", r + 1, version,
                        measured["seconds"], measured["peak_rss"] / 2**30)
    return results


def _ratios(seconds, reference):
    """Per-round ratios `seconds[i] / reference[i]`: (median, low, high)."""
    ratios = [s / r for s, r in zip(seconds, reference)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _fmt(ratio):
    value, low, high = ratio
    if low == high:
        return f"{value:.2f}"
    return f"{value:.2f} ({low:.2f}–{high:.2f})"


def render(chain, nasnet_results, header):
    lines = [header, ""]
    if chain:
        depths = sorted(chain)
        lines += [
            "### First `fit` of a chain of N convolutions, ratio to stock Keras",
            "",
            "Seconds of the first `model.fit` call (trace, compile, one step of a batch of 8) of "
            f"`Input{CHAIN_INPUT}` → N × `Conv2D(8, 3, \"same\", relu)` → pooling → `Dense(10)`, "
            "as a ratio to the stock Keras model in the same round (median over rounds, range in "
            "brackets); the `keras` row gives stock Keras's median seconds.",
            "",
            "| version | " + " | ".join(f"N = {d}" for d in depths) + " |",
            "|---|" + "---|" * len(depths),
            f"| `{STOCK}` (seconds) | "
            + " | ".join(f"{statistics.median(chain[d][STOCK]):.2f} s" for d in depths) + " |",
        ]
        for version in [v for v in chain[depths[0]] if v != STOCK]:
            cells = [_fmt(_ratios(chain[d][version], chain[d][STOCK])) for d in depths]
            lines.append(f"| `{version}` | " + " | ".join(cells) + " |")
        if "kp" in chain[depths[-1]] and "fa" in chain[depths[-1]]:
            deepest = depths[-1]
            kp_fa = _ratios(chain[deepest]["kp"], chain[deepest]["fa"])
            verdict = "yes" if kp_fa[0] <= KP_TARGET else "no"
            lines += [
                "",
                f"`kp` / `fa` at N = {deepest}: {_fmt(kp_fa)} (target ≤ {KP_TARGET}: {verdict}).",
            ]
        lines.append("")
    if nasnet_results:
        stock = nasnet_results[STOCK]
        lines += [
            "### First `fit` of NASNetMobile (32×32×3, 10 classes), each in its own process",
            "",
            "Seconds of the first `fit` call (batch 8) and the process's peak resident memory "
            "(TensorFlow included), median over rounds; ratios to stock Keras in the same round.",
            "",
            "| version | first fit | ratio | peak RSS | ratio |",
            "|---|---|---|---|---|",
        ]
        for version, measured in nasnet_results.items():
            seconds = [s for s, _ in measured]
            peaks = [p for _, p in measured]
            time_ratio = _ratios(seconds, [s for s, _ in stock])
            memory_ratio = _ratios(peaks, [p for _, p in stock])
            lines.append(
                f"| `{version}` | {statistics.median(seconds):.1f} s | {_fmt(time_ratio)} | "
                f"{statistics.median(peaks) / 2**30:.2f} GiB | {_fmt(memory_ratio)} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_markdown(path, text):
    """Replaces the marked block of `path` with `text` (appending it, or creating the file)."""
    block = f"{BEGIN_MARK}\n{text}{END_MARK}\n"
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    if BEGIN_MARK in old and END_MARK in old:
        pattern = re.escape(BEGIN_MARK) + r".*?" + re.escape(END_MARK) + r"\n?"
        new = re.sub(pattern, lambda _: block, old, count=1, flags=re.S)
    elif old:
        new = old.rstrip("\n") + "\n\n" + block
    else:
        new = "# keras_wt benchmarks\n\n" + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 50, 150],
                        help="numbers of convolutions of the chains (default 10 50 150)")
    parser.add_argument("--rules", nargs="+", default=list(keras_wt.ALGORITHMS),
                        choices=keras_wt.ALGORITHMS, help="rules of the chain table (default all)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--no-chain", action="store_true", help="skip the convolution chains")
    parser.add_argument("--nasnet", action="store_true", help="also NASNetMobile, one process each")
    parser.add_argument("--nasnet-rules", nargs="+", default=["fa", "kp"],
                        choices=keras_wt.ALGORITHMS)
    parser.add_argument("--nasnet-timeout", type=int, default=900,
                        help="seconds a NASNetMobile version may take (default 900)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    parser.add_argument("--write", metavar="PATH", help="write the tables into this markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("keras_wt").setLevel(logging.WARNING)  # convert's report of every model
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # "triggered tf.function retracing"
    logger.setLevel(logging.INFO)
    rounds = 1 if args.quick else args.rounds
    rng = random.Random(args.seed)
    started = time.perf_counter()
    load_start = os.getloadavg()
    chain = {} if args.no_chain else chain_benchmark(args.depths, args.rules, rounds, rng)
    nasnet_results = {}
    if args.nasnet:
        nasnet_results = nasnet_benchmark(args.nasnet_rules, rounds, rng, args.nasnet_timeout)
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()
    command = "python benchmarks/first_fit.py " + " ".join(shlex.quote(a) for a in argv)
    header = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine_description()}  ",
        f"Run: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {elapsed / 60:.1f} min, "
        f"{rounds} round(s); 1-minute load average {load_start[0]:.1f} at the start, "
        f"{load_end[0]:.1f} at the end ({os.cpu_count()} cores; a load above the core count "
        "means other processes shared the machine)  ",
    ])
    text = render(chain, nasnet_results, header)
    print(text)
    if args.write:
        write_markdown(args.write, text)
        logger.info("tables written to %s", args.write)


if __name__ == "__main__":
    main()
