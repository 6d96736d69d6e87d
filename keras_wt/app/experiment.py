"""The reference experiments: what the flags of `keras-wt-train` mean.

`keras-wt-train` (flags in `keras_wt.app.cli`) reproduces the command line of Akrout et al.'s public
NumPy code on top of `keras_wt.app.training.train`:

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

A run writes the run folder of `keras_wt.app.runs` in `<save_dir>/<dataset>/<algo>-V<i>/`; evaluated
epochs (the first, every `--test_frequency`-th after it and the last) are measured on the test
set, and the weight and delta angles on its first `PROBE_SIZE` examples. `--resume` continues an
interrupted run exactly (`keras_wt.app.backup.AtomicBackup`).
"""

import dataclasses
import logging
import math
import os

from keras_wt import algorithms
from keras_wt.app import runs
from keras_wt.app import training
from keras_wt.app.config import TrainConfig
from keras_wt.app.cli import PUBLISHED_LEARNING_RATES, validate

logger = logging.getLogger(__name__)

# Flags that may differ between an interrupted run and its `--resume`.
RESUMABLE_OVERRIDES = ("n_epochs", "data_dir", "verbose", "divergence_check")

PROBE_SIZE = 1000  # test examples on which the delta angles are measured

# The convnets (--model cnn, resnet20) are not in the published code. Their recipe, measured in
# RESULTS.md ("Convnets"): batch norm (the cnn's --batch_norm), softmax cross-entropy, SGD with
# momentum, L2 weight decay of the kernels, a cosine schedule. Without batch norm, with the
# reference loss and plain SGD, feedback alignment blows up on the CNN, and so does everything
# that behaves like it early on (RESULTS.md, "Controls").
CONVNET_RECIPE = {
    "learning_rate": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "loss": "softmax",
}
# Kolen-Pollack's B − W shrinks by exp(−Σ_t lr_t·λ) over a run: a budget of 5 leaves 0.7 % of it,
# whatever the length of the run (keras_wt.schedules.decay_for_budget).
KP_DECAY_BUDGET = 5.0
# The convnets' weight mirror, in keras_wt's units: B → (σ²/λ)·W = W within ≈ 1/(η·λ) = 20 mirror
# steps, after every training step; each layer's noise batch sized for a residual angle of
# `target_angle` (wide Dense layers need thousands of samples, convolutions a handful).
CONVNET_MIRROR = {
    "learning_rate": 0.05,
    "noise_std": 1.0,
    "decay": 1.0,
    "batch_size": "auto",
    "target_angle": 8.0,
    "max_batch_size": 2048,
    "warmup_steps": 200,
}

def recipe(config):
    """`{learning_rate, momentum, weight_decay, schedule, loss}` of a flag dict: the flags given,
    else the published configuration (the mlp: the published learning rate of the algorithm,
    plain SGD, no decay, a constant rate, the summed sigmoid cross-entropy) or `CONVNET_RECIPE`."""
    if config["model"] == "mlp":
        base = {"learning_rate": PUBLISHED_LEARNING_RATES[config["algo"]], "momentum": 0.0,
                "weight_decay": 0.0, "schedule": "constant", "loss": "summed_sigmoid"}
    else:
        base = CONVNET_RECIPE
    return {key: base[key] if config[key] is None else config[key] for key in base}


def learning_rate(config):
    """The (peak) SGD learning rate: `--learning_rate`, else the published rate of the
    algorithm (mlp) or the convnet recipe's."""
    return float(recipe(config)["learning_rate"])


def mirror_learning_rate(published_learning_rate, mirror_batch_size):
    """keras_wt's `η_m` that reproduces the published mirror step (module docstring):
    `η_pub · n / 4`: the published step sums over the `n` noise samples and uses
    `sigmoid(xW + b) ≈ 1/2 + (xW + b)/4`; keras_wt's averages and uses `xW`."""
    return published_learning_rate * mirror_batch_size / 4.0


def mirror_noise(config):
    """`(noise_std, noise_distribution)` of the mirror noise: uniform in `[-a, a)` has
    `σ = a/√3`; `--mirror_noise_std` gives Gaussian noise; `--mirror_noise_distribution`
    another distribution of the same `σ`."""
    distribution = config.get("mirror_noise_distribution")
    if config["mirror_noise_std"] is not None:
        return float(config["mirror_noise_std"]), distribution or "normal"
    amplitude = config["mirror_noise_amplitude"]
    amplitude = 0.05 if amplitude is None else amplitude
    return amplitude / math.sqrt(3.0), distribution or "uniform"


def mirror_settings(config):
    """The `MirrorCallback` arguments of a flag dict, in keras_wt's units: for the mlp converted
    from the published units (module docstring; `warmup_steps` `None` is one pass over the
    training data, `N_train // batch_size`), for the convnets `CONVNET_MIRROR` with the flags
    given."""
    if config["model"] != "mlp":
        settings = dict(CONVNET_MIRROR, every=config["mirror_every"], steps=config["mirror_steps"],
                        noise_distribution="normal", seed=config["seed"])
        if config["mirror_noise_amplitude"] is not None:
            settings.update(noise_std=config["mirror_noise_amplitude"] / math.sqrt(3.0),
                            noise_distribution="uniform")
        if config.get("mirror_noise_distribution") is not None:
            settings["noise_distribution"] = config["mirror_noise_distribution"]
        for flag in ("learning_rate", "noise_std", "decay", "batch_size", "target_angle",
                     "max_batch_size", "warmup_steps"):
            if config[f"mirror_{flag}"] is not None:
                settings[flag] = config[f"mirror_{flag}"]
        return settings
    noise_std, distribution = mirror_noise(config)
    batch_size = config["mirror_batch_size"] or config["batch_size"]
    published = config["mirror_learning_rate"]
    return dict(
        learning_rate=mirror_learning_rate(0.01 if published is None else published, batch_size),
        noise_std=noise_std,
        decay=config["mirror_decay"] or 0.0,
        every=config["mirror_every"],
        steps=config["mirror_steps"],
        batch_size=batch_size,
        warmup_steps=config["mirror_warmup_steps"],
        noise_distribution=distribution,
        seed=config["seed"],
    )


def train_config(config, run_dir=None):
    """The `keras_wt.app.config.TrainConfig` of a flag dict, writing to `run_dir`."""
    if config["model"] == "mlp":
        options = {"hidden": list(config["size_hidden_layers"])}
    elif config["model"] == "cnn":
        options = {"filters": list(config["cnn_filters"]),
                   "dense_units": config["size_hidden_layers"][0],
                   "batch_norm": config["batch_norm"]}
    else:
        options = {}
    if config.get("local_loss_decay") is not None:
        algorithm = algorithms.get(config["algo"])
        if algorithm.learns_feedback == "loss":  # else ignored, with a warning (ignored_flags)
            options["feedback_loss"] = dict(algorithm.local_loss,
                                            decay=config["local_loss_decay"])
    optimization = recipe(config)
    weight_decay, kp_decay_budget = optimization["weight_decay"], None
    if algorithms.get(config["algo"]).learns_feedback == "optimizer":
        # Kolen-Pollack's decay is decoupled (the same λ for W and B): --kp_weight_decay, else
        # none for the mlp (as published) and the decay budget for the convnets.
        if config["kp_weight_decay"] is not None or config["model"] == "mlp":
            decay = config["kp_weight_decay"] or 0.0
            weight_decay = decay * (1.0 - optimization["momentum"])  # undone by create_optimizer
        else:
            weight_decay, kp_decay_budget = 0.0, KP_DECAY_BUDGET
    mirror = mirror_settings(config)
    return TrainConfig(
        model=config["model"],
        algo=config["algo"],
        dataset=config["dataset"],
        data_dir=config["data_dir"],
        model_dir=run_dir,
        model_options=options,
        loss=optimization["loss"],
        batch_size=config["batch_size"],
        train_subset=config.get("train_subset"),
        steps_per_epoch=config.get("steps_per_epoch"),
        epochs=config["n_epochs"],
        learning_rate=float(optimization["learning_rate"]),
        schedule=optimization["schedule"],
        warmup_epochs=0,
        decay_epochs=(),
        momentum=optimization["momentum"],
        weight_decay=weight_decay,
        kp_decay_budget=kp_decay_budget,
        dtype="float32",
        eval_every=config["test_frequency"],
        steps_per_execution="auto",  # several steps per host call where nothing changes
        mirror_learning_rate=mirror["learning_rate"],
        mirror_noise_std=mirror["noise_std"],
        mirror_noise_distribution=mirror["noise_distribution"],
        mirror_decay=mirror["decay"],
        mirror_every=mirror["every"],
        mirror_steps=mirror["steps"],
        mirror_batch_size=mirror["batch_size"],
        mirror_target_angle=mirror.get("target_angle", 5.0),
        mirror_max_batch_size=mirror.get("max_batch_size", 4096),
        mirror_warmup_steps=mirror["warmup_steps"],
        alignment="full",
        alignment_probe_size=PROBE_SIZE,
        # The published figures show the first layer's weight angle: the reference MLP keeps
        # (and trains) the B that no gradient uses; the convnets leave it out.
        keep_unused_feedback=config["model"] == "mlp",
        keep_checkpoints=False,
        seed=config["seed"],
        verbose=keras_verbose(config["verbose"]),
        divergence_check=config["divergence_check"],
    )


def keras_verbose(verbose):
    """`fit`'s `verbose` for `--verbose`: the console has keras_wt's one summary line per epoch
    (`keras_wt.app.callbacks.ResultsRecorder`), so Keras prints nothing (0) unless `--verbose`
    2 or 3 asks for its own line per epoch as well (2)."""
    return 2 if verbose >= 2 else 0


def derived(config):
    """What the flags mean in keras_wt's units, for `experiment_config.json`."""
    values = dict(recipe(config))
    if algorithms.get(config["algo"]).learns_feedback == "mirror":
        settings = mirror_settings(config)
        values.update(
            mirror_learning_rate_keras_wt=settings["learning_rate"],
            mirror_noise_std=settings["noise_std"],
            mirror_noise_distribution=settings["noise_distribution"],
            mirror_batch_size=settings["batch_size"],
        )
    return values


class UsageError(ValueError):
    """The command line asks for something that cannot be done (exit status 2)."""


class ResumeError(UsageError):
    """`--resume` names no run, or flags that differ from the run's."""


def resolve_resume(config, explicit):
    """`(run_dir, config)` of the run to continue, or `(None, config)` for a new run.

    Without a folder, the latest `<algo>-V<i>` of the dataset whose saved flags agree with the
    flags given on the command line is continued. A run folder stopped before it saved its flags
    (`keras_wt.app.runs.is_unstarted`, no `experiment_config.json`) is started again in place with
    the flags given.

    Raises:
        ResumeError: `--resume` names no run folder, or one with other flags.
        keras_wt.app.runs.RunError: a run folder's saved flags are damaged.
    """
    fixed = sorted(set(explicit) - {"resume", "save_dir"} - set(RESUMABLE_OVERRIDES))
    resume = config["resume"]
    if resume == "latest":
        candidates = []
        for path in runs.run_dirs(config["save_dir"], config["dataset"], config["algo"]):
            saved = runs.read_config(path)
            if (saved is None and runs.is_unstarted(path)) or (
                    saved is not None and all(saved.get(f) == config[f] for f in fixed)):
                candidates.append(path)
        if not candidates:
            logger.info("--resume: no run of %s on %s in %s with these flags yet; starting a "
                        "new one", config["algo"], config["dataset"], config["save_dir"])
            return None, config
        resume = max(candidates, key=runs.run_version)
    if not os.path.isdir(resume):
        raise ResumeError(f"--resume={resume!r} is not a run folder: it does not exist")
    saved = runs.read_config(resume)
    if saved is None and runs.is_unstarted(resume):
        logger.info("%s was stopped before it saved its flags and holds nothing trained: "
                    "starting it again with the flags given", resume)
        return resume, dict(config, resume=None)
    if saved is None:
        raise ResumeError(f"--resume={resume!r} is not a run folder: it has no {runs.CONFIG_FILE}")
    for flag in fixed:
        if config[flag] != saved.get(flag):
            raise ResumeError(
                f"--{flag}={config[flag]!r} differs from the resumed run's {saved.get(flag)!r} "
                f"({resume}); only {RESUMABLE_OVERRIDES} may change when resuming"
            )
    flags = {flag: saved[flag] for flag in config if flag in saved}
    for flag in RESUMABLE_OVERRIDES:
        if flag in explicit:
            flags[flag] = config[flag]
    flags["resume"] = None
    flags["save_dir"] = config["save_dir"]
    return resume, validate(dict(config, **flags))


def ignored_flags(config, explicit):
    """The flags given that the algorithm does not use: the `--mirror_*` flags unless its `B`
    learns by mirroring, `--kp_weight_decay` unless it learns through the optimizer,
    `--local_loss_decay` unless it learns from a local loss."""
    learns = algorithms.get(config["algo"]).learns_feedback
    return sorted(
        flag for flag in explicit
        if (flag.startswith("mirror_") and learns != "mirror")
        or (flag == "kp_weight_decay" and learns != "optimizer")
        or (flag == "local_loss_decay" and learns != "loss")
    )


def run(config, explicit=frozenset()):
    """Runs (or resumes) one experiment; returns its run folder.

    A new run's folder is deleted again when the run fails before it trained anything (bad
    data, an unwritable disk); a run folder this call did not create is never deleted.

    Args:
        config: the flag dict of `keras_wt.app.cli.parse_args`.
        explicit: the flags given on the command line (used to check a `--resume`).
    """
    ignored = ignored_flags(config, explicit)
    if ignored:
        logger.warning("%s: not used by --algo %s, ignored",
                       ", ".join(f"--{flag}" for flag in ignored), config["algo"])
    run_dir, config = resolve_resume(config, set(explicit)) if config["resume"] else (None, config)
    settings = train_config(config)  # bad settings fail here, before a folder is made
    new = run_dir is None
    if new:
        save_dir = config["save_dir"]
        if os.path.exists(save_dir) and not os.path.isdir(save_dir):
            raise UsageError(f"--save_dir={save_dir!r} is a file, not a folder: runs are written "
                             "to <save_dir>/<dataset>/<algo>-V<i>/")
        run_dir = runs.new_run_dir(save_dir, config["dataset"], config["algo"])
        logger.info("New run %s", run_dir)
    with runs.RunLock(run_dir):  # at once: nobody takes a new folder over (train takes it too)
        try:
            training.train(dataclasses.replace(settings, model_dir=run_dir), flags=config,
                           derived=derived(config))
        except Exception:
            if new:  # bad data, a full disk...: leave no run folder that never trained behind
                runs.remove_unstarted(run_dir)
            raise
    return run_dir
