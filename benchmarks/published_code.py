"""The published NumPy code's epoch (Akrout et al.'s `fcnn/FCNN_*.py`), timed in its own process.

keras_wt does not ship that code. Point `--published_dir` (of `epoch_time.py`, or of this script)
at a checkout of https://github.com/makrout/Deep-Learning-without-Weight-Transport (commit
688f47a was timed for BENCHMARKS.md). Each run is a child process that imports only NumPy and
that code, with `OPENBLAS_CORETYPE` and `OPENBLAS_L2_SIZE` removed from its environment so that
NumPy's OpenBLAS picks its own kernel (the parent's environment is not touched).

The workload is `run.sh`'s reference MLP with `--size_hidden_layers 500` (784-500-10, sigmoid,
batch 128, the published learning rate of each algorithm) on Fashion-MNIST, loaded as `main.py`
loads MNIST (flattened, divided by 255, one-hot labels). The time per epoch is the code's own
`Epoch j completed in ... s` line: training only, its evaluation and angles come after it.

Usage (from the repository root, on a quiet machine):

    python benchmarks/published_code.py --published_dir ~/Deep-Learning-without-Weight-Transport \
        --algos bp fa kp wm --epochs 3
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np

CLASSES = {"bp": "FCNN_BP", "fa": "FCNN_FA", "kp": "FCNN_KP", "wm": "FCNN_WM"}
BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_EPOCH_LINE = re.compile(r"Epoch (\d+) completed in ([0-9.]+)s")


def check_checkout(published_dir):
    """Raises `FileNotFoundError` naming what is missing unless `published_dir` holds `fcnn/`."""
    missing = [f"fcnn/{name}.py" for name in CLASSES.values()
               if not os.path.isfile(os.path.join(published_dir, "fcnn", f"{name}.py"))]
    if missing:
        raise FileNotFoundError(
            f"{published_dir!r} is not a checkout of the published code: it lacks "
            f"{', '.join(missing)}. Clone https://github.com/makrout/"
            "Deep-Learning-without-Weight-Transport and pass its folder.")


def save_data(path, data):
    """Writes `((x_train, y_train), (x_test, y_test))` (uint8 images, int labels) to `path`."""
    (x_train, y_train), (x_test, y_test) = data
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def epoch_seconds(published_dir, algo, epochs, data_path, seed=1111):
    """Training seconds of each epoch of `algo` in the published code, run in a child process."""
    if algo not in CLASSES:
        raise ValueError(f"the published code has no {algo!r}; it has {sorted(CLASSES)}")
    check_checkout(published_dir)
    # run.sh's rates, as keras-wt-train's defaults hold them (imported here: the child imports
    # NumPy and the published code only)
    from keras_wt.app.flags import PUBLISHED_LEARNING_RATES

    env = {k: v for k, v in os.environ.items() if k not in BLAS_VARIABLES}
    command = [sys.executable, os.path.abspath(__file__), "--worker",
               "--published_dir", os.path.abspath(published_dir), "--algos", algo,
               "--epochs", str(epochs), "--data", data_path, "--seed", str(seed),
               "--learning_rate", str(PUBLISHED_LEARNING_RATES[algo])]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the published code's {algo} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker(published_dir, algo, epochs, data_path, seed, learning_rate):
    """Runs in the child: trains with the published class, returns its epoch lines' seconds."""
    sys.path.insert(0, published_dir)
    module = __import__(f"fcnn.{CLASSES[algo]}", fromlist=[CLASSES[algo]])
    network = getattr(module, CLASSES[algo])
    with np.load(data_path) as arrays:
        x_train, y_train, x_test, y_test = (arrays[k] for k in
                                            ("x_train", "y_train", "x_test", "y_test"))

    def features(x):
        return x.reshape(len(x), -1).astype("float32") / 255

    def one_hot(y):
        return np.eye(10, dtype="float32")[y.reshape(-1)]

    np.random.seed(seed)
    with tempfile.TemporaryDirectory() as save_dir:
        model = network([784, 500, 10], save_dir)
        model.train(features(x_train), one_hot(y_train), features(x_test), one_hot(y_test),
                    128, learning_rate, epochs, 1)
        with open(os.path.join(save_dir, "log.txt")) as f:
            seconds = [float(m.group(2)) for m in _EPOCH_LINE.finditer(f.read())]
    if len(seconds) != epochs:
        raise RuntimeError(f"expected {epochs} epoch lines in the published log, found "
                           f"{len(seconds)}")
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published_dir", required=True)
    parser.add_argument("--algos", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (first not counted)")
    parser.add_argument("--seed", type=int, default=1111)
    parser.add_argument("--data", help="an .npz of the dataset (default: load Fashion-MNIST)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--learning_rate", type=float, help=argparse.SUPPRESS)  # the worker's
    args = parser.parse_args(argv)
    if args.worker:
        seconds = _worker(args.published_dir, args.algos[0], args.epochs, args.data, args.seed,
                          args.learning_rate)
        sys.stdout.write(json.dumps(seconds) + "\n")
        return
    # keras_wt (the learning rates, the dataset) from the repository this script is in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as directory:
        data_path = args.data
        if data_path is None:
            from keras_wt.app.data.datasets import load_numpy

            data_path = os.path.join(directory, "fashion_mnist.npz")
            save_data(data_path, load_numpy("fashion_mnist"))
        lines = ["| published code | training s/epoch (median of epochs 2+) | every epoch |",
                 "|---|---|---|"]
        for algo in args.algos:
            seconds = epoch_seconds(args.published_dir, algo, args.epochs, data_path, args.seed)
            median = statistics.median(seconds[1:] or seconds)
            lines.append(f"| {algo} | {median:.3f} | {', '.join(f'{s:.3f}' for s in seconds)} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
