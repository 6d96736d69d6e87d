"""The flags of `keras-wt-train` (`build_parser`) and their own rules (`validate`), with neither
TensorFlow nor the library imported: `keras-wt-train --help`, an unknown flag or value and flags
that contradict each other answer at once. What the flags mean in keras_wt's units, and the
ranges of the settings they give (each checked once, by its config), is
`keras_wt.app.published.train_config`; `parse_args` checks both.
"""

import argparse
import math
import sys

# keras_wt.ALGORITHMS, keras_wt.app.data.datasets and keras_wt.models, keras_wt.mirror's noise
# distributions (tests check they agree).
ALGORITHMS = ("bp", "fa", "ss", "wm", "kp", "frsf", "brsf", "dfa", "sa", "ia")
DATASETS = ("mnist", "fashion_mnist", "cifar10")
MODELS = ("mlp", "cnn", "resnet20")
NOISE_DISTRIBUTIONS = ("normal", "uniform", "rademacher")  # keras_wt.mirror's
SCHEDULES = ("constant", "cosine")
LOSSES = ("summed_sigmoid", "softmax")

# The learning rates of the published code (Akrout et al.); sign symmetry and the rules of
# keras_wt.algorithms that were not in it (frsf, brsf, dfa, sa, ia) use backprop's.
PUBLISHED_LEARNING_RATES = {"bp": 0.2, "fa": 0.2, "ss": 0.2, "wm": 0.05, "kp": 0.3,
                            "frsf": 0.2, "brsf": 0.2, "dfa": 0.2, "sa": 0.2, "ia": 0.2}
# The seeds the generators take (NumPy's: 0 .. 2**32 − 1; keras_wt.app.config.MAX_SEED).
MAX_SEED = 2**32 - 1



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is `None` (the help then says what happens)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def int_or_auto(text):
    """An `argparse` type: `"auto"`, or an int (`keras-wt-train` and `tpu/train_imagenet.py`)."""
    return text if text == "auto" else int(text)


def build_parser(defaults=True):
    """The `argparse` parser of `keras-wt-train`; with `defaults=False` a flag that is not
    given is left out of the result (to tell which flags were given)."""
    parser = argparse.ArgumentParser(
        prog="keras-wt-train",
        description="Train a network without weight transport (Akrout et al. 2019) and log its "
        "test accuracy and its weight and delta angles.",
        formatter_class=HelpFormatter,
    )

    def adder(group):
        def add(*names, **kwargs):
            if not defaults:
                kwargs["default"] = argparse.SUPPRESS
            return group.add_argument(*names, **kwargs)
        return add

    add = adder(parser)
    add("--dataset", default="fashion_mnist", choices=DATASETS,
        help="dataset to train on (fashion_mnist is on disk after script/up)")
    add("--algo", default="bp", choices=ALGORITHMS,
        help="bp: backprop, fa: feedback alignment, ss: sign symmetry, wm: weight mirror, "
        "kp: Kolen-Pollack, frsf/brsf: fixed/batchwise random-magnitude sign-concordant "
        "feedback, dfa: direct feedback alignment, sa/ia: symmetric/information alignment "
        "(Kunin et al. 2020)")
    add("--model", default="mlp", choices=MODELS,
        help="mlp: the reference MLP with the published configuration; cnn (keras_wt.models.cnn) "
        "and resnet20: convnets with the convnet recipe (batch norm, softmax cross-entropy, SGD "
        "with momentum, weight decay, cosine schedule: keras_wt.app.published.CONVNET_RECIPE)")
    add("--n_epochs", type=int, default=400, help="number of epochs")
    add("--size_hidden_layers", type=int, nargs="+", default=[500],
        help="widths of the hidden layers (cnn: one int, the width of its dense layer)")
    add("--cnn_filters", type=int, nargs="+", default=[32, 64],
        help="filters of the convolutional layers of --model cnn")
    add("--batch_size", type=int, default=128, help="training batch size")
    add("--train_subset", type=int, default=None, metavar="N",
        help="train on the first N training examples only (a quick smoke run; the test set is "
        "unchanged); default: all of them")
    add("--steps_per_epoch", type=int, default=None, metavar="N",
        help="training batches per epoch, at most one pass over the training examples (each "
        "epoch the first N batches of its shuffled order); default: a full pass")
    add("--learning_rate", type=float, default=None,
        help="SGD learning rate (the peak of --schedule); default: the published one of --algo "
        f"{PUBLISHED_LEARNING_RATES} for the mlp, the recipe's for the convnets")
    add("--test_frequency", type=int, default=1,
        help="evaluate (test accuracy, angles) at the first epoch, every this many epochs "
        "after it, and at the last")
    add("--save_dir", default="./experiments",
        help="runs go to <save_dir>/<dataset>/<algo>-V<i>/")
    add("--seed", type=int, default=1111,
        help=f"seed of the weights, the shuffling, the noise (0 to {MAX_SEED})")
    add("--data_dir", default=None,
        help="directory of the raw dataset files (else the standard places, see "
        "keras_wt.app.data.datasets)")
    add("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
        help="continue an interrupted run from its last completed epoch: RUN_DIR, or without "
        "a value the latest <save_dir>/<dataset>/<algo>-V<i> (a new run if there is none)")
    add("--verbose", type=int, default=1, choices=(0, 1, 2, 3),
        help="0: warnings and errors only (log.txt has the rest), 1: one summary line per "
        "epoch, 2: as 1, plus Keras's own line per epoch, 3: as 2, plus TensorFlow's own log "
        "and the traceback of an error")
    add("--divergence_check", action=argparse.BooleanOptionalAction, default=True,
        help="stop a run (exit status 1, diverged.json) whose training loss explodes while "
        "finite: above 2x the loss of a network that learned nothing (summed sigmoid: "
        "10 ln 2 = 6.93; softmax: ln 10 = 2.30) for 100 steps, or over a whole shorter epoch "
        "after the first (keras_wt.app.callbacks.StopOnDivergence). A NaN or infinite loss, metric "
        "or weight stops a run regardless")
    add = adder(parser.add_argument_group(
        "convnet recipe (defaults: the published configuration for --model mlp, "
        "keras_wt.app.published.CONVNET_RECIPE for the convnets)"))
    add("--batch_norm", action=argparse.BooleanOptionalAction, default=True,
        help="cnn: batch norm (momentum 0.9) after every convolution and the hidden Dense")
    add("--loss", default=None, choices=LOSSES,
        help="summed_sigmoid: the published sigmoid cross-entropy summed over the classes; "
        "softmax: the softmax cross-entropy")
    add("--momentum", type=float, default=None, help="SGD momentum")
    add("--weight_decay", type=float, default=None,
        help="L2 coefficient of the kernels for every algorithm but kp (applied as the "
        "decoupled decay weight_decay / (1 - momentum))")
    add("--schedule", default=None, choices=SCHEDULES,
        help="constant, or a cosine from --learning_rate to 0 at the last epoch")
    mirror = parser.add_argument_group(
        "weight mirror (--algo wm): for --model mlp in the published code's units, for the "
        "convnets in keras_wt's (MirrorCallback's η, σ, λ)")
    add = adder(mirror)
    add("--mirror_learning_rate", type=float, default=None,
        help="mlp: published η (default 0.01): ΔB = η·xᵀ·sigmoid(xW+b) summed over the noise "
        "batch; keras_wt's averaged linear step is η·mirror_batch_size/4. convnets: keras_wt's "
        "η (the recipe's by default)")
    add = adder(mirror.add_mutually_exclusive_group())
    add("--mirror_noise_amplitude", type=float, default=None,
        help="uniform noise in [-a, a) (default 0.05, σ = a/√3)")
    add("--mirror_noise_std", type=float, default=None,
        help="Gaussian noise N(0, σ²) instead of the uniform noise")
    add = adder(mirror)
    add("--mirror_noise_distribution", default=None,
        help="normal, uniform or rademacher (±σ), with the σ of --mirror_noise_std or "
        "--mirror_noise_amplitude/√3 (default: uniform for mlp, as published; rademacher for the "
        "convnets, or uniform with --mirror_noise_amplitude)")
    add("--mirror_decay", type=float, default=None,
        help="mirror decay λ of B: ΔB −= η_m·λ·B with keras_wt's η_m, B → (σ²/λ)·W (mlp: "
        "none, as published; convnets: the recipe's)")
    add("--mirror_every", type=int, default=1,
        help="mirror after every this many training batches")
    add("--mirror_steps", type=int, default=1,
        help="mirror steps (noise batches per layer) each time")
    add("--mirror_batch_size", type=int_or_auto, default=None,
        help="noise samples per layer and batch (mlp default: --batch_size); convnets: or "
        "'auto' (their default): per layer, the smallest batch whose residual angle is "
        "--mirror_target_angle, tan θ ≈ √(fan_in·η·λ/(2n)), at most --mirror_max_batch_size")
    add("--mirror_target_angle", type=float, default=None,
        help="degrees, for --mirror_batch_size auto")
    add("--mirror_max_batch_size", type=int, default=None,
        help="cap of --mirror_batch_size auto")
    add("--mirror_cost", type=float, default=None,
        help="convnets with auto noise batches: the mirror's products at most this fraction of "
        "a training step's; the layers that need more share a common cap (default 0.1; 0: no "
        "budget)")
    add("--mirror_cap_policy", default=None, choices=("angle", "rate"),
        help="a layer whose auto noise batch is capped: keeps η and settles at a larger angle "
        "(angle), or mirrors at its own smaller η that reaches --mirror_target_angle with the "
        "capped batch, following W with a longer lag (rate; the convnets' default)")
    add("--mirror_warmup_steps", type=int_or_auto, default=None,
        help="mirror steps before training, or 'auto': ten lags 1/(η·λ), or three of the slowest "
        "layer if longer (mlp default: N_train // batch_size; convnets: auto)")
    add = adder(parser.add_argument_group("local alignment losses (--algo sa, ia)"))
    add("--local_loss_decay", type=float, default=None,
        help="coefficient λ of the decay primitive ½‖B‖² of B's local loss (default: the "
        "algorithm's, 1.0; sa's B → W/λ); the other coefficients are the algorithm's")
    add = adder(parser.add_argument_group("Kolen-Pollack (--algo kp)"))
    add("--kp_weight_decay", type=float, default=None,
        help="decoupled decay λ of W and B of kp layers (mlp: none, as published; convnets: "
        "the λ for which Σ_t lr_t·λ over the run is keras_wt.app.published.KP_DECAY_BUDGET)")
    return parser


def validate(config):
    """The rules of the flags themselves, without TensorFlow: the command line's choices, flags
    that exclude each other, what a flag means for `--model` (`--size_hidden_layers`,
    `--cnn_filters`, `--mirror_batch_size auto`) and `--local_loss_decay`. The ranges of the
    settings are their configs' (`MirrorConfig`, `OptimizerConfig`, `DataConfig`, `TrainConfig`),
    checked where the flags become them (`keras_wt.app.published.train_config`, which names the
    flag); `parse_args` does both. Raises a `ValueError` that names the flag."""

    def check(flag, ok, allowed):
        if not ok:
            raise ValueError(f"--{flag}={config[flag]!r} is not allowed: it must be {allowed}")

    check("dataset", config["dataset"] in DATASETS, f"one of {DATASETS}")
    check("algo", config["algo"] in ALGORITHMS, f"one of {ALGORITHMS}")
    check("model", config["model"] in MODELS, f"one of {MODELS}")
    sizes = config["size_hidden_layers"]
    check("size_hidden_layers", len(sizes) >= 1 and all(s >= 1 for s in sizes),
          "one or more integers >= 1")
    check("size_hidden_layers", config["model"] != "cnn" or len(sizes) == 1,
          "a single integer (the dense width) with --model cnn")
    check("cnn_filters", len(config["cnn_filters"]) >= 1
          and all(f >= 1 for f in config["cnn_filters"]), "one or more integers >= 1")
    decay = config.get("local_loss_decay")
    check("local_loss_decay", decay is None or (math.isfinite(decay) and decay > 0),
          "a positive number")
    check("mirror_noise_std",
          config["mirror_noise_amplitude"] is None or config["mirror_noise_std"] is None,
          "left out when --mirror_noise_amplitude is given")
    check("mirror_batch_size", config["mirror_batch_size"] != "auto" or config["model"] != "mlp",
          "an integer with --model mlp (the published units convert with it)")
    return config


def parse_flags(argv=None):
    """Parses the command line and checks the flags' own rules (`validate`), without TensorFlow;
    returns `(config, explicit_flags)`.

    Raises:
        ValueError: a flag has a value that argparse accepts but the flags' rules refuse.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config = vars(build_parser().parse_args(argv))
    explicit = set(vars(build_parser(defaults=False).parse_args(argv)))
    return validate(config), explicit


def parse_args(argv=None):
    """`parse_flags`, then every setting checked by its config
    (`keras_wt.app.published.train_config`; imports TensorFlow); returns `(config,
    explicit_flags)`.

    Raises:
        ValueError: a flag has a value that argparse accepts but the experiment cannot use,
            named as `--flag=value`.
    """
    config, explicit = parse_flags(argv)
    check(config)
    return config, explicit


def check(config):
    """Checks a flag dict (`validate`'d) against the configs it becomes; raises the
    `ValueError` of `keras_wt.app.published.train_config`, which names the flag."""
    from keras_wt.app import published  # TensorFlow: only once the flags are parsed

    published.train_config(config)
    return config
