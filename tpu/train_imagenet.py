"""Train ResNet-18/50 on ImageNet with backprop or without weight transport (Akrout et al. 2019).

On a Cloud TPU VM (see tpu/README.md for the full recipe):

    python tpu/train_imagenet.py --tpu=local --strategy=tpu \
        --data_dir=gs://BUCKET/imagenet --model_dir=gs://BUCKET/runs/resnet18-kp \
        --model=resnet18 --algo=kp --batch_size=1024

A smoke run on any machine:

    python tpu/train_imagenet.py --strategy=default --use_synthetic_data --image_size=32 \
        --num_classes=10 --batch_size=8 --steps_per_epoch=2 --eval_steps=1 --epochs=1

Restarting the same command with the same --model_dir resumes from the last completed epoch
(weights, feedback kernels, optimizer and weight-mirror state). The logic lives in
`keras_wt.app.training`; this file only maps flags to a `keras_wt.app.config.TrainConfig` (each to
the field of the same name of its component config: `--mirror_decay` to `mirror.decay`; the
defaults are the configs' own: `keras_wt.app.config.RECIPE_MIRROR`, `IMAGENET_OPTIMIZER`). Errors end
in one line: exit status 2 for bad flags or settings, 1 for a failure while running (see
`keras_wt.app.training.describe_failure`).
"""

import argparse
import dataclasses
import logging
import sys

from keras_wt import algorithms
from keras_wt.algorithms import Learning
from keras_wt import schedules
from keras_wt.app import config as config_lib
from keras_wt.app.flags import int_or_auto
from keras_wt.app import strategies
from keras_wt.app import training
from keras_wt.app.config import (
    IMAGENET_OPTIMIZER,
    RECIPE_MIRROR,
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from keras_wt.mirror import MirrorConfig

# The flags of each component config: `--<prefix><field>` sets the config's `<field>`.
DATA_FLAGS = ("data_dir", "train_examples", "eval_examples", "use_synthetic_data", "image_size",
              "num_classes", "batch_size", "steps_per_epoch")
MODEL_FLAGS = {"model": "name", "dtype": "dtype"}
OPTIMIZER_FLAGS = {"schedule": "schedule", "warmup_epochs": "warmup_epochs",
                   "decay_epochs": "decay_epochs", "momentum": "momentum", "weight_decay": "l2"}
# `--mirror_<field>`: the type and help of each flag of `MirrorConfig`'s fields.
MIRROR_FLAGS = {
    "learning_rate": (float, "fraction of the way to B's target covered per mirror step."),
    "noise_std": (float, "standard deviation of the mirror noise."),
    "decay": (float, "B tends to (noise_std**2 / mirror_decay) * W."),
    "every": (int, "mirror after every N training steps."),
    "steps": (int, "mirror steps each time."),
    "batch_size": (
        int_or_auto,
        "noise examples per layer and mirror step (all replicas together), or 'auto': per "
        "layer, the smallest batch whose residual angle is --mirror_target_angle (tan θ ≈ "
        "√(fan_in·η·λ/(2n)), capped at --mirror_max_batch_size)."),
    "target_angle": (float, "degrees, for --mirror_batch_size=auto."),
    "max_batch_size": (int, "cap of --mirror_batch_size=auto."),
    "cap_policy": (str, "a layer whose auto noise batch is capped keeps η and settles at a "
                   "larger angle ('angle'), or mirrors at its own smaller η that reaches "
                   "--mirror_target_angle with the capped batch, with a longer lag ('rate')."),
    "warmup_steps": (
        int_or_auto,
        "mirror steps before the first training step, or 'auto': ten lags 1/(η·λ), or three "
        "of the slowest layer if longer."),
    "in_train_step": (bool, "run the mirror steps inside the compiled training step, after "
                      "each batch (the default), or between host calls "
                      "(--no-mirror_in_train_step)."),
}


def _ints_or_floats(text):
    return tuple(float(x) if "." in x else int(x) for x in text.split(",") if x)


def flag_parser():
    """The command-line flags; each maps to a field of `TrainConfig` or of one of its component
    configs (`DATA_FLAGS`, `MODEL_FLAGS`, `OPTIMIZER_FLAGS`, `--mirror_<field>`), except
    `--lr_per_256` (the peak `learning_rate` is `lr_per_256 · batch_size / 256`) and
    `--zero_init_residual` (an option of the ResNet builders)."""
    o = IMAGENET_OPTIMIZER
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("hardware")
    g.add_argument("--strategy", choices=strategies.STRATEGIES, default="default",
                   help="tpu: TPUStrategy; mirrored: the GPUs of this machine; multiworker: "
                   "MultiWorkerMirroredStrategy from TF_CONFIG; default: one device.")
    g.add_argument("--tpu", default=None,
                   help="TPU name, or 'local' on a TPU VM (the default with --strategy=tpu).")
    g.add_argument("--mirrored_devices", default=None,
                   help="comma-separated devices for --strategy=mirrored (default: all GPUs).")
    g.add_argument("--dtype", choices=config_lib.DTYPES, default="auto",
                   help="auto: mixed_bfloat16 on TPUs, float32 elsewhere.")
    g.add_argument("--steps_per_execution", type=int_or_auto, default="auto",
                   help="training steps per host call, or auto: in the first epoch the largest "
                   "divisor of the epoch up to 10, then the largest whose call takes about a "
                   "second at the first epoch's step time (1 under --strategy=mirrored or "
                   "multiworker, where Keras runs one).")
    g.add_argument("--jit_compile", action=argparse.BooleanOptionalAction, default=None,
                   help="override Keras's XLA setting (default: on for --strategy=default, off "
                   "otherwise; TPUs compile with XLA regardless).")

    g = p.add_argument_group("data and model")
    g.add_argument("--data_dir", default=None,
                   help="ImageNet TFRecords train-*/validation-* (a gs:// path works).")
    g.add_argument("--train_examples", type=int, default=None,
                   help="examples in the train-* files (default: ImageNet's 1,281,167); every "
                   "pass over them is counted, and a pass that reads another number stops the "
                   "run (a truncated or missing file).")
    g.add_argument("--eval_examples", type=int, default=None,
                   help="examples in the validation-* files (default: ImageNet's 50,000), "
                   "counted in the same way.")
    g.add_argument("--use_synthetic_data", action="store_true",
                   help="train and evaluate on one random batch (speed and smoke runs).")
    g.add_argument("--model", choices=("resnet18", "resnet50", "cnn"), default="resnet18",
                   help="ResNet v1.5 network (cnn: keras_wt.models.cnn, for smoke tests).")
    g.add_argument("--algo", choices=algorithms.ALGORITHMS, default="bp",
                   help="bp: backprop; fa: feedback alignment; ss: sign symmetry; wm: weight "
                   "mirror; kp: Kolen-Pollack.")
    g.add_argument("--image_size", type=int, default=224, help="side of the square crops.")
    g.add_argument("--num_classes", type=int, default=1000,
                   help="classes (labels 1..num_classes in the files).")
    g.add_argument("--zero_init_residual", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="start the last batch-norm scale of every residual block at 0.")
    g.add_argument("--model_dir", default=None,
                   help="checkpoints, backup for resuming, TensorBoard logs, history.csv.")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the data order and the mirror noise.")

    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=1024, help="global batch size.")
    g.add_argument("--epochs", type=int, default=90, help="training epochs.")
    g.add_argument("--steps_per_epoch", type=int, default=None,
                   help="default: train_examples // batch_size.")
    g.add_argument("--eval_steps", type=int, default=None,
                   help="evaluation batches per epoch (default: the whole validation set; 0: "
                   "no evaluation).")
    g.add_argument("--lr_per_256", type=float, default=0.1,
                   help="peak learning rate per 256 images, scaled linearly with batch_size.")
    g.add_argument("--schedule", choices=schedules.SCHEDULES, default=o.schedule,
                   help="after the warm-up: x0.1 at --decay_epochs, or a cosine to 0.")
    g.add_argument("--warmup_epochs", type=float, default=o.warmup_epochs,
                   help="epochs of linear learning-rate warm-up.")
    g.add_argument("--decay_epochs", type=_ints_or_floats, default=o.decay_epochs,
                   help="epochs of the x0.1 steps of --schedule=step, comma-separated.")
    g.add_argument("--momentum", type=float, default=o.momentum, help="SGD momentum.")
    g.add_argument("--weight_decay", type=float, default=o.l2,
                   help="L2 coefficient of the kernels (W and, for kp, B), applied as the "
                   "equivalent decoupled decay weight_decay / (1 - momentum) per unit learning "
                   "rate; biases and batch norm are not decayed.")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="label smoothing of the cross-entropy.")

    g = p.add_argument_group("weight mirror (--algo=wm): keras_wt.mirror.MirrorConfig")
    for name, (kind, text) in MIRROR_FLAGS.items():
        if kind is bool:
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"type": kind}
        g.add_argument(f"--mirror_{name}", default=getattr(RECIPE_MIRROR, name), help=text,
                       **kind)
    g.add_argument("--mirror_cost", type=float, default=config_lib.RECIPE_MIRROR_COST,
                   help="with --mirror_batch_size=auto: the mirror's products at most this "
                   "fraction of a training step's; the layers that need more share a common cap "
                   "and mirror at their own smaller rates (0: no budget).")

    g = p.add_argument_group("logging")
    g.add_argument("--alignment", choices=("none", "weights", "full"), default="weights",
                   help="weights: W-B angles and norm ratios each epoch; full: also delta and "
                   "gradient angles on a probe batch of validation images.")
    g.add_argument("--alignment_probe_size", type=int, default=64,
                   help="validation images of the probe batch of --alignment=full.")
    g.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity.")
    g.add_argument("--divergence_check", action=argparse.BooleanOptionalAction, default=True,
                   help="stop a run whose training loss explodes while finite: above 2x the loss "
                   "of a network that learned nothing (ln num_classes) for 100 steps, or over a "
                   "whole shorter epoch after the first (keras_wt.app.callbacks.StopOnDivergence); a "
                   "NaN or infinite loss, metric or weight stops a run regardless.")
    return p


def parse_flags(argv=None):
    """Parses `argv` (default: `sys.argv[1:]`) into a `keras_wt.app.config.TrainConfig`."""
    kwargs = vars(flag_parser().parse_args(argv))
    if kwargs["mirrored_devices"]:
        kwargs["mirrored_devices"] = tuple(kwargs["mirrored_devices"].split(","))
    learning_rate = schedules.peak_learning_rate(kwargs["batch_size"], kwargs.pop("lr_per_256"))
    zero_init_residual = kwargs.pop("zero_init_residual")
    options = {"zero_init_residual": zero_init_residual} if kwargs["model"].startswith(
        "resnet") else {}
    try:
        config = TrainConfig(
            data=DataConfig(dataset="imagenet", **{k: kwargs.pop(k) for k in DATA_FLAGS}),
            model=ModelConfig(options=options,
                              **{field: kwargs.pop(flag) for flag, field in MODEL_FLAGS.items()}),
            optimizer=dataclasses.replace(
                IMAGENET_OPTIMIZER, learning_rate=learning_rate,
                **{field: kwargs.pop(flag) for flag, field in OPTIMIZER_FLAGS.items()}),
            mirror=MirrorConfig.of(RECIPE_MIRROR, **{
                name: kwargs.pop(f"mirror_{name}") for name in MIRROR_FLAGS}),
            **kwargs,
        )
    except ValueError as e:
        flag_parser().error(str(e))
    ignored = ignored_flags(config)
    if ignored:
        logging.getLogger("keras_wt").warning(
            "%s: not used by --algo=%s, ignored", ", ".join(f"--{f}" for f in ignored), config.algo)
    return config


def ignored_flags(config):
    """The `--mirror_*` flags set away from their defaults when `--algo`'s `B` does not learn by
    mirroring (the flags the algorithm does not use)."""
    if algorithms.get(config.algo).learns_feedback == Learning.MIRROR:
        return []
    ignored = [f"mirror_{name}" for name in MIRROR_FLAGS
               if getattr(config.mirror, name) != getattr(RECIPE_MIRROR, name)]
    if config.mirror_cost != config_lib.RECIPE_MIRROR_COST:
        ignored.append("mirror_cost")
    return sorted(ignored)


def main(argv=None):
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = parse_flags(argv)
    try:
        return training.train(config)
    except KeyboardInterrupt:
        flag_parser().exit(130, "interrupted; run the same command again to resume\n")
    except Exception as e:
        failure = training.describe_failure(e)
        if failure is None:
            raise
        parser = flag_parser()
        parser.exit(failure[0], f"{parser.prog}: error: {failure[1]}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
