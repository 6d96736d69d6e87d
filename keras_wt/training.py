"""The pieces of the ImageNet trainer (`tpu/train_imagenet.py`), reusable and testable.

* `create_strategy`: `TPUStrategy`, `MirroredStrategy`, `MultiWorkerMirroredStrategy` or the
  default strategy, by name.
* `jit_compile_for`: the `jit_compile` Keras gets under each strategy (see its docstring).
* `WarmupSchedule`, `learning_rate_schedule`: 0.1 per 256 images scaled linearly with the global
  batch, a linear warm-up, then a step decay (×0.1 at epochs 30, 60, 80) or a cosine decay.
* `create_optimizer`: SGD with momentum and decoupled weight decay of the kernels only; for `kp`
  the same decay of `W` and `B` through `keras_wt.optimizers.KolenPollack`.
* `create_mirror_callback`: the weight-mirror steps of `wm` networks.
* `WeightAlignment`: writes the angle between `W` and `B` of every layer into `logs`.
* `imagenet_datasets`: training and evaluation pipelines with one-hot labels and an evaluation set
  padded to full batches, so that every validation image counts once with static shapes.
* `create_callbacks`: `BackupAndRestore`, mirror, alignment, per-epoch checkpoints, TensorBoard
  and CSV history, in the order that makes a resumed run continue exactly.
* `TrainConfig`, `train`: everything above, end to end.

Resuming: `BackupAndRestore` saves the model's weights (W, the feedback kernels B, batch-norm
statistics) and the optimizer's variables (momentum, step count) at the end of every epoch. The
learning rate is a function of the step count and the weight-mirror noise is seeded by it, so a
job restarted with the same command and `model_dir` continues exactly where the last completed
epoch ended.
"""

import dataclasses
import json
import logging
import math
import os

import keras
import numpy as np
import tensorflow as tf

from keras_wt import alignment
from keras_wt import algorithms
from keras_wt import callbacks as callbacks_lib
from keras_wt import datasets
from keras_wt import mirror as mirror_lib
from keras_wt import models
from keras_wt import optimizers as optimizers_lib
from keras_wt import layers as layers_lib

logger = logging.getLogger("keras_wt")

STRATEGIES = ("tpu", "mirrored", "multiworker", "default")
SCHEDULES = ("step", "cosine")
DTYPES = ("auto", "float32", "mixed_bfloat16")

# Variables that are never decayed: biases, batch-norm scale and offset. Feedback kernels are not
# trainable (the optimizer never sees them); the name is listed so that this stays true if a
# model ever makes them trainable.
NO_WEIGHT_DECAY = ("bias", "gamma", "beta", "feedback_kernel")


# --------------------------------------------------------------------------------------------
# Strategy and compilation
# --------------------------------------------------------------------------------------------


def create_strategy(name="default", tpu=None, devices=None):
    """Returns the `tf.distribute.Strategy` called `name`.

    Args:
        name: `"tpu"`, `"mirrored"`, `"multiworker"` or `"default"`.
        tpu: for `"tpu"`: the TPU's name, or `"local"` (the default) on a TPU VM.
        devices: for `"mirrored"`: the devices to use (default: every GPU, else the CPU).

    `"multiworker"` reads the cluster from the `TF_CONFIG` environment variable.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not one of {STRATEGIES}")
    if name == "tpu":
        tpu = tpu or "local"
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu not in ("", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def jit_compile_for(strategy_name):
    """The `jit_compile` argument of `model.compile` under the strategy `strategy_name`.

    * `"default"`: `True`: the whole training step is one XLA computation, as on a TPU.
    * `"tpu"`: `False`, and yet every step runs as XLA: `TPUStrategy` compiles the replicated
      step for the TPU itself, so Keras's own XLA wrapping would only add a second, outer
      compilation (Keras's `jit_compile="auto"` is off under every `tf.distribute` strategy).
    * `"mirrored"`, `"multiworker"`: `False`. Keras's XLA-compiled step fails under these
      strategies even for stock Keras models ("Trying to access resource ... located in device
      CPU:1 from device CPU:0", keras-team/keras#19005). The per-replica computation still
      compiles with XLA when it is wrapped in its own `tf.function(jit_compile=True)` inside
      `strategy.run`, which is how the tests check that every algorithm compiles for a TPU.
    """
    if strategy_name not in STRATEGIES:
        raise ValueError(f"strategy={strategy_name!r} is not one of {STRATEGIES}")
    return strategy_name == "default"


def is_chief(strategy):
    """Whether this process writes checkpoints and summaries (always, except on the non-chief
    workers of a `MultiWorkerMirroredStrategy`)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def prepare_for_multiworker(model):
    """Works around two bugs of Keras 3's `fit`/`evaluate` under `MultiWorkerMirroredStrategy`
    with more than one worker (keras-team/keras#20585, tensorflow/tensorflow#72388); a no-op
    under any other strategy. Call it once, after `model.compile`, before `model.fit`.

    1. Before training Keras builds the model on one sample batch that it averages over the
       replicas with `strategy.reduce("MEAN", (x, y))`, which fails on the tuple ("Attempt to
       convert a value (PerReplica...)"). Only the batch's shapes and dtypes matter there, so
       `model` is given a build that uses this worker's first replica's share.
    2. Every step Keras averages the replicas' loss and metrics with `strategy.reduce("MEAN",
       v, axis=0)`, which fails on scalars ("Invalid reduction dimension 0 for input with 0
       dimensions"). Keras's `reduce_per_replica` is wrapped (once per process) to average them
       over all replicas of all workers with `axis=None`; other strategies are unaffected.
    """
    strategy = model.distribute_strategy
    if not _is_multi_worker(strategy):
        return model

    def local_share(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local_share, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build
    _patch_multi_worker_reduction()
    return model


def _is_multi_worker(strategy):
    # The test Keras itself uses (keras.src.backend.tensorflow.trainer).
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def _patch_multi_worker_reduction():
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_keras_wt_multi_worker", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and _is_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None), values
            )
        return original(values, strategy, reduction)

    reduce_per_replica._keras_wt_multi_worker = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def _task_name(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "worker-0"
    return f"{resolver.task_type}-{resolver.task_id}"


# --------------------------------------------------------------------------------------------
# Learning rate and optimizer
# --------------------------------------------------------------------------------------------


def peak_learning_rate(batch_size, lr_per_256=0.1):
    """`lr_per_256 · batch_size / 256`: the linear scaling rule of Goyal et al. (2017)."""
    return lr_per_256 * batch_size / 256.0


@keras.saving.register_keras_serializable(package="keras_wt")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up to `peak_learning_rate`, then a step or cosine decay.

    At step `t` (0-based, the number of updates already made):

    * `t < warmup_steps`: `peak · (t + 1) / warmup_steps`;
    * `"step"`: `peak · decay_rate^k`, `k` the number of `boundaries` that are `<= t`;
    * `"cosine"`: `peak · ½(1 + cos(π·p))`, `p = (t − warmup_steps) / (total_steps −
      warmup_steps)` clipped to `[0, 1]`.

    Args:
        peak_learning_rate: the learning rate at the end of the warm-up.
        warmup_steps: steps of linear warm-up (0: none).
        decay: `"step"` or `"cosine"`.
        boundaries: for `"step"`: the steps at which the rate is multiplied by `decay_rate`.
        decay_rate: for `"step"`.
        total_steps: for `"cosine"`: the step at which the rate reaches 0.
    """

    def __init__(
        self,
        peak_learning_rate,
        warmup_steps=0,
        decay="step",
        boundaries=(),
        decay_rate=0.1,
        total_steps=None,
    ):
        if decay not in SCHEDULES:
            raise ValueError(f"decay={decay!r} is not one of {SCHEDULES}")
        if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError(
                f"A cosine decay needs total_steps > warmup_steps; got total_steps={total_steps}"
                f", warmup_steps={warmup_steps}."
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.boundaries = tuple(int(b) for b in boundaries)
        self.decay_rate = float(decay_rate)
        self.total_steps = None if total_steps is None else int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak_learning_rate, tf.float32)
        if self.decay == "step":
            k = tf.zeros([], tf.float32)
            for boundary in self.boundaries:
                k += tf.cast(step >= boundary, tf.float32)
            decayed = peak * tf.pow(tf.constant(self.decay_rate, tf.float32), k)
        else:
            span = float(self.total_steps - self.warmup_steps)
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            decayed = 0.5 * peak * (1.0 + tf.cos(math.pi * progress))
        if not self.warmup_steps:
            return decayed
        warmup = peak * (step + 1.0) / float(self.warmup_steps)
        return tf.where(step < self.warmup_steps, warmup, decayed)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "boundaries": list(self.boundaries),
            "decay_rate": self.decay_rate,
            "total_steps": self.total_steps,
        }


def learning_rate_schedule(
    batch_size,
    steps_per_epoch,
    epochs,
    schedule="step",
    warmup_epochs=5,
    decay_epochs=(30, 60, 80),
    decay_rate=0.1,
    lr_per_256=0.1,
):
    """The ImageNet schedule: `lr_per_256 · batch_size / 256` after `warmup_epochs` of linear
    warm-up, then ×`decay_rate` at each of `decay_epochs` (`"step"`) or a cosine to 0 at
    `epochs` (`"cosine"`). Epochs may be fractional; they are converted to steps."""
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    return WarmupSchedule(
        peak_learning_rate(batch_size, lr_per_256),
        warmup_steps=warmup_steps,
        decay=schedule,
        boundaries=[int(round(e * steps_per_epoch)) for e in decay_epochs],
        decay_rate=decay_rate,
        total_steps=int(round(epochs * steps_per_epoch)) if schedule == "cosine" else None,
    )


def decoupled_weight_decay(weight_decay, momentum):
    """The decoupled decay `λ` (`W ← W − lr·λ·W` per step) equivalent to an L2 coefficient.

    The usual ImageNet recipe (`weight_decay=1e-4`, He et al.; the TPU and torchvision
    references) adds `weight_decay·W` to the gradient, which SGD's momentum then accumulates:
    the steady-state shrinkage per step is `lr·weight_decay / (1 − momentum)`. Keras's
    `SGD(weight_decay=λ)` and `KolenPollack(weight_decay=λ)` apply `lr·λ·W` directly, without
    momentum, so the same strength needs `λ = weight_decay / (1 − momentum)` (1e-3 for the
    recipe's 1e-4 with momentum 0.9).
    """
    if weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(
            f"Need weight_decay >= 0 and 0 <= momentum < 1; got weight_decay={weight_decay}, "
            f"momentum={momentum}."
        )
    return weight_decay / (1.0 - momentum)


def create_optimizer(feedback, learning_rate, momentum=0.9, weight_decay=1e-4, nesterov=False):
    """SGD with momentum and weight decay of the kernels only, for the algorithm `feedback`.

    `weight_decay` is the conventional L2 coefficient; it is applied as the decoupled decay
    `decoupled_weight_decay(weight_decay, momentum)` (see there).

    * `"kp"`: `KolenPollack(SGD(...), weight_decay=λ)`: the kernel `W` and the feedback kernel `B`
      of every `kp` layer get identical updates and the identical decay; biases and batch norm
      are not decayed. (Every Dense and convolution of a `keras_wt.models` network is a `kp`
      layer; the kernels of other layers would not be decayed.)
    * otherwise: `SGD(..., weight_decay=λ)` decaying every variable except biases and batch-norm
      `gamma`/`beta` (`NO_WEIGHT_DECAY`).

    Args:
        feedback: one of `keras_wt.ALGORITHMS`.
        learning_rate: a float or a `LearningRateSchedule`.
        momentum: SGD momentum.
        weight_decay: the L2 coefficient (0 for none).
        nesterov: Nesterov momentum.
    """
    feedback = algorithms.get(feedback).name
    decay = decoupled_weight_decay(weight_decay, momentum)
    if feedback == "kp":
        sgd = keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov)
        return optimizers_lib.KolenPollack(sgd, weight_decay=decay)
    optimizer = keras.optimizers.SGD(
        learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=decay or None
    )
    if decay:
        optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return optimizer


# --------------------------------------------------------------------------------------------
# Weight mirror and alignment
# --------------------------------------------------------------------------------------------


def mirror_batch_size(batch_size, num_replicas):
    """`batch_size` rounded up to a multiple of `num_replicas` (each replica draws its share)."""
    return int(math.ceil(batch_size / num_replicas)) * num_replicas


def create_mirror_callback(
    model,
    learning_rate=0.01,
    noise_std=1.0,
    decay=1.0,
    every=1,
    steps=1,
    batch_size=32,
    warmup_steps=500,
    noise_distribution="normal",
    seed=0,
    jit_compile=False,
):
    """The `MirrorCallback` that trains the feedback kernels of the `wm` layers of `model`, or
    `None` when it has none.

    The mirror step is `ΔB = η·∇_W(½‖f_W(x)‖²)/(n·P) − η·λ·B` (`keras_wt.mirror`), an average over
    the `n` noise samples and the `P` positions of each convolution, so every layer's `B` tends to
    `(σ²/λ)·W`: with the defaults `σ = λ = 1`, `W` itself, whose scale the error signal then
    keeps; `η = 0.01` covers 1% of the way per mirror step (about 100 steps to follow `W`).

    Args:
        model: a built model (fixed input size: the noise has each layer's input shape).
        learning_rate, noise_std, decay, every, steps, warmup_steps, noise_distribution, seed,
            jit_compile: as `keras_wt.callbacks.MirrorCallback`.
        batch_size: noise samples per layer and mirror step, rounded up to a multiple of the
            number of replicas.
    """
    if not mirror_lib.wm_layers(model):
        return None
    return callbacks_lib.MirrorCallback(
        learning_rate=learning_rate,
        noise_std=noise_std,
        decay=decay,
        every=every,
        steps=steps,
        batch_size=mirror_batch_size(batch_size, model.distribute_strategy.num_replicas_in_sync),
        warmup_steps=warmup_steps,
        noise_distribution=noise_distribution,
        seed=seed,
        jit_compile=jit_compile,
    )


class WeightAlignment(callbacks_lib.AlignmentCallback):
    """Writes `weight_angle/<layer>` (degrees between `W` and the `B` its algorithm sends errors
    through) and `norm_ratio/<layer>` (`‖B‖/‖W‖`) into `logs` at the end of every epoch: the
    probe-free `keras_wt.callbacks.AlignmentCallback`, which only reads the variables and so is
    cheap on any device."""

    def __init__(self):
        super().__init__(probe=None)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def pad_to_batches(dataset, batch_size, num_classes):
    """Batches single `(image, label)` examples into `(images, one_hot, weights)` batches of
    exactly `batch_size`: the last batch is padded with zero images of weight 0, so every example
    counts once and every batch has the static shape TPUs need."""

    def pad(images, labels):
        n = tf.shape(labels)[0]
        missing = batch_size - n
        images = tf.pad(images, [[0, missing]] + [[0, 0]] * (len(images.shape) - 1))
        one_hot = tf.pad(tf.one_hot(labels, num_classes), [[0, missing], [0, 0]])
        weights = tf.pad(tf.ones([n], tf.float32), [[0, missing]])
        images = tf.ensure_shape(images, [batch_size] + list(images.shape[1:]))
        return images, tf.ensure_shape(one_hot, [batch_size, num_classes]), tf.ensure_shape(
            weights, [batch_size]
        )

    return dataset.batch(batch_size).map(pad, tf.data.AUTOTUNE)


def imagenet_datasets(
    data_dir,
    batch_size,
    image_size=224,
    num_classes=1000,
    use_synthetic_data=False,
    seed=None,
):
    """The training and evaluation datasets of the trainer.

    Training: endless batches `(images, one_hot_labels)` of `batch_size` with the ImageNet
    augmentation (`keras_wt.datasets.imagenet`). Evaluation: one pass over the validation split in
    batches `(images, one_hot_labels, weights)`, padded to full batches (`pad_to_batches`). With
    `use_synthetic_data` both are endless repetitions of one random batch (for speed runs and
    smoke tests; give the number of evaluation steps).
    """
    if use_synthetic_data:
        train = datasets.imagenet(
            None, "train", batch_size, image_size=image_size, use_synthetic_data=True,
            num_classes=num_classes, seed=seed,
        )
        evaluation = datasets.imagenet(
            None, "validation", batch_size, image_size=image_size, use_synthetic_data=True,
            num_classes=num_classes, seed=None if seed is None else seed + 1,
        )
        evaluation = evaluation.map(
            lambda x, y: (x, tf.one_hot(y, num_classes), tf.ones([batch_size], tf.float32))
        )
    else:
        train = datasets.imagenet(
            data_dir, "train", batch_size, image_size=image_size, training=True,
            drop_remainder=True, num_classes=num_classes, seed=seed,
        ).repeat()
        evaluation = datasets.imagenet(
            data_dir, "validation", None, image_size=image_size, training=False,
            num_classes=num_classes,
        )
        evaluation = pad_to_batches(evaluation, batch_size, num_classes).prefetch(
            tf.data.AUTOTUNE
        )
    train = train.map(lambda x, y: (x, tf.one_hot(y, num_classes)), tf.data.AUTOTUNE)
    return train, evaluation


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (the flags of `tpu/train_imagenet.py`).

    Sizes: `batch_size` is global (all replicas). `steps_per_epoch` and `eval_steps` default to a
    full pass over ImageNet's 1,281,167 training and 50,000 validation images; `eval_steps=0`
    skips evaluation. See `tpu/README.md` for the meaning of each flag.
    """

    model: str = "resnet18"
    algo: str = "bp"
    data_dir: str = None
    model_dir: str = None
    strategy: str = "default"
    tpu: str = None
    mirrored_devices: tuple = None
    batch_size: int = 1024
    epochs: int = 90
    image_size: int = 224
    num_classes: int = 1000
    zero_init_residual: bool = True
    lr_per_256: float = 0.1
    schedule: str = "step"
    warmup_epochs: float = 5.0
    decay_epochs: tuple = (30, 60, 80)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    dtype: str = "auto"
    steps_per_execution: int = 1
    steps_per_epoch: int = None
    eval_steps: int = None
    use_synthetic_data: bool = False
    mirror_learning_rate: float = 0.01
    mirror_noise_std: float = 1.0
    mirror_decay: float = 1.0
    mirror_every: int = 1
    mirror_steps: int = 1
    mirror_batch_size: int = 32
    mirror_warmup_steps: int = 500
    alignment: str = "weights"
    alignment_probe_size: int = 64
    seed: int = 0
    jit_compile: bool = None
    verbose: int = 2

    def __post_init__(self):
        if self.algo not in algorithms.ALGORITHMS:
            raise ValueError(f"algo={self.algo!r} is not one of {algorithms.ALGORITHMS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {STRATEGIES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        if self.alignment not in ("none", "weights", "full"):
            raise ValueError(
                f"alignment={self.alignment!r} is not one of ('none', 'weights', 'full')"
            )
        if not self.use_synthetic_data and not self.data_dir:
            raise ValueError(
                "data_dir is required (a directory of ImageNet TFRecords train-*/validation-*, "
                "possibly gs://...), unless use_synthetic_data is set."
            )
        self.decay_epochs = tuple(self.decay_epochs)

    @property
    def resolved_dtype(self):
        """`dtype`, with `"auto"` meaning `mixed_bfloat16` on TPUs and `float32` elsewhere."""
        if self.dtype == "auto":
            return "mixed_bfloat16" if self.strategy == "tpu" else "float32"
        return self.dtype

    @property
    def resolved_steps_per_epoch(self):
        return self.steps_per_epoch or datasets.info("imagenet").num_train // self.batch_size

    @property
    def resolved_eval_steps(self):
        """`None` (a full pass over the validation files) or a number of batches."""
        if self.eval_steps is not None:
            return self.eval_steps
        if self.use_synthetic_data:
            return math.ceil(datasets.info("imagenet").num_test / self.batch_size)
        return None


def build_model(config):
    """The network `config.model` for `config.algo`, at `config.image_size` (fixed: the weight
    mirror draws noise of each layer's input shape)."""
    kwargs = dict(
        input_shape=(config.image_size, config.image_size, 3),
        num_classes=config.num_classes,
        feedback=config.algo,
        seed=config.seed,
        dtype=config.resolved_dtype,
    )
    if config.model.startswith("resnet"):
        kwargs["zero_init_residual"] = config.zero_init_residual
    return models.get(config.model, **kwargs)


def compile_model(model, config, steps_per_epoch, strategy_name=None):
    """Compiles `model` with the schedule, optimizer, loss and top-1/top-5 metrics of `config`;
    returns the learning-rate schedule."""
    schedule = learning_rate_schedule(
        config.batch_size,
        steps_per_epoch,
        config.epochs,
        schedule=config.schedule,
        warmup_epochs=config.warmup_epochs,
        decay_epochs=config.decay_epochs,
        lr_per_256=config.lr_per_256,
    )
    optimizer = create_optimizer(
        config.algo, schedule, momentum=config.momentum, weight_decay=config.weight_decay
    )
    jit_compile = config.jit_compile
    if jit_compile is None:
        jit_compile = jit_compile_for(strategy_name or config.strategy)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        # Weighted, so that the zero-weight padding of the last evaluation batch is not counted.
        weighted_metrics=[
            keras.metrics.CategoricalAccuracy(name="top1"),
            keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"),
        ],
        jit_compile=jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
    return schedule


def create_callbacks(model, config, strategy, probe=None):
    """The trainer's callbacks, in this order:

    1. `BackupAndRestore` (`<model_dir>/backup`, every epoch; kept after training, so re-running a
       finished command is a no-op): first, so that the weights, `B` and the optimizer's step
       count are restored before the mirror callbacks read that count;
    2. for `wm`: the `MirrorCallback` (`create_mirror_callback`);
    3. alignment (`WeightAlignment`, or `AlignmentCallback` on `probe` for `alignment="full"`),
       before the writers so that TensorBoard and the CSV history record its values;
    4. `ModelCheckpoint` (`<model_dir>/checkpoints/epoch-NNN.weights.h5` every epoch, with the
       optimizer's state), `CSVLogger` (`<model_dir>/history.csv`) and, when the `tensorboard`
       package is installed, `TensorBoard` (`<model_dir>/logs`).

    Non-chief workers of a multi-worker job back up to `<model_dir>/backup-<task>` and write no
    checkpoints or summaries. Without `model_dir` nothing is saved.
    """
    result = []
    chief = is_chief(strategy)
    if config.model_dir:
        backup = os.path.join(
            config.model_dir, "backup" if chief else f"backup-{_task_name(strategy)}"
        )
        result.append(keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False))
    if config.algo == "wm":
        # On TPUs the whole mirror step is compiled by TPUStrategy; elsewhere the per-replica
        # part is XLA-compiled when the training step is.
        mirror = create_mirror_callback(
            model,
            learning_rate=config.mirror_learning_rate,
            noise_std=config.mirror_noise_std,
            decay=config.mirror_decay,
            every=config.mirror_every,
            steps=config.mirror_steps,
            batch_size=config.mirror_batch_size,
            warmup_steps=config.mirror_warmup_steps,
            seed=config.seed,
            jit_compile=config.strategy != "tpu" and bool(model.jit_compile),
        )
        if mirror is not None:
            result.append(mirror)
    if config.alignment == "weights":
        result.append(WeightAlignment())
    elif config.alignment == "full":
        if probe is None:
            raise ValueError("alignment='full' needs a probe batch (x, y).")
        result.append(callbacks_lib.AlignmentCallback(probe))
    if config.model_dir and chief:
        tf.io.gfile.makedirs(config.model_dir)
        result += [
            keras.callbacks.ModelCheckpoint(
                os.path.join(config.model_dir, "checkpoints", "epoch-{epoch:03d}.weights.h5"),
                save_weights_only=True,
            ),
            keras.callbacks.CSVLogger(
                os.path.join(config.model_dir, "history.csv"), append=True
            ),
        ]
        if tensorboard_available():
            result.append(
                keras.callbacks.TensorBoard(
                    os.path.join(config.model_dir, "logs"), write_graph=False, profile_batch=0
                )
            )
        else:
            logger.warning(
                "The tensorboard package is not installed: no TensorBoard summaries (pip install "
                "tensorboard); %s/history.csv still records every metric and angle.",
                config.model_dir,
            )
    return result


def tensorboard_available():
    """Whether `tf.summary` can write scalars (it needs the `tensorboard` package)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _probe_batch(evaluation, size):
    x, y, _ = next(iter(evaluation.take(1)))
    return x[:size], y[:size]


# Settings that may change between a run and its resumption without changing the run.
_WHERE_NOT_WHAT = ("model_dir", "data_dir", "tpu", "mirrored_devices", "verbose")


def _record_config(config, chief):
    """Writes `<model_dir>/config.json`, or warns when a resumed run's configuration differs."""
    if not (config.model_dir and chief):
        return
    path = os.path.join(config.model_dir, "config.json")
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            saved = json.load(f)
        changed = sorted(
            k for k in current if k not in _WHERE_NOT_WHAT and saved.get(k) != current[k]
        )
        if changed:
            logger.warning(
                "model_dir %s was written by a run with different settings (%s); resuming "
                "from its backup anyway.",
                config.model_dir,
                ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed),
            )
        return
    tf.io.gfile.makedirs(config.model_dir)
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)


def train(config, strategy=None, callbacks=()):
    """Trains `config.model` with `config.algo` on ImageNet (or synthetic data), evaluating top-1
    and top-5 on the validation set after every epoch.

    Args:
        config: a `TrainConfig`.
        strategy: a `tf.distribute.Strategy`, instead of creating `config.strategy`.
        callbacks: extra Keras callbacks, run after the trainer's own.

    Returns:
        `(model, history)`.
    """
    if strategy is None:
        strategy = create_strategy(
            config.strategy, tpu=config.tpu, devices=config.mirrored_devices
        )
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by the {replicas} replicas."
        )
    chief = is_chief(strategy)
    _record_config(config, chief)
    keras.utils.set_random_seed(config.seed)
    steps_per_epoch = config.resolved_steps_per_epoch
    eval_steps = config.resolved_eval_steps
    logger.info(
        "Training %s with feedback=%r on %d replicas (%s, dtype %s): global batch %d, %d steps "
        "per epoch, %d epochs, peak learning rate %.4g.",
        config.model, config.algo, replicas, config.strategy, config.resolved_dtype,
        config.batch_size, steps_per_epoch, config.epochs,
        peak_learning_rate(config.batch_size, config.lr_per_256),
    )
    with strategy.scope():
        model = build_model(config)
        compile_model(model, config, steps_per_epoch)
    prepare_for_multiworker(model)
    train_data, evaluation = imagenet_datasets(
        config.data_dir,
        config.batch_size,
        image_size=config.image_size,
        num_classes=config.num_classes,
        use_synthetic_data=config.use_synthetic_data,
        seed=config.seed,
    )
    probe = None
    if config.alignment == "full":
        probe = _probe_batch(evaluation, config.alignment_probe_size)
    all_callbacks = create_callbacks(model, config, strategy, probe=probe) + list(callbacks)
    history = model.fit(
        train_data,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=None if eval_steps == 0 else evaluation,
        validation_steps=eval_steps or None,
        callbacks=all_callbacks,
        shuffle=False,  # the training pipeline shuffles files and examples itself
        verbose=config.verbose,
    )
    return model, history


def feedback_kernels(model):
    """`{layer_name: B}` (numpy) of every stored feedback kernel of `model`."""
    return {
        layer.name: layer.feedback_kernel.numpy()
        for layer in layers_lib.feedback_layers(model)
        if layer.feedback_kernel is not None
    }
