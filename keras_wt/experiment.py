"""The reference experiments: the `keras-wt-train` command line.

It reproduces the command line of Akrout et al.'s public NumPy code on top of keras_wt, with its
flags, its output folders and its results file:

    keras-wt-train --dataset fashion_mnist --algo kp --n_epochs 5

The defaults are the reference configuration, so numbers compare with the published code: an
MLP (784-500-10) with sigmoid hidden and output units trained with sigmoid cross-entropy summed
over the classes and averaged over the batch (`keras_wt.models.SummedSigmoidCrossEntropy`), plain
SGD without momentum, inputs scaled to [0, 1] and flattened, and W, b and B drawn from
`N(0, 1/(fan_in + fan_out))`. When `--learning_rate` is not given each algorithm uses its
published learning rate (`PUBLISHED_LEARNING_RATES`).

Weight mirror, published units. The published code mirrors each layer with one noise batch
`x` of `batch_size` samples, uniform in `[-a, a)` with `a = 0.05`, after every training batch
(and `N_train / batch_size` batches before training), and steps

    B ← B + η_pub · xᵀ·sigmoid(xW + b)      (summed over the noise batch, η_pub = 0.01).

Since `sigmoid(z) ≈ 1/2 + z/4` and the noise has zero mean, the step is on average
`(η_pub/4)·xᵀ(xW)`. keras_wt's mirror step (DESIGN.md §2) is `η_m·xᵀ(xW)/n`, averaged over the
`n` noise samples and on the linear output, so the published step is

    η_m = η_pub · n / 4         (0.01 · 128 / 4 = 0.32 with the defaults)

and the noise has `σ = a/√3`. `--mirror_learning_rate` takes `η_pub` (published units) and
`--mirror_noise_amplitude` takes `a`; the converted `η_m` and `σ` are written to
`experiment_config.json` under `"derived"` (`mirror_learning_rate_keras_wt`, `mirror_noise_std`).

Outputs of a run, in `<save_dir>/<dataset>/<algo>-V<i>/` (`i` = 0, 1, ...; nothing is
overwritten): `experiment_config.json` (every flag, plus `"derived"` values), `log.txt`,
`results.json` (one entry `"epoch_<j>"` per evaluated epoch `j`, 0-based as in the published
code: `loss`, `accuracy`, `test_loss`, `test_accuracy` (accuracies in percent, as published),
`weight_angles` and `delta_angles` `{layer: degrees}`, `seconds`), `tensorboard/`, the trained
model `model.keras`, and the per-epoch checkpoint (`checkpoint.keras`, `checkpoint.json`) from
which `--resume` continues exactly where an interrupted run stopped.
"""

import argparse
import json
import logging
import math
import os
import platform
import re
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

import keras_wt
from keras_wt import alignment
from keras_wt import algorithms
from keras_wt import callbacks as wt_callbacks
from keras_wt import datasets
from keras_wt import models
from keras_wt import optimizers as wt_optimizers

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion_mnist", "cifar10")
MODELS = ("mlp", "cnn")

# The learning rates of the published code (Akrout et al.); sign symmetry was not in it and
# uses backprop's.
PUBLISHED_LEARNING_RATES = {"bp": 0.2, "fa": 0.2, "ss": 0.2, "wm": 0.05, "kp": 0.3}

# The CNN is not in the published code. A 100-step check on Fashion-MNIST diverged at 0.03 for
# FA (and WM, which is FA until its mirror catches up) and at 0.1 for BP and KP; 0.01 trains all.
CNN_LEARNING_RATE = 0.01

# Flags that may differ between an interrupted run and its `--resume`.
RESUMABLE_OVERRIDES = ("n_epochs", "data_dir", "verbose")

PROBE_SIZE = 1000  # test examples on which the delta angles are measured
EVAL_BATCH_SIZE = 1000

CONFIG_FILE = "experiment_config.json"
RESULTS_FILE = "results.json"
LOG_FILE = "log.txt"
MODEL_FILE = "model.keras"
CHECKPOINT_FILE = "checkpoint.keras"
CHECKPOINT_STATE_FILE = "checkpoint.json"
TENSORBOARD_DIR = "tensorboard"


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is `None` (the help then says what happens)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    """The `argparse` parser of `keras-wt-train`."""
    parser = argparse.ArgumentParser(
        prog="keras-wt-train",
        description="Train a network without weight transport (Akrout et al. 2019) and log its "
        "test accuracy and its weight and delta angles.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("--dataset", default="mnist", choices=DATASETS, help="dataset to train on")
    add("--algo", default="bp", choices=algorithms.ALGORITHMS,
        help="bp: backprop, fa: feedback alignment, ss: sign symmetry, wm: weight mirror, "
        "kp: Kolen-Pollack")
    add("--model", default="mlp", choices=MODELS,
        help="mlp: the reference MLP; cnn: keras_wt.models.cnn (logits, the same loss)")
    add("--n_epochs", type=int, default=400, help="number of epochs")
    add("--size_hidden_layers", type=int, nargs="+", default=[500],
        help="widths of the hidden layers (cnn: one int, the width of its dense layer)")
    add("--cnn_filters", type=int, nargs="+", default=[32, 64],
        help="filters of the convolutional layers of --model cnn")
    add("--batch_size", type=int, default=128, help="training batch size")
    add("--learning_rate", type=float, default=None,
        help="SGD learning rate; default: the published one of --algo "
        f"{PUBLISHED_LEARNING_RATES} for the mlp, {CNN_LEARNING_RATE} for the cnn")
    add("--test_frequency", type=int, default=1,
        help="evaluate (test accuracy, angles) every this many epochs, and after the last")
    add("--save_dir", default="./experiments",
        help="runs go to <save_dir>/<dataset>/<algo>-V<i>/")
    add("--seed", type=int, default=1111, help="seed of the weights, the shuffling, the noise")
    add("--data_dir", default=None,
        help="directory of the raw dataset files (else the standard places, see "
        "keras_wt.datasets)")
    add("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
        help="continue an interrupted run from its last completed epoch: RUN_DIR, or without "
        "a value the latest <save_dir>/<dataset>/<algo>-V<i> (a new run if there is none)")
    add("--verbose", type=int, default=1, choices=(0, 1, 2),
        help="Keras progress bar: 0 silent, 1 bar, 2 one line per epoch")
    mirror = parser.add_argument_group(
        "weight mirror (--algo wm), in the published code's units")
    mirror.add_argument(
        "--mirror_learning_rate", type=float, default=0.01,
        help="published η: ΔB = η·xᵀ·sigmoid(xW+b) summed over the noise batch; keras_wt's "
        "averaged linear step is η·mirror_batch_size/4")
    noise = mirror.add_mutually_exclusive_group()
    noise.add_argument(
        "--mirror_noise_amplitude", type=float, default=None,
        help="uniform noise in [-a, a) (default 0.05, σ = a/√3)")
    noise.add_argument(
        "--mirror_noise_std", type=float, default=None,
        help="Gaussian noise N(0, σ²) instead of the uniform noise")
    mirror.add_argument("--mirror_decay", type=float, default=0.0,
                        help="mirror decay λ of B: ΔB −= η_m·λ·B with keras_wt's η_m "
                        "(published: none)")
    mirror.add_argument("--mirror_every", type=int, default=1,
                        help="mirror after every this many training batches")
    mirror.add_argument("--mirror_steps", type=int, default=1,
                        help="mirror steps (noise batches per layer) each time")
    mirror.add_argument("--mirror_batch_size", type=int, default=None,
                        help="noise samples per batch (default: --batch_size)")
    mirror.add_argument("--mirror_warmup_steps", type=int, default=None,
                        help="mirror steps before training (default: N_train // batch_size)")
    kp = parser.add_argument_group("Kolen-Pollack (--algo kp)")
    kp.add_argument("--kp_weight_decay", type=float, default=0.0,
                    help="decay λ of W and B of kp layers (published: none)")
    return parser


def _explicit_flags(parser, argv):
    """The flags given on the command line (not left at their defaults)."""
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "nargs": action.nargs, "type": action.type}
            if action.const is not None:
                kwargs["const"] = action.const
            quiet.add_argument(*action.option_strings, **kwargs)
    namespace, _ = quiet.parse_known_args(argv)
    return set(vars(namespace))


def validate(config):
    """Checks the values of a flag dict; raises a `ValueError` that names the flag."""

    def check(flag, ok, allowed):
        if not ok:
            raise ValueError(f"--{flag}={config[flag]!r} is not allowed: it must be {allowed}")

    check("dataset", config["dataset"] in DATASETS, f"one of {DATASETS}")
    check("algo", config["algo"] in algorithms.ALGORITHMS, f"one of {algorithms.ALGORITHMS}")
    check("model", config["model"] in MODELS, f"one of {MODELS}")
    for flag in ("n_epochs", "batch_size", "test_frequency", "mirror_every", "mirror_steps"):
        check(flag, config[flag] >= 1, "an integer >= 1")
    sizes = config["size_hidden_layers"]
    check("size_hidden_layers", len(sizes) >= 1 and all(s >= 1 for s in sizes),
          "one or more integers >= 1")
    check("size_hidden_layers", config["model"] != "cnn" or len(sizes) == 1,
          "a single integer (the dense width) with --model cnn")
    check("cnn_filters", len(config["cnn_filters"]) >= 1
          and all(f >= 1 for f in config["cnn_filters"]), "one or more integers >= 1")
    lr = config["learning_rate"]
    check("learning_rate", lr is None or (math.isfinite(lr) and lr > 0),
          "a positive number (or not given: the published rate of --algo)")
    check("mirror_learning_rate", config["mirror_learning_rate"] >= 0, "a number >= 0")
    for flag in ("mirror_noise_amplitude", "mirror_noise_std"):
        check(flag, config[flag] is None or config[flag] > 0, "a positive number")
    check("mirror_noise_std",
          config["mirror_noise_amplitude"] is None or config["mirror_noise_std"] is None,
          "left out when --mirror_noise_amplitude is given")
    check("mirror_decay", config["mirror_decay"] >= 0, "a number >= 0")
    for flag in ("mirror_batch_size",):
        check(flag, config[flag] is None or config[flag] >= 1, "an integer >= 1")
    check("mirror_warmup_steps",
          config["mirror_warmup_steps"] is None or config["mirror_warmup_steps"] >= 0,
          "an integer >= 0")
    check("kp_weight_decay", config["kp_weight_decay"] >= 0, "a number >= 0")
    return config


def parse_args(argv=None):
    """Parses and validates the command line; returns `(config, explicit_flags)`.

    Raises:
        ValueError: a flag has a value that argparse accepts but the experiment cannot use.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config = vars(parser.parse_args(argv))
    return validate(config), _explicit_flags(parser, argv)


# --------------------------------------------------------------------------------------------
# What the flags mean
# --------------------------------------------------------------------------------------------


def learning_rate(config):
    """The SGD learning rate: `--learning_rate`, else the published rate of the algorithm
    (`CNN_LEARNING_RATE` for the CNN, which the published code does not have)."""
    if config["learning_rate"] is not None:
        return float(config["learning_rate"])
    if config["model"] == "cnn":
        return CNN_LEARNING_RATE
    return PUBLISHED_LEARNING_RATES[config["algo"]]


def mirror_learning_rate(published_learning_rate, mirror_batch_size):
    """keras_wt's `η_m` that reproduces the published mirror step (module docstring):
    `η_pub · n / 4`: the published step sums over the `n` noise samples and uses
    `sigmoid(xW + b) ≈ 1/2 + (xW + b)/4`; keras_wt's averages and uses `xW`."""
    return published_learning_rate * mirror_batch_size / 4.0


def mirror_noise(config):
    """`(noise_std, noise_distribution)` of the mirror noise: uniform in `[-a, a)` has
    `σ = a/√3`; `--mirror_noise_std` gives Gaussian noise."""
    if config["mirror_noise_std"] is not None:
        return float(config["mirror_noise_std"]), "normal"
    amplitude = config["mirror_noise_amplitude"]
    amplitude = 0.05 if amplitude is None else amplitude
    return amplitude / math.sqrt(3.0), "uniform"


def mirror_settings(config, num_train):
    """The `keras_wt.callbacks.MirrorCallback` arguments of an experiment config."""
    noise_std, distribution = mirror_noise(config)
    batch_size = config["mirror_batch_size"] or config["batch_size"]
    warmup = config["mirror_warmup_steps"]
    return dict(
        learning_rate=mirror_learning_rate(config["mirror_learning_rate"], batch_size),
        noise_std=noise_std,
        decay=config["mirror_decay"],
        every=config["mirror_every"],
        steps=config["mirror_steps"],
        batch_size=batch_size,
        warmup_steps=num_train // config["batch_size"] if warmup is None else warmup,
        noise_distribution=distribution,
        seed=config["seed"],
    )


def build_model(config, image_shape, num_classes):
    """The compiled model of an experiment: reference MLP or CNN, summed sigmoid
    cross-entropy, plain SGD (wrapped in `KolenPollack` for `kp`), accuracy."""
    algo = config["algo"]
    if config["model"] == "mlp":
        model = models.get(
            "mlp",
            input_shape=(int(np.prod(image_shape)),),
            hidden=tuple(config["size_hidden_layers"]),
            num_classes=num_classes,
            feedback=algo,
            seed=config["seed"],
        )
        loss = models.SummedSigmoidCrossEntropy()
    else:
        model = models.get(
            "cnn",
            input_shape=tuple(image_shape),
            num_classes=num_classes,
            feedback=algo,
            filters=tuple(config["cnn_filters"]),
            dense_units=config["size_hidden_layers"][0],
            seed=config["seed"],
        )
        loss = models.SummedSigmoidCrossEntropy(from_logits=True)
    optimizer = keras.optimizers.SGD(learning_rate(config))
    if algo == "kp":
        optimizer = wt_optimizers.KolenPollack(optimizer, weight_decay=config["kp_weight_decay"])
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return model


# --------------------------------------------------------------------------------------------
# Data: exactly resumable shuffling
# --------------------------------------------------------------------------------------------


def _preprocess(images, flatten):
    images = tf.cast(images, tf.float32) / 255.0
    if flatten:
        images = tf.reshape(images, [tf.shape(images)[0], -1])
    return images


def epoch_permutation(num_examples, seed, epoch):
    """The order of the training examples in `epoch`: a function of `(seed, epoch)` only, so
    a resumed run sees the batches the uninterrupted run would have seen."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.argsort(tf.random.stateless_uniform([num_examples], key))


def train_dataset(x, y, batch_size, seed, first_epoch, n_epochs, flatten):
    """Batches of epochs `first_epoch .. n_epochs − 1`, each shuffled by `epoch_permutation`;
    `ceil(N / batch_size)` batches per epoch, the last one smaller."""
    x, y = tf.constant(x), tf.constant(y)
    n = int(x.shape[0])

    def epoch(e):
        return tf.data.Dataset.from_tensor_slices(epoch_permutation(n, seed, e)).batch(batch_size)

    ds = tf.data.Dataset.range(first_epoch, n_epochs).flat_map(epoch)
    ds = ds.map(lambda i: (_preprocess(tf.gather(x, i), flatten), tf.gather(y, i)))
    return ds.prefetch(tf.data.AUTOTUNE)


def test_dataset(x, y, flatten, batch_size=EVAL_BATCH_SIZE):
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return ds.map(lambda a, b: (_preprocess(a, flatten), b)).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------
# Run folders and files
# --------------------------------------------------------------------------------------------


def _write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_dirs(save_dir, dataset, algo=None):
    """Run folders `<save_dir>/<dataset>/<algo>-V<i>`, sorted by algorithm then `i`."""
    root = os.path.join(save_dir, dataset)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = re.fullmatch(r"(\w+)-V(\d+)", name)
        if match and (algo is None or match.group(1) == algo):
            found.append((match.group(1), int(match.group(2)), os.path.join(root, name)))
    return [path for _, _, path in sorted(found)]


def new_run_dir(save_dir, dataset, algo):
    """Creates and returns `<save_dir>/<dataset>/<algo>-V<i>` with the first free `i`."""
    root = os.path.join(save_dir, dataset)
    os.makedirs(root, exist_ok=True)
    i = 0
    while True:
        path = os.path.join(root, f"{algo}-V{i}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            i += 1


def load_results(run_dir):
    """`(config, results)` of a run folder; `results` is `{}` when nothing was evaluated yet."""
    config = _read_json(os.path.join(run_dir, CONFIG_FILE))
    path = os.path.join(run_dir, RESULTS_FILE)
    results = _read_json(path) if os.path.exists(path) else {}
    return config, results


def epoch_key(epoch):
    """The key of 0-based epoch `epoch` in `results.json` (the published code's)."""
    return f"epoch_{epoch}"


def _epoch_of(key):
    return int(key.split("_", 1)[1])


# --------------------------------------------------------------------------------------------
# The callback that evaluates, records and checkpoints
# --------------------------------------------------------------------------------------------


class ExperimentRecorder(keras.callbacks.Callback):
    """After every `test_frequency`-th epoch (and the last): evaluates the test set, measures
    the weight and delta angles (`keras_wt.alignment`) on a fixed test probe, writes them into
    `logs` (for TensorBoard) and `results.json`, and logs a line. After every epoch: saves the
    model and its optimizer to the checkpoint from which `--resume` continues.

    Args:
        run_dir: the run folder.
        test_data: the test `tf.data.Dataset`.
        probe: `(x, y)` test batch of the delta angles.
        n_epochs: the last epoch of the run (always evaluated).
        test_frequency: evaluate every this many epochs.
        results: the entries of earlier epochs (when resuming).
    """

    def __init__(self, run_dir, test_data, probe, n_epochs, test_frequency, results=None):
        super().__init__()
        self.run_dir = run_dir
        self.test_data = test_data
        self.probe = probe
        self.n_epochs = n_epochs
        self.test_frequency = test_frequency
        self.results = dict(results or {})
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        logs = logs if logs is not None else {}
        if (epoch + 1) % self.test_frequency == 0 or epoch + 1 == self.n_epochs:
            self._evaluate(epoch, logs, seconds)
        self._checkpoint(epoch)

    def _evaluate(self, epoch, logs, seconds):
        test = self.model.evaluate(self.test_data, verbose=0, return_dict=True)
        weight = alignment.weight_angles(self.model)
        delta = alignment.delta_angles(self.model, *self.probe)
        entry = {
            "loss": float(logs.get("loss", float("nan"))),
            "accuracy": 100.0 * float(logs.get("accuracy", float("nan"))),
            "test_loss": float(test["loss"]),
            "test_accuracy": 100.0 * float(test["accuracy"]),
            "weight_angles": weight,
            "delta_angles": delta,
            "seconds": seconds,
        }
        self.results[epoch_key(epoch)] = entry
        _write_json(os.path.join(self.run_dir, RESULTS_FILE), self.results)
        logs["test_loss"] = entry["test_loss"]
        logs["test_accuracy"] = float(test["accuracy"])
        logs.update({f"weight_angle/{k}": v for k, v in weight.items()})
        logs.update({f"delta_angle/{k}": v for k, v in delta.items()})
        logger.info(
            "epoch %d/%d (%.1fs): loss %.4f, test accuracy %.2f%%, weight angles %s, "
            "delta angles %s",
            epoch + 1, self.n_epochs, seconds, entry["loss"], entry["test_accuracy"],
            _format_angles(weight), _format_angles(delta),
        )

    def _checkpoint(self, epoch):
        path = os.path.join(self.run_dir, CHECKPOINT_FILE)
        tmp = os.path.join(self.run_dir, "checkpoint-tmp.keras")
        self.model.save(tmp)
        os.replace(tmp, path)
        _write_json(
            os.path.join(self.run_dir, CHECKPOINT_STATE_FILE),
            {"epochs_completed": epoch + 1, "iterations": int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))},
        )


class ScalarSummaries(keras.callbacks.Callback):
    """Writes every number of the epoch's `logs` as a TensorBoard scalar (step: the epoch).

    `keras.callbacks.TensorBoard` needs the `tensorboard` package for `tf.summary.scalar`;
    TensorFlow alone writes the same event files with `tf.summary.write` and the scalar
    plugin's metadata, so a run logs for TensorBoard whether or not it is installed.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        ).SerializeToString()

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        with self._writer.as_default():
            for name, value in (logs or {}).items():
                if isinstance(value, (int, float, np.number)) or np.ndim(value) == 0:
                    tf.summary.write(
                        name, tf.constant(float(value), tf.float32), step=epoch,
                        metadata=self._metadata,
                    )
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _format_angles(angles):
    return "{" + ", ".join(f"{k}: {v:.1f}°" for k, v in angles.items()) + "}"


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class ResumeError(ValueError):
    """`--resume` names no run, or flags that differ from the run's."""


def _resolve_resume(config, explicit):
    """`(run_dir, config)` of the run to continue, or `(None, config)` for a new run.

    Without a folder, the latest `<algo>-V<i>` of the dataset whose saved flags agree with the
    flags given on the command line is continued.
    """
    fixed = sorted(set(explicit) - {"resume", "save_dir"} - set(RESUMABLE_OVERRIDES))
    resume = config["resume"]
    if resume == "latest":
        candidates = []
        for path in run_dirs(config["save_dir"], config["dataset"], config["algo"]):
            if os.path.exists(os.path.join(path, CONFIG_FILE)):
                saved = _read_json(os.path.join(path, CONFIG_FILE))
                if all(saved.get(flag) == config[flag] for flag in fixed):
                    candidates.append(path)
        if not candidates:
            logger.info("--resume: no run of %s on %s in %s with these flags yet; starting a "
                        "new one", config["algo"], config["dataset"], config["save_dir"])
            return None, config
        resume = max(candidates, key=lambda path: int(path.rsplit("-V", 1)[1]))
    if not os.path.exists(os.path.join(resume, CONFIG_FILE)):
        raise ResumeError(f"--resume={resume!r} is not a run folder: it has no {CONFIG_FILE}")
    saved = _read_json(os.path.join(resume, CONFIG_FILE))
    saved.pop("derived", None)
    for flag in fixed:
        if config[flag] != saved.get(flag):
            raise ResumeError(
                f"--{flag}={config[flag]!r} differs from the resumed run's {saved.get(flag)!r} "
                f"({resume}); only {RESUMABLE_OVERRIDES} may change when resuming"
            )
    for flag in RESUMABLE_OVERRIDES:
        if flag in explicit:
            saved[flag] = config[flag]
    saved["resume"] = None
    saved["save_dir"] = config["save_dir"]
    return resume, validate(saved)


def _derived(config, num_train):
    derived = {
        "learning_rate": learning_rate(config),
        "keras_wt_version": keras_wt.__version__,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}".replace("  ", " "),
    }
    if config["algo"] == "wm":
        settings = mirror_settings(config, num_train)
        derived.update(
            mirror_learning_rate_keras_wt=settings["learning_rate"],
            mirror_noise_std=settings["noise_std"],
            mirror_noise_distribution=settings["noise_distribution"],
            mirror_batch_size=settings["batch_size"],
            mirror_warmup_steps=settings["warmup_steps"],
        )
    return derived


def run(config, explicit=frozenset()):
    """Runs (or resumes) one experiment; returns its run folder.

    Args:
        config: the flag dict of `parse_args`.
        explicit: the flags given on the command line (used to check a `--resume`).
    """
    run_dir, config = _resolve_resume(config, set(explicit)) if config["resume"] else (None, config)
    resuming = run_dir is not None
    if not resuming:
        run_dir = new_run_dir(config["save_dir"], config["dataset"], config["algo"])

    handler = logging.FileHandler(os.path.join(run_dir, LOG_FILE), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    if level > logging.INFO or level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        return _run(config, run_dir, resuming)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def _run(config, run_dir, resuming):
    (x_train, y_train), (x_test, y_test) = datasets.load_numpy(
        config["dataset"], data_dir=config["data_dir"]
    )
    image_shape = x_train.shape[1:]
    num_classes = datasets.info(config["dataset"]).num_classes
    flatten = config["model"] == "mlp"

    config_path = os.path.join(run_dir, CONFIG_FILE)
    saved_config = dict(config, derived=_derived(config, len(x_train)))
    _write_json(config_path, saved_config)

    first_epoch, results = 0, {}
    checkpoint_state = os.path.join(run_dir, CHECKPOINT_STATE_FILE)
    if resuming and os.path.exists(checkpoint_state):
        first_epoch = _read_json(checkpoint_state)["epochs_completed"]
        model = keras.saving.load_model(os.path.join(run_dir, CHECKPOINT_FILE))
        _, results = load_results(run_dir)
        results = {k: v for k, v in results.items() if _epoch_of(k) < first_epoch}
        logger.info("Resuming %s after epoch %d", run_dir, first_epoch)
    else:
        if resuming:
            logger.info("Resuming %s: no completed epoch, starting from scratch", run_dir)
        model = build_model(config, image_shape, num_classes)
        logger.info("New run %s", run_dir)
    logger.info("Configuration: %s", json.dumps(saved_config, sort_keys=True))

    n_epochs = config["n_epochs"]
    if first_epoch >= n_epochs:
        logger.info("%s already completed %d of %d epochs: nothing to do",
                    run_dir, first_epoch, n_epochs)
        model.save(os.path.join(run_dir, MODEL_FILE))
        return run_dir

    steps = math.ceil(len(x_train) / config["batch_size"])
    train = train_dataset(
        x_train, y_train, config["batch_size"], config["seed"], first_epoch, n_epochs, flatten
    )
    test = test_dataset(x_test, y_test, flatten)
    probe = (
        _preprocess(x_test[:PROBE_SIZE], flatten),
        tf.constant(y_test[:PROBE_SIZE]),
    )

    callbacks = []
    if config["algo"] == "wm":
        settings = mirror_settings(config, len(x_train))
        callbacks.append(wt_callbacks.MirrorCallback(**settings))
        logger.info(
            "Weight mirror: published η=%g on summed sigmoid outputs = keras_wt η_m=%g "
            "(η·%d/4), noise σ=%g (%s), %d warm-up steps",
            config["mirror_learning_rate"], settings["learning_rate"], settings["batch_size"],
            settings["noise_std"], settings["noise_distribution"], settings["warmup_steps"],
        )
    callbacks.append(keras.callbacks.TerminateOnNaN())
    callbacks.append(
        ExperimentRecorder(run_dir, test, probe, n_epochs, config["test_frequency"], results)
    )
    callbacks.append(
        ScalarSummaries(os.path.join(run_dir, TENSORBOARD_DIR))
    )
    model.fit(
        train,
        epochs=n_epochs,
        initial_epoch=first_epoch,
        steps_per_epoch=steps,
        callbacks=callbacks,
        shuffle=False,  # train_dataset shuffles, per epoch
        verbose=config["verbose"],
    )
    model.save(os.path.join(run_dir, MODEL_FILE))
    logger.info("Saved the trained model to %s", os.path.join(run_dir, MODEL_FILE))
    return run_dir


def train_from_flags(argv=None):
    """Parses the command-line flags `argv` (default: `sys.argv[1:]`), runs the experiment and
    returns its run folder. A bad flag exits with argparse's usage message (status 2)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser()
    try:
        config, explicit = parse_args(argv)
    except ValueError as e:
        parser.error(str(e))
    try:
        return run(config, explicit)
    except ResumeError as e:
        parser.error(str(e))


def main(argv=None):
    """The `keras-wt-train` console script (exit status 0 on success)."""
    train_from_flags(argv)
    return 0


if __name__ == "__main__":
    main()
