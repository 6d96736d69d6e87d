"""What `keras-wt-train`'s flags mean: the published units of the reference code → keras_wt's
configs, in one function, `train_config`.

`keras-wt-train` (flags in `keras_wt.app.flags`) reproduces the command line of Akrout et al.'s
public NumPy code. The defaults are the reference configuration, so numbers compare with the
published code: an MLP (784-500-10) with sigmoid hidden and output units trained with sigmoid
cross-entropy summed over the classes and averaged over the batch
(`keras_wt.models.SummedSigmoidCrossEntropy`), plain SGD without momentum, inputs scaled to
[0, 1] and flattened, and W, b and B drawn from `N(0, 1/(fan_in + fan_out))`. When
`--learning_rate` is not given each algorithm uses its published learning rate
(`PUBLISHED_LEARNING_RATES`).

Weight mirror, published units. The published code mirrors each layer with one noise batch
`x` of `batch_size` samples, uniform in `[-a, a)` with `a = 0.05`, after every training batch
(and `N_train / batch_size` batches before training), and steps

    B ← B + η_pub · xᵀ·sigmoid(xW + b)      (summed over the noise batch, η_pub = 0.01).

Since `sigmoid(z) ≈ 1/2 + z/4` and the noise has zero mean, the step is on average
`(η_pub/4)·xᵀ(xW)`. keras_wt's mirror step (DESIGN.md §2) is `η_m·xᵀ(xW)/n`, averaged over the
`n` noise samples and on the linear output, so the published step is

    η_m = η_pub · n / 4         (0.01 · 128 / 4 = 0.32 with the defaults)

and the noise has `σ = a/√3`. For `--model mlp`, `--mirror_learning_rate` takes `η_pub`
(published units) and `--mirror_noise_amplitude` takes `a`; the converted `η_m` and `σ` are
written to `experiment_config.json` under `"derived"` (`mirror_learning_rate_keras_wt`,
`mirror_noise_std`). The convnets (`--model cnn`, `resnet20`) are not in the published code: their
mirror flags are in keras_wt's units, over `keras_wt.app.config.RECIPE_MIRROR`.

Kolen–Pollack. `--kp_weight_decay` is the decoupled `λ` of `W` and `B`
(`OptimizerConfig.decoupled_decay`), passed as is; without it the mlp has none (as published) and
the convnets the `λ` of the decay budget `KP_DECAY_BUDGET`.
"""

import contextlib
import math
import re

from keras_wt import algorithms
from keras_wt.algorithms import Learning
from keras_wt.app.config import RECIPE_MIRROR, DataConfig, ModelConfig, TrainConfig
from keras_wt.app.flags import PUBLISHED_LEARNING_RATES
from keras_wt.mirror import MirrorConfig
from keras_wt.schedules import OptimizerConfig

PROBE_SIZE = 1000  # test examples on which the delta angles are measured
# The published mirror step and noise (module docstring), in the published units.
PUBLISHED_MIRROR_LEARNING_RATE = 0.01
PUBLISHED_NOISE_AMPLITUDE = 0.05

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

# The flag that gives each field of the configs `train_config` builds: a config's error about a
# field is reported as one about its flag (`_named_by_flags`). The mirror's noise_std is
# --mirror_noise_std or --mirror_noise_amplitude, whichever is given.
DATA_FLAGS = {"dataset": "dataset", "batch_size": "batch_size", "train_subset": "train_subset",
              "steps_per_epoch": "steps_per_epoch"}
OPTIMIZER_FLAGS = {"learning_rate": "learning_rate", "momentum": "momentum",
                   "schedule": "schedule", "l2": "weight_decay",
                   "decoupled_decay": "kp_weight_decay"}
MIRROR_FLAGS = {name: f"mirror_{name}" for name in (
    "learning_rate", "noise_std", "noise_distribution", "decay", "every", "steps", "batch_size",
    "target_angle", "max_batch_size", "cap_policy", "warmup_steps")}
RUN_FLAGS = {"algo": "algo", "epochs": "n_epochs", "eval_every": "test_frequency",
             "seed": "seed", "loss": "loss"}


@contextlib.contextmanager
def _named_by_flags(flags, config, fields, values):
    """Inside it, a config's `ValueError` about one of its `fields` (`{field: flag}`; the
    configs' errors begin with `field=value`) is raised again about the flag and the value given
    on the command line: `--learning_rate=-0.1 is not allowed: it must be a finite number > 0`,
    with the config's value after it where the flag's units differ (`(MirrorConfig.
    learning_rate=-32.0)`). The rule itself is the config's, checked there only. `values`: the
    field values the config was given."""
    try:
        yield
    except ValueError as e:
        message = str(e)
        match = re.match(r"(\w+)=", message)
        field = match and match.group(1)
        flag = fields.get(field)
        if flag is None or flags.get(flag) is None:
            raise
        value = values.get(field)
        reason = message.removeprefix(f"{field}={value!r} ")
        reason = reason.removeprefix("is not allowed: ").replace("is not one of", "must be one of")
        if reason.startswith("must "):
            reason = f"it {reason}"
        for other, other_flag in fields.items():  # another setting the reason names, as given
            if flags.get(other_flag) is not None and (
                    repr(values.get(other)) == repr(flags[other_flag])):
                reason = re.sub(rf"\b{other}=", f"--{other_flag}=", reason)
        given = f"--{flag}={flags[flag]!r}"
        if repr(value) != repr(flags[flag]):  # another unit, or a derived value
            reason += f" ({config}.{field}={value!r})"
        raise ValueError(f"{given} is not allowed: {reason}") from None


def recipe(flags):
    """`{learning_rate, momentum, weight_decay, schedule, loss}` of a flag dict: the flags given,
    else the published configuration (the mlp: the published learning rate of the algorithm,
    plain SGD, no decay, a constant rate, the summed sigmoid cross-entropy) or `CONVNET_RECIPE`.
    (`weight_decay`: `--weight_decay`, the L2 coefficient of every algorithm but kp.)"""
    if flags["model"] == "mlp":
        base = {"learning_rate": PUBLISHED_LEARNING_RATES[flags["algo"]], "momentum": 0.0,
                "weight_decay": 0.0, "schedule": "constant", "loss": "summed_sigmoid"}
    else:
        base = CONVNET_RECIPE
    return {key: base[key] if flags[key] is None else flags[key] for key in base}


def learning_rate(flags):
    """The (peak) SGD learning rate: `--learning_rate`, else the published rate of the
    algorithm (mlp) or the convnet recipe's."""
    return float(recipe(flags)["learning_rate"])


def mirror_learning_rate(published_learning_rate, mirror_batch_size):
    """keras_wt's `η_m` that reproduces the published mirror step (module docstring):
    `η_pub · n / 4`: the published step sums over the `n` noise samples and uses
    `sigmoid(xW + b) ≈ 1/2 + (xW + b)/4`; keras_wt's averages and uses `xW`."""
    return published_learning_rate * mirror_batch_size / 4.0


def train_config(flags, run_dir=None):
    """The `keras_wt.app.config.TrainConfig` of a flag dict of `keras-wt-train`, writing to
    `run_dir`: the one place where the flags' published units become keras_wt's (module
    docstring).

    * the optimizer: `recipe`; for an algorithm whose `B` learns through the optimizer (`kp`),
      `--kp_weight_decay` as the decoupled decay (the mlp's default none), else (the convnets)
      the decay budget `KP_DECAY_BUDGET`, instead of `--weight_decay`;
    * the mirror: for the mlp converted from the published units (`η_m = η_pub·n/4`, uniform
      noise of `σ = a/√3`, no decay, a noise batch of `--batch_size`, a warm-up of one pass over
      the training data); for the convnets `RECIPE_MIRROR` with the flags given, in keras_wt's
      units (`--mirror_noise_amplitude a`: uniform noise of `σ = a/√3`).

    Every range of a setting is its config's rule, checked there only; this is where the flags'
    values meet them, so it is the full check of a flag dict (`keras_wt.app.flags.parse_args`).

    Raises:
        ValueError: a config refuses a setting: named as the flag and the value given
            (`--momentum=1.0 is not allowed: it must be a number in [0, 1)`).
    """
    mlp = flags["model"] == "mlp"
    algorithm = algorithms.get(flags["algo"])
    learns = algorithm.learns_feedback
    if mlp:
        options = {"hidden": list(flags["size_hidden_layers"])}
    elif flags["model"] == "cnn":
        options = {"filters": list(flags["cnn_filters"]),
                   "dense_units": flags["size_hidden_layers"][0],
                   "batch_norm": flags["batch_norm"]}
    else:
        options = {}
    if flags.get("local_loss_decay") is not None and learns == Learning.LOSS:  # else ignored, warned
        options["feedback_loss"] = dict(algorithm.local_loss, decay=flags["local_loss_decay"])
    values = dict(dataset=flags["dataset"], batch_size=flags["batch_size"],
                  train_subset=flags.get("train_subset"),
                  steps_per_epoch=flags.get("steps_per_epoch"))
    with _named_by_flags(flags, "DataConfig", DATA_FLAGS, values):
        data = DataConfig(data_dir=flags["data_dir"], **values)
    optimization = recipe(flags)
    decay = {"l2": optimization["weight_decay"]}
    if learns == Learning.OPTIMIZER:  # Kolen-Pollack's decay is decoupled: the same λ for W and B
        if flags["kp_weight_decay"] is not None or mlp:
            decay = {"l2": 0.0, "decoupled_decay": flags["kp_weight_decay"] or 0.0}
        else:
            decay = {"l2": 0.0, "kp_decay_budget": KP_DECAY_BUDGET}
    values = dict(learning_rate=float(optimization["learning_rate"]),
                  schedule=optimization["schedule"], momentum=optimization["momentum"], **decay)
    with _named_by_flags(flags, "OptimizerConfig", OPTIMIZER_FLAGS, values):
        optimizer = OptimizerConfig(warmup_epochs=0, decay_epochs=(), **values)
    # A decay flag the algorithm does not use (warned about, ignored) is still held to the rule
    # of the field it would give.
    for field in ("l2", "decoupled_decay"):
        flag = OPTIMIZER_FLAGS[field]
        if flags.get(flag) is not None and flags[flag] != values.get(field):
            unused = {"learning_rate": 1.0, "l2": 0.0, field: flags[flag]}
            with _named_by_flags(flags, "OptimizerConfig", {field: flag}, unused):
                OptimizerConfig(**unused)

    distribution = flags.get("mirror_noise_distribution")
    amplitude, std = flags["mirror_noise_amplitude"], flags["mirror_noise_std"]
    given = {name: flags[f"mirror_{name}"] for name in (
        "every", "steps", "learning_rate", "decay", "batch_size", "target_angle",
        "max_batch_size", "cap_policy", "warmup_steps")}
    mirror_flags = dict(MIRROR_FLAGS)
    if amplitude is not None:
        mirror_flags["noise_std"] = "mirror_noise_amplitude"
    if mlp:
        batch_size = flags["batch_size"] if given["batch_size"] is None else given["batch_size"]
        published = given["learning_rate"]
        published = PUBLISHED_MIRROR_LEARNING_RATE if published is None else published
        if std is None:
            std = (PUBLISHED_NOISE_AMPLITUDE if amplitude is None else amplitude) / math.sqrt(3.0)
            distribution = distribution or "uniform"
        given.update(learning_rate=mirror_learning_rate(published, batch_size),
                     decay=given["decay"] or 0.0, batch_size=batch_size)
        values = dict(given, noise_std=std, noise_distribution=distribution or "normal")
        with _named_by_flags(flags, "MirrorConfig", mirror_flags, values):
            mirror = MirrorConfig.of(None, **values)
    else:
        if amplitude is not None:
            std, distribution = amplitude / math.sqrt(3.0), distribution or "uniform"
        values = dict(given, noise_std=std, noise_distribution=distribution)
        with _named_by_flags(flags, "MirrorConfig", mirror_flags, values):
            mirror = MirrorConfig.of(RECIPE_MIRROR, **values)
    values = dict(algo=flags["algo"], epochs=flags["n_epochs"],
                  eval_every=flags["test_frequency"], seed=flags["seed"], loss=optimization["loss"])
    if flags.get("mirror_cost") is not None:
        values["mirror_cost"] = flags["mirror_cost"]
    with _named_by_flags(flags, "TrainConfig", dict(RUN_FLAGS, mirror_cost="mirror_cost"),
                         values):
        return TrainConfig(
            data=data,
            # The published figures show the first layer's weight angle: the reference MLP
            # keeps (and trains) the B that no gradient uses; the convnets leave it out.
            model=ModelConfig(name=flags["model"], options=options, dtype="float32",
                              keep_unused_feedback=mlp),
            optimizer=optimizer,
            mirror=mirror,
            mirror_warmup_one_pass=mlp and given["warmup_steps"] is None,
            alignment="full",
            alignment_probe_size=PROBE_SIZE,
            steps_per_execution="auto",  # several steps per host call where nothing changes
            model_dir=run_dir,
            keep_checkpoints=False,
            verbose=keras_verbose(flags["verbose"]),
            divergence_check=flags["divergence_check"],
            **values,
        )


def keras_verbose(verbose):
    """`fit`'s `verbose` for `--verbose`: the console has keras_wt's one summary line per epoch
    (`keras_wt.app.callbacks.ResultsRecorder`), so Keras prints nothing (0) unless `--verbose`
    2 or 3 asks for its own line per epoch as well (2)."""
    return 2 if verbose >= 2 else 0


def derived(config):
    """What the flags mean in keras_wt's units (of their `TrainConfig`), for
    `experiment_config.json`."""
    optimizer = config.optimizer
    values = {"learning_rate": optimizer.learning_rate, "momentum": optimizer.momentum,
              "weight_decay": optimizer.l2, "schedule": optimizer.schedule, "loss": config.loss}
    if algorithms.get(config.algo).learns_feedback == Learning.MIRROR:
        values.update(
            mirror_learning_rate_keras_wt=config.mirror.learning_rate,
            mirror_noise_std=config.mirror.noise_std,
            mirror_noise_distribution=config.mirror.noise_distribution,
            mirror_batch_size=config.mirror.batch_size,
        )
    return values
