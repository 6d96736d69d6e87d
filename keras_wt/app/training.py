"""One training run, from a typed config to `model.fit`: what every front end calls.

`keras-wt-train` (the reference experiments) and `tpu/train_imagenet.py` (ResNets on ImageNet)
both turn their flags into a `TrainConfig` and call `train`, which goes strategy → data → model →
compile → callbacks → `fit` and writes the run folder of `keras_wt.app.runs`:

* data: a small dataset held in memory (`keras_wt.app.data.pipelines.train_dataset`, an order that depends
  on `(seed, epoch)` only), or ImageNet TFRecords / synthetic ImageNet batches;
* the model of `keras_wt.models` with `feedback=config.algo`;
* SGD with momentum and weight decay of the kernels (`keras_wt.schedules.create_optimizer`: for an
  algorithm whose `B` learns through the optimizer, `KolenPollack`), a learning-rate schedule,
  the softmax or the reference summed-sigmoid cross-entropy, accuracy in percent;
* evaluation by `fit(validation_data=...)` on the evaluated epochs (`evaluated_epochs`);
* callbacks: the weight mirror where a layer learns `B` by mirroring (`create_mirror_callback`),
  `AlignmentCallback`, `StopOnDivergence`, `ResultsRecorder` (`results.json` and the summary
  line), `CSVLogger`, `TensorBoard`, and `keras_wt.app.backup.AtomicBackup` (every epoch's backup
  kept with `keep_checkpoints`).

One process writes a run folder at a time (`keras_wt.app.runs.RunLock`, held for the whole run), and
`experiment_config.json` is written before anything slow (the data), so a run killed at any
instant can be resumed.

Resuming: `AtomicBackup` saves the model's weights (W, the feedback kernels B, batch-norm
statistics) and the optimizer's variables (momentum, step count) at the end of every epoch, so
that a kill at any instant leaves a complete backup (Keras's `BackupAndRestore` does not; see
`keras_wt.app.backup`), and checks what it reads back. The learning rate is a function of the step
count, the weight-mirror noise is seeded by it and the in-memory data order by the epoch, so a
run restarted on the same run folder continues exactly where its last completed epoch ended;
`keras_wt.app.resume` first cuts its records back to that epoch, so each epoch is recorded once.
"""

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import time

import keras
import numpy as np
import tensorflow as tf

import keras_wt
from keras_wt import algorithms
from keras_wt.app import backup as backup_lib
from keras_wt import callbacks as callbacks_lib
from keras_wt.app.data import datasets
from keras_wt import metrics
from keras_wt import mirror as mirror_lib
from keras_wt import models
from keras_wt.app.data import pipelines
from keras_wt.app import resume
from keras_wt.app import runs
from keras_wt import schedules
from keras_wt.app import strategies
from keras_wt import unused_feedback
from keras_wt import _compat
from keras_wt._compat import multi_worker_fit
from keras_wt.algorithms import ALGORITHMS

logger = logging.getLogger("keras_wt")

DTYPES = ("auto", "float32", "mixed_bfloat16")
LOSSES = ("softmax", "summed_sigmoid")
ALIGNMENTS = ("none", "weights", "full")

# Settings that may change between a run and its resumption without changing what is computed.
# The most training steps per host call with `steps_per_execution="auto"`: fewer calls, less host
# overhead per step (the reference MLP's step is about 1 ms).
MAX_STEPS_PER_EXECUTION = 10
# `steps_per_execution` only groups steps into calls from the host (the weight mirror's steps run
# inside the training step, see `TrainConfig.resolved_steps_per_execution`).
RESUMABLE = ("model_dir", "data_dir", "tpu", "mirrored_devices", "verbose", "epochs",
             "steps_per_execution", "divergence_check")
# Seeds seed Python's, NumPy's (which takes 0 .. 2**32 − 1) and TensorFlow's generators.
MAX_SEED = 2**32 - 1
# A run diverges when its training loss explodes while finite (StopOnDivergence): above
# EXPLOSION_FACTOR times the loss of a network that has learned nothing (`zero_logit_loss`) for
# EXPLOSION_STEPS consecutive steps, or for a whole shorter epoch after the first. Measured on the first epoch of
# every published configuration (Fashion-MNIST, seed 1111), the running mean Keras reports never
# comes near it: the ten MLP rules peak at 1.39 × 6.93 (kp, its first 7 steps) and end the epoch
# at 1.3-2.3; the convnet recipe's CNN peaks at 0.89 × 2.30 (fa) and is below 0.32 × after 105
# steps, its ResNet-20 at 1.00 × (its first 7 steps) and below 0.92 × after 63. A saturated
# network sits above it: the MLP at --learning_rate 1e6 (every sigmoid at 0 or 1, the loss at
# 16.12 = 2.33 × 6.93) stops at batch 105 of epoch 1.
EXPLOSION_FACTOR = 2.0
EXPLOSION_STEPS = 100


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on, in keras_wt's own units.

    What is trained: `model` (a `keras_wt.models` name) with `model_options` (builder keyword
    arguments, e.g. `{"hidden": [500]}`), `algo`, on `dataset` (`"imagenet"`, `"mnist"`,
    `"fashion_mnist"`, `"cifar10"`) from `data_dir` (or `use_synthetic_data` ImageNet batches of
    `image_size`), with `loss` (`"softmax"` or the reference `"summed_sigmoid"`).

    How: global `batch_size`; `epochs`; `steps_per_epoch` and `eval_steps` default to a full pass
    (`eval_steps=0`: no evaluation); `learning_rate` is the peak of `schedule` (`"constant"`,
    `"step"`: ×0.1 at `decay_epochs`, `"cosine"`) after `warmup_epochs`; SGD with `momentum`;
    `weight_decay` is the L2 coefficient of the kernels, applied decoupled (see
    `keras_wt.schedules.decoupled_weight_decay`); with `kp_decay_budget`, an algorithm whose `B`
    learns through the optimizer (`kp`) gets instead the decoupled decay `λ` for which
    `Σ_t lr_t·λ` over the run is that budget (`keras_wt.schedules.decay_for_budget`). The `mirror_*` fields are `MirrorCallback`'s
    arguments (`mirror_batch_size`: an int, a `{layer_name: n}` dict or `"auto"`). Evaluation
    and the alignment probe (`alignment`: `"none"`, `"weights"` or
    `"full"` with `alignment_probe_size` examples) run every `eval_every` epochs, at the first
    and at the last.

    `keep_unused_feedback`: keep the `B` of the layers whose input gradient no weight needs
    (`keras_wt.unused_feedback`; the first layer of every trainer model), mirroring or updating
    it, for figures that show its weight angle; by default it is not stored.

    `divergence_check`: stop a run whose training loss explodes while finite (`StopOnDivergence`;
    a NaN or infinite loss, metric or weight stops it regardless). `train_examples`,
    `eval_examples`: the examples of one pass over the ImageNet training and validation files
    (default: ImageNet's, `keras_wt.app.data.datasets.info`); a pass that reads another number stops the
    run (a truncated or missing file).

    Where: `model_dir` is the run folder (`keras_wt.app.runs`; `None`: nothing is written), on
    `strategy` (`keras_wt.app.strategies.STRATEGIES`).
    """

    model: str = "resnet18"
    algo: str = "bp"
    dataset: str = "imagenet"
    data_dir: str = None
    model_dir: str = None
    model_options: dict = dataclasses.field(default_factory=dict)
    strategy: str = "default"
    tpu: str = None
    mirrored_devices: tuple = None
    loss: str = "softmax"
    batch_size: int = 1024
    epochs: int = 90
    image_size: int = 224
    num_classes: int = None
    learning_rate: float = 0.4
    schedule: str = "step"
    warmup_epochs: float = 5.0
    decay_epochs: tuple = (30, 60, 80)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    kp_decay_budget: float = None
    label_smoothing: float = 0.0
    dtype: str = "auto"
    steps_per_execution: object = 1  # an int, or "auto" (resolved_steps_per_execution)
    steps_per_epoch: int = None
    eval_steps: int = None
    eval_every: int = 1
    use_synthetic_data: bool = False
    mirror_learning_rate: float = 0.05
    mirror_noise_std: float = 1.0
    mirror_noise_distribution: str = "normal"
    mirror_decay: float = 1.0
    mirror_every: int = 1
    mirror_steps: int = 1
    mirror_batch_size: object = "auto"  # an int, {layer: n} or "auto" (see MirrorCallback)
    mirror_target_angle: float = 8.0
    mirror_max_batch_size: int = 2048
    mirror_warmup_steps: int = 200  # None: num_train // batch_size
    mirror_in_train_step: bool = True  # MirrorCallback(in_train_step=...)
    alignment: str = "weights"
    alignment_probe_size: int = 64
    keep_unused_feedback: bool = False
    keep_checkpoints: bool = True
    seed: int = 0
    jit_compile: bool = None
    verbose: int = 2
    divergence_check: bool = True
    train_examples: int = None
    eval_examples: int = None

    def __post_init__(self):
        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {tuple(allowed)}")

        one_of("algo", ALGORITHMS)
        one_of("model", models.BUILDERS)
        one_of("dataset", datasets.NAMES)
        one_of("strategy", strategies.STRATEGIES)
        one_of("schedule", schedules.SCHEDULES)
        one_of("dtype", DTYPES)
        one_of("loss", LOSSES)
        one_of("alignment", ALIGNMENTS)
        if self.dataset == "imagenet" and not self.use_synthetic_data and not self.data_dir:
            raise ValueError(
                "data_dir is required (a directory of ImageNet TFRecords train-*/validation-*, "
                "possibly gs://...), unless use_synthetic_data is set."
            )
        if self.use_synthetic_data and self.dataset != "imagenet":
            raise ValueError("use_synthetic_data gives ImageNet-shaped batches: dataset='imagenet'")
        def check(name, ok, allowed, optional=False):
            value = getattr(self, name)
            if not ((optional and value is None) or (value is not None and ok(value))):
                raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}")

        if self.steps_per_execution != "auto":
            check("steps_per_execution", lambda v: isinstance(v, int) and v >= 1,
                  "an integer >= 1 or 'auto'")
        for name in ("batch_size", "epochs", "eval_every", "image_size",
                     "mirror_every", "mirror_steps", "alignment_probe_size",
                     "mirror_max_batch_size"):
            check(name, lambda v: v >= 1, "an integer >= 1")
        check("steps_per_epoch", lambda v: v >= 1, "an integer >= 1 (or None: a full pass)", True)
        check("eval_steps", lambda v: v >= 0, "an integer >= 0 (0: no evaluation)", True)
        check("mirror_warmup_steps", lambda v: v >= 0, "an integer >= 0", True)
        check("num_classes", lambda v: v >= 2, "an integer >= 2", True)
        check("seed", lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED,
              f"an integer in [0, {MAX_SEED}]")
        for name in ("train_examples", "eval_examples"):
            check(name, lambda v: v >= 1, "an integer >= 1 (or None: ImageNet's)", True)
        check("learning_rate", lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
        check("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)")
        check("label_smoothing", lambda v: 0 <= v < 1, "a number in [0, 1)")
        for name in ("weight_decay", "warmup_epochs", "mirror_learning_rate", "mirror_decay"):
            check(name, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
        check("kp_decay_budget", lambda v: math.isfinite(v) and v > 0, "a number > 0", True)
        check("mirror_noise_std", lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
        self.decay_epochs = tuple(self.decay_epochs)
        self.model_options = dict(self.model_options)

    @property
    def resolved_dtype(self):
        """`dtype`, with `"auto"` meaning `mixed_bfloat16` on TPUs and `float32` elsewhere."""
        if self.dtype == "auto":
            return "mixed_bfloat16" if self.strategy == "tpu" else "float32"
        return self.dtype

    @property
    def resolved_num_classes(self):
        return self.num_classes or datasets.info(self.dataset).num_classes

    @property
    def resolved_train_examples(self):
        """ImageNet: `train_examples`, else the dataset's declared size."""
        return self.train_examples or datasets.info(self.dataset).num_train

    @property
    def resolved_eval_examples(self):
        """ImageNet: `eval_examples`, else the dataset's declared size."""
        return self.eval_examples or datasets.info(self.dataset).num_test

    def optimizer_steps_per_epoch(self, steps_per_epoch, steps_per_execution):
        """The optimizer steps of an epoch: Keras runs whole calls of `steps_per_execution`
        steps, so `steps_per_epoch` rounded up to a multiple of it."""
        return math.ceil(steps_per_epoch / steps_per_execution) * steps_per_execution

    def resolved_steps_per_epoch(self, num_train):
        """`steps_per_epoch`, else a full pass over `num_train` examples: `N // batch_size` on
        ImageNet (full batches, as TPUs need), `ceil(N / batch_size)` on the small datasets (the
        last batch smaller)."""
        if self.steps_per_epoch:
            return self.steps_per_epoch
        if self.dataset == "imagenet":
            return num_train // self.batch_size
        return math.ceil(num_train / self.batch_size)

    def resolved_steps_per_execution(self, steps_per_epoch, strategy=None):
        """`steps_per_execution`, else (`"auto"`) the largest divisor of `steps_per_epoch` up to
        `MAX_STEPS_PER_EXECUTION` (a divisor, so that no call crosses an epoch's end: the batches,
        their order and everything computed are those of one step per call), and 1 where more
        would change or break training:

        * the weight mirror run between calls (`mirror_in_train_step=False`, or `mirror_every > 1`
          under several replicas; `MirrorCallback`): one step per call keeps a mirror step after
          every batch;
        * `MirroredStrategy` or `MultiWorkerMirroredStrategy` over several replicas, where
          Keras 3 cannot run more than one step per call (keras-team/keras#19246); an explicit
          value above 1 there raises a `ValueError`.

        `strategy` defaults to the current one.
        """
        strategy = strategy or tf.distribute.get_strategy()
        replicas = strategy.num_replicas_in_sync
        unsupported = replicas > 1 and isinstance(
            strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
        )
        if self.steps_per_execution != "auto":
            if unsupported and self.steps_per_execution > 1:
                raise ValueError(
                    f"steps_per_execution={self.steps_per_execution} under "
                    f"{type(strategy).__name__} with {replicas} replicas: Keras 3 fails there "
                    "with more than one step per call (\"You must feed a value for placeholder "
                    "tensor\", keras-team/keras#19246). Use steps_per_execution=1 or \"auto\"."
                )
            return self.steps_per_execution
        mirror_between_calls = (
            algorithms.get(self.algo).learns_feedback == "mirror"
            and not callbacks_lib.mirrors_in_train_step(
                self.mirror_in_train_step, self.mirror_every, replicas
            )
        )
        if unsupported or mirror_between_calls:
            return 1
        return max(d for d in range(1, MAX_STEPS_PER_EXECUTION + 1) if steps_per_epoch % d == 0)

    def resolved_mirror_warmup_steps(self, num_train):
        """`mirror_warmup_steps`, else (`None`) one pass: `num_train // batch_size`."""
        if self.mirror_warmup_steps is not None:
            return self.mirror_warmup_steps
        return num_train // self.batch_size

    @property
    def resolved_eval_steps(self):
        """`None` (a full pass over the evaluation data) or a number of batches."""
        if self.eval_steps is not None:
            return self.eval_steps
        if self.use_synthetic_data:
            return math.ceil(datasets.info("imagenet").num_test / self.batch_size)
        return None


def evaluated_epochs(epochs, every):
    """The epochs (1-based) that are evaluated: the first, every `every`-th after it
    (1, 1 + every, ...) and the last, as the published code's `test_frequency`."""
    return sorted({e for e in range(1, epochs + 1) if (e - 1) % every == 0} | {epochs})


# --------------------------------------------------------------------------------------------
# Data, model, optimizer
# --------------------------------------------------------------------------------------------


DataError = datasets.DataError


def _data(config):
    """`(make_train, evaluation, input_shape, num_train)` of the run: `make_train(first_epoch)`
    is the training data from epoch `first_epoch` (0-based) on.

    Raises:
        DataError: a damaged file, too few examples, or test images of another shape than the
            training images (checked here, before a model is built for them).
    """
    if config.dataset == "imagenet":
        num_train = config.resolved_train_examples

        def make_imagenet(first_epoch=0):
            return pipelines.imagenet_datasets(
                config.data_dir, config.batch_size, image_size=config.image_size,
                num_classes=config.resolved_num_classes,
                use_synthetic_data=config.use_synthetic_data, seed=config.seed,
                first_epoch=first_epoch, epochs=config.epochs,
                steps_per_epoch=config.resolved_steps_per_epoch(num_train),
                train_examples=num_train, eval_examples=config.resolved_eval_examples,
            )

        shape = (config.image_size, config.image_size, 3)
        return (lambda first_epoch: make_imagenet(first_epoch)[0]), make_imagenet()[1], shape, \
            num_train
    try:
        (x_train, y_train), (x_test, y_test) = datasets.load_numpy(config.dataset, config.data_dir)
    except ValueError as e:  # a damaged or inconsistent file, named by keras_wt.app.data.datasets
        raise DataError(str(e)) from e
    if len(x_train) < config.batch_size or not len(x_test):
        raise DataError(
            f"{config.dataset} has {len(x_train)} training and {len(x_test)} test examples: "
            f"fewer than one batch of {config.batch_size} to train on, or none to test on."
        )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{config.dataset} ({config.data_dir or 'the standard places'}): the training images "
            f"are {x_train.shape[1:]} but the test images {x_test.shape[1:]}; both splits must "
            "have one image shape. Check that the files belong to one dataset."
        )
    flatten = config.model == "mlp"

    def make_train(first_epoch):
        return pipelines.train_dataset(
            x_train, y_train, config.batch_size, config.seed, first_epoch, config.epochs, flatten
        )

    evaluation = pipelines.test_dataset(x_test, y_test, flatten)
    shape = (int(np.prod(x_train.shape[1:])),) if flatten else tuple(x_train.shape[1:])
    return make_train, evaluation, shape, len(x_train)


def build_model(config, input_shape=None):
    """The network `config.model` for `config.algo` with `config.model_options`, at
    `input_shape` (default: ImageNet crops of `config.image_size`; fixed, since the weight mirror
    draws noise of each layer's input shape). Unless `config.keep_unused_feedback`, the layers
    whose `B` no gradient uses are built without one (`keras_wt.unused_feedback`)."""
    if input_shape is None:
        input_shape = (config.image_size, config.image_size, 3)
    model = models.get(
        config.model,
        input_shape=tuple(input_shape),
        num_classes=config.resolved_num_classes,
        feedback=config.algo,
        seed=config.seed,
        dtype=config.resolved_dtype,
        **config.model_options,
    )
    if not config.keep_unused_feedback:
        # After the build, so the weights are those drawn with every B (same seed, same W).
        unused_feedback.drop_unused_feedback(model)
    return model


def _outputs_logits(model):
    activation = getattr(model.layers[-1], "activation", None)
    return activation is None or activation is keras.activations.linear


def compile_model(model, config, steps_per_epoch, strategy_name=None):
    """Compiles `model` with the schedule, optimizer, loss and accuracy (percent; ImageNet: also
    top-5) of `config`; returns the learning-rate schedule. ImageNet labels are one-hot, the small
    datasets' integer classes."""
    schedule = schedules.learning_rate_schedule(
        config.learning_rate,
        steps_per_epoch,
        config.epochs,
        schedule=config.schedule,
        warmup_epochs=config.warmup_epochs,
        decay_epochs=config.decay_epochs,
    )
    weight_decay = config.weight_decay
    if config.kp_decay_budget and algorithms.get(config.algo).learns_feedback == "optimizer":
        decay = schedules.decay_for_budget(
            schedule, config.epochs * steps_per_epoch, config.kp_decay_budget
        )
        logger.info("Kolen-Pollack decay λ = %.4g (Σ lr·λ = %g over the run)", decay,
                    config.kp_decay_budget)
        weight_decay = decay * (1.0 - config.momentum)  # create_optimizer divides it back
    optimizer = schedules.create_optimizer(
        config.algo, schedule, momentum=config.momentum, weight_decay=weight_decay
    )
    from_logits = _outputs_logits(model)
    if config.loss == "summed_sigmoid":
        loss = models.SummedSigmoidCrossEntropy(from_logits=from_logits)
    elif config.dataset == "imagenet":
        loss = keras.losses.CategoricalCrossentropy(
            from_logits=from_logits, label_smoothing=config.label_smoothing
        )
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    accuracies = [metrics.accuracy]
    if config.dataset == "imagenet":
        accuracies.append(metrics.top5_accuracy)
    jit_compile = config.jit_compile
    if jit_compile is None:
        jit_compile = strategies.jit_compile_for(strategy_name or config.strategy)
    model.compile(
        optimizer=optimizer,
        loss=loss,
        # Weighted, so that the zero-weight padding of the last evaluation batch is not counted.
        weighted_metrics=accuracies,
        jit_compile=jit_compile,
        # Under the strategy's scope: the current strategy is the model's.
        steps_per_execution=config.resolved_steps_per_execution(steps_per_epoch),
    )
    return schedule


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------


def create_mirror_callback(model, learning_rate=0.05, noise_std=1.0, decay=1.0, **kwargs):
    """The `MirrorCallback` that trains the feedback kernels of the layers of `model` that learn
    `B` by mirroring, or `None` when it has none.

    The mirror step is `ΔB = η·∇_W(½‖f_W(x)‖²) ⊘ (n·C) − η·λ·B` (`keras_wt.mirror`), averaged
    over the `n` noise samples and, per kernel entry, over the `C` positions at which it reads
    real input, so every layer's `B` tends to `(σ²/λ)·W`: with the trainer's defaults
    `σ = λ = 1`, `W` itself, whose scale the error signal then keeps; `η = 0.05` covers 5% of the
    way per mirror step (about 20 steps to follow `W`). Each layer's noise batch (an int, a
    `{layer: n}` dict, a callable or `"auto"`) is rounded up to a multiple of the replicas.

    Args:
        model: a built model (fixed input size: the noise has each layer's input shape).
        learning_rate, noise_std, decay, **kwargs: the arguments of
            `keras_wt.callbacks.MirrorCallback`.
    """
    if not mirror_lib.wm_layers(model):
        return None
    return callbacks_lib.MirrorCallback(learning_rate, noise_std, decay=decay, **kwargs)


class TrainingDiverged(FloatingPointError):
    """The run diverged (`StopOnDivergence`)."""


def zero_logit_loss(loss, num_classes):
    """The loss of a network that has learned nothing, all its logits 0 (every class equally
    likely): `num_classes·ln 2` for the summed sigmoid cross-entropy (each class at 1/2), `ln C`
    for the softmax cross-entropy (with or without label smoothing). Every trainer model starts
    near it."""
    if loss == "summed_sigmoid":
        return num_classes * math.log(2.0)
    return math.log(num_classes)


class StopOnDivergence(keras.callbacks.Callback):
    """Stops a run that diverged by raising `TrainingDiverged`, before the epoch is recorded or
    backed up (unlike Keras's `TerminateOnNaN`, which ends the epoch as if it had finished):

    * at the first batch whose loss or metric is NaN or infinite;
    * when the loss explodes while finite: the epoch's running mean of the training loss (what
      Keras reports after each batch) above `factor × reference` for `steps` consecutive training
      steps, or at the end of an epoch (shorter than that; not the first, whose mean holds the
      initial loss) whose mean loss is above it;
    * at the end of an epoch whose weights (`W`, `B`, batch-norm statistics), optimizer state or
      metrics (evaluation included) hold a NaN or an infinity.

    The angles of `AlignmentCallback` are measurements, not checked (an angle to a zero vector is
    undefined, `null`). With a `path`, writes `{epoch, batch, loss, reason}` there first
    (`diverged.json` of the run folder), which a resumed run refuses to continue.

    Args:
        path: where to record the divergence, or `None`.
        reference: the loss the explosion is measured against (`zero_logit_loss`), or `None`
            for no explosion check.
        factor, steps: the explosion rule (defaults `EXPLOSION_FACTOR`, `EXPLOSION_STEPS`).
    """

    def __init__(self, path=None, reference=None, factor=EXPLOSION_FACTOR, steps=EXPLOSION_STEPS):
        super().__init__()
        self.path = path
        self.limit = None if reference is None else factor * reference
        self.factor, self.steps = factor, steps
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._seen = self._above = 0

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        # With steps_per_execution > 1 Keras reports once per call: count every step it ran.
        steps, self._seen = batch + 1 - self._seen, batch + 1
        self._check_finite(logs, batch + 1)
        loss = logs.get("loss")
        if self.limit is None or loss is None:
            return
        self._above = self._above + steps if float(loss) > self.limit else 0
        if self._above >= self.steps:
            self._stop(batch + 1, loss, f"the training loss has stayed above {self.factor:g} × "
                       f"{self.limit / self.factor:.4g} (the loss of a network that learned "
                       f"nothing) for {self._above} steps: it exploded")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        batch = getattr(self, "_seen", 0)
        self._check_finite(logs, batch)
        bad = [v.path for v in list(self.model.weights) + list(self.model.optimizer.variables)
               if keras.backend.is_float_dtype(v.dtype)
               and not bool(keras.ops.all(keras.ops.isfinite(v)))]
        if bad:
            self._stop(batch, logs.get("loss"), "non-finite values in " + ", ".join(bad[:5])
                       + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
        loss = logs.get("loss")
        # Not the first epoch's mean: it holds the initial loss, which a network whose logits
        # start large (He-initialised convnets on few classes) begins well above the reference.
        if self.limit is not None and loss is not None and epoch and float(loss) > self.limit:
            self._stop(batch, loss, f"the epoch's mean training loss is above {self.factor:g} × "
                       f"{self.limit / self.factor:.4g} (the loss of a network that learned "
                       "nothing): it exploded")

    def _check_finite(self, logs, batch):
        for key, value in logs.items():
            if "/" not in key and not math.isfinite(float(value)):
                self._stop(batch, logs.get("loss"), f"{key} is {float(value)}")

    def _stop(self, batch, loss, reason):
        loss = None if loss is None else float(loss)
        record = {"epoch": self._epoch + 1, "batch": batch, "loss": str(loss), "reason": reason}
        if self.path:
            runs.write_json(self.path, record)
        raise TrainingDiverged(
            f"At batch {batch} of epoch {self._epoch + 1} (loss {loss}) the run diverged: "
            f"{reason}. Nothing of this epoch was recorded; lower the learning rate."
        )


class ResultsRecorder(keras.callbacks.Callback):
    """After every evaluated epoch (`evaluated_epochs`, whether or not it has test data):
    writes the epoch into `results.json` and logs a summary line.

    An entry holds every number of the epoch's `logs` (`keras_wt.app.runs.results_entry`: `val_<m>`
    as `test_<m>`, and `<kind>/<layer>` (the alignment keys) grouped as `<kind>s: {layer: value}`
    (`weight_angles`, `delta_angles`, ...)), plus the epoch's `seconds`.

    Args:
        path: the `results.json` to write, or `None` to only log.
        epochs: the run's number of epochs.
        every: evaluate every this many epochs (`evaluated_epochs`).
        results: the entries of earlier epochs (when resuming).
    """

    def __init__(self, path, epochs, every=1, results=None):
        super().__init__()
        self.path = path
        self.epochs = epochs
        self.evaluated = set(evaluated_epochs(epochs, every))
        self.results = dict(results or {})
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if epoch + 1 not in self.evaluated:
            return
        entry = runs.results_entry(logs)
        entry["seconds"] = time.perf_counter() - self._start
        self.results[runs.epoch_key(epoch + 1)] = entry
        if self.path:
            runs.write_json(self.path, self.results)
        logger.info(
            "epoch %d/%d (%.1fs): loss %.4f, accuracy %.2f%%, test loss %.4f, test accuracy "
            "%.2f%%%s%s",
            epoch + 1, self.epochs, entry["seconds"], entry.get("loss", math.nan),
            entry.get("accuracy", math.nan), entry.get("test_loss", math.nan),
            entry.get("test_accuracy", math.nan),
            _format_angles("weight angles", entry.get("weight_angles")),
            _format_angles("delta angles", entry.get("delta_angles")),
        )


def _format_angles(title, angles):
    if not angles:
        return ""
    return f", {title} {{" + ", ".join(f"{k}: {v:.1f}°" for k, v in angles.items()) + "}"


class HistoryLogger(keras.callbacks.CSVLogger):
    """Keras's `CSVLogger`, appending to `history.csv` in the columns of the file's header when
    it has one: a resumed run's first epoch may log other keys than the run's first did (no
    evaluation, say), and its rows must line up with the header."""

    def __init__(self, filename):
        super().__init__(filename, append=True)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        header, _ = resume.read_history(self.filename)
        if header is not None:
            self.keys = next(csv.reader([header]))[1:]


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras's `TensorBoard`, its event files flushed at every epoch's end, so that an epoch's
    summaries are on disk before its backup is written (Keras's writers flush every two minutes
    and at the end of training: a kill would lose epochs that the backup holds)."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        _compat.flush_summary_writers(self)


def create_callbacks(
    model, config, strategy, probe=None, results=None, extra=(), mirror_warmup_steps=None,
    steps_per_epoch=None,
):
    """The trainer's callbacks, in this order:

    1. for a model with layers that learn `B` by mirroring: the `MirrorCallback`
       (`create_mirror_callback`; it reads the optimizer's step count at every epoch's start,
       after any restore);
    2. `AlignmentCallback` (on `probe` for `alignment="full"`, probe-free for `"weights"`), so
       that what follows records its values; `StopOnDivergence` (a run that diverges stops with
       `TrainingDiverged`, the epoch not completed; the explosion rule against
       `zero_logit_loss` unless `config.divergence_check` is off);
    3. with a `model_dir` (on the chief only): `ResultsRecorder`, `HistoryLogger`
       (`CSVLogger`), `EpochTensorBoard` (`TensorBoard`);
    4. the `extra` callbacks;
    5. `keras_wt.app.backup.AtomicBackup` (`<model_dir>/backup`, kept after training, so re-running
       a finished command is a no-op; every epoch's with `keep_checkpoints`): last, so the
       backup of an epoch is written after everything else of that epoch; a run killed before
       it redoes the whole epoch.

    Non-chief workers of a multi-worker job back up to `<model_dir>/backup-<task>` and write
    nothing else. `mirror_warmup_steps` replaces `config.mirror_warmup_steps` (resolved);
    `steps_per_epoch` is the optimizer steps of an epoch, which the backup checks.
    """
    result = []
    mirror = create_mirror_callback(
        model,
        learning_rate=config.mirror_learning_rate,
        noise_std=config.mirror_noise_std,
        decay=config.mirror_decay,
        every=config.mirror_every,
        steps=config.mirror_steps,
        batch_size=config.mirror_batch_size,
        target_angle=config.mirror_target_angle,
        max_batch_size=config.mirror_max_batch_size,
        warmup_steps=(
            config.mirror_warmup_steps if mirror_warmup_steps is None else mirror_warmup_steps
        ),
        noise_distribution=config.mirror_noise_distribution,
        seed=config.seed,
        # On TPUs the whole mirror step is compiled by TPUStrategy; elsewhere the per-replica
        # part is XLA-compiled when the training step is.
        jit_compile=config.strategy != "tpu" and bool(model.jit_compile),
        in_train_step=config.mirror_in_train_step,
    )
    if mirror is not None:
        result.append(mirror)
    if config.alignment != "none":
        if config.alignment == "full" and probe is None:
            raise ValueError("alignment='full' needs a probe batch (x, y).")
        result.append(callbacks_lib.AlignmentCallback(
            probe if config.alignment == "full" else None, every=config.eval_every
        ))
    diverged = config.model_dir and os.path.join(config.model_dir, runs.DIVERGED_FILE)
    reference = None
    if config.divergence_check:
        reference = zero_logit_loss(config.loss, config.resolved_num_classes)
    result.append(StopOnDivergence(
        diverged if strategies.is_chief(strategy) else None, reference=reference))
    if not config.model_dir:
        return result + [
            ResultsRecorder(None, config.epochs, config.eval_every, results)] + list(extra)
    if strategies.is_chief(strategy):
        tf.io.gfile.makedirs(config.model_dir)
        path = lambda name: os.path.join(config.model_dir, name)  # noqa: E731
        result += [
            ResultsRecorder(path(runs.RESULTS_FILE), config.epochs, config.eval_every, results),
            HistoryLogger(path(runs.HISTORY_FILE)),
            EpochTensorBoard(path(runs.TENSORBOARD_DIR), write_graph=False, profile_batch=0),
        ]
    return result + list(extra) + [_backup(config, strategy, steps_per_epoch)]


def _backup(config, strategy, steps_per_epoch=None):
    """`AtomicBackup` in `<model_dir>/backup` (`backup-<task>` on non-chief workers), keeping
    every epoch's backup on the chief with `keep_checkpoints`, checking `steps_per_epoch`
    optimizer steps per epoch."""
    name = runs.BACKUP_DIR
    chief = strategies.is_chief(strategy)
    if not chief:
        name = f"{name}-{strategies.task_name(strategy)}"
    return backup_lib.AtomicBackup(
        os.path.join(config.model_dir, name), keep=config.keep_checkpoints and chief,
        steps_per_epoch=steps_per_epoch,
    )


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------


def _versions():
    return {
        "keras_wt_version": keras_wt.__version__,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}".replace("  ", " "),
    }


def _record_config(config, flags, derived):
    """Writes `experiment_config.json` and returns whether the run folder held one already (a
    run being continued). A continued run must have the saved configuration, apart from
    `RESUMABLE` settings (else a `ValueError` names the differences), and must not have
    diverged (`TrainingDiverged`); a damaged configuration is a `keras_wt.app.runs.RunError`."""
    path = os.path.join(config.model_dir, runs.CONFIG_FILE)
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    diverged = os.path.join(config.model_dir, runs.DIVERGED_FILE)
    if runs.exists(diverged):
        try:
            record = runs.read_json(diverged)
            where = (f" (loss {record['loss']} at batch {record['batch']} of epoch "
                     f"{record['epoch']}: {record.get('reason', 'not finite')})")
        except (ValueError, KeyError, TypeError):
            where = ""
        raise TrainingDiverged(
            f"{config.model_dir} diverged{where}; resuming it would diverge again. Delete "
            f"{diverged} to resume it anyway, or start a new run."
        )
    saved = runs.read_config(config.model_dir)
    if saved is not None:
        saved = saved.get("train_config", {})
        # A setting added after the run was saved is not compared (the run predates it).
        changed = sorted(
            k for k in current if k not in RESUMABLE and k in saved and saved[k] != current[k]
        )
        if changed:
            raise ValueError(
                f"{config.model_dir} holds a run with other settings; resuming it with "
                + ", ".join(f"{k}={current[k]!r} (saved: {saved.get(k)!r})" for k in changed)
                + f" would not continue it. Only {RESUMABLE} may change; use another directory."
            )
    tf.io.gfile.makedirs(config.model_dir)
    runs.write_json(path, dict(flags or {}, train_config=current,
                               derived=dict(derived or {}, **_versions())))
    return saved is not None


class _LogFile:
    """Copies the `keras_wt` log to `<model_dir>/log.txt` while a run lasts (local folders)."""

    def __init__(self, model_dir):
        self.path = None
        if model_dir and "://" not in model_dir:
            self.path = os.path.join(model_dir, runs.LOG_FILE)

    def __enter__(self):
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        self._handler = None
        if self.path:
            self._handler = logging.FileHandler(self.path, encoding="utf-8")
            self._handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(message)s")
            )
            logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()
        logger.setLevel(self._level)

    def note(self, message):
        """Writes an error line to `log.txt` only (the front end tells the console)."""
        if self._handler is not None:
            self._handler.handle(
                logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None))


def _probe_batch(evaluation, size):
    """The first `size` evaluation examples `(x, y)`."""
    xs, ys, n = [], [], 0
    for batch in evaluation:
        xs.append(batch[0])
        ys.append(batch[1])
        n += int(batch[1].shape[0])
        if n >= size:
            break
    return tf.concat(xs, 0)[:size], tf.concat(ys, 0)[:size]


def train(config, strategy=None, callbacks=(), flags=None, derived=None):
    """Trains `config.model` with `config.algo` on `config.dataset`, evaluating on the
    evaluated epochs (`evaluated_epochs`); continues the run in `config.model_dir` if it has a
    backup.

    Args:
        config: a `TrainConfig`.
        strategy: a `tf.distribute.Strategy`, instead of creating `config.strategy`.
        callbacks: extra Keras callbacks, run before the backup is written.
        flags: the command-line flags, recorded in `experiment_config.json`.
        derived: values derived from the flags (e.g. converted units), recorded with them.

    Returns:
        `(model, history)`.

    Raises:
        keras_wt.app.runs.RunLocked: another process writes `config.model_dir`.
        keras_wt.app.runs.RunError: its backup or records cannot be trusted (the message says why).
        DataError: the data cannot be trained on.
        TrainingDiverged: the run diverged (`StopOnDivergence`), or diverged before.
        ValueError: a resumed run's settings differ from the saved ones.
    """
    if strategy is None:
        strategy = strategies.create_strategy(
            config.strategy, tpu=config.tpu, devices=config.mirrored_devices
        )
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by the {replicas} replicas."
        )
    chief = strategies.is_chief(strategy)
    writes = bool(config.model_dir) and chief
    if writes:
        tf.io.gfile.makedirs(config.model_dir)
    # The lock first: a process locked out writes nothing, not even the log.
    lock = runs.RunLock(config.model_dir) if writes else contextlib.nullcontext()
    with lock, _LogFile(config.model_dir if writes else None) as log:
        try:
            return _train(config, strategy, callbacks, flags, derived, writes)
        except Exception as e:
            failure = describe_failure(e)
            if failure:  # the front end prints it; log.txt says why the run stopped
                log.note(failure[1])
            raise


def _op_error_line(message):
    """The line of a TensorFlow error message that says what went wrong (not where): for a
    failed `tf.debugging.Assert`, its message."""
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")
    lines = [line.strip() for line in message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(noise)] or lines or [""]
    line = useful[0]
    if "assertion failed: [" in line:
        line = line.split("assertion failed: [", 1)[1].rsplit("]", 1)[0]
    return line


def describe_failure(error):
    """`(exit status, one-line message)` for an error that stopped a run for another reason
    than a bug, or `None` (a bug, whose traceback is worth seeing).

    Status 1, a failure while running: bad or missing data (`DataError`, a missing dataset's
    `FileNotFoundError`, an error TensorFlow raised while it read the files), the disk (any
    `OSError`: full, read-only), the run folder (`keras_wt.app.runs.RunError`: held by another
    process, a damaged backup), a run that diverged (`TrainingDiverged`). Status 2, settings that
    cannot be used: any other `ValueError` (a value out of range, settings that differ from those
    of the run resumed).
    """
    if isinstance(error, (TrainingDiverged, runs.RunError, DataError, OSError)):
        return 1, str(error)
    if isinstance(error, tf.errors.OpError):
        return 1, f"{type(error).__name__}: {_op_error_line(error.message)}"
    if isinstance(error, ValueError):
        return 2, str(error)
    return None


def _train(config, strategy, callbacks, flags, derived, writes):
    # First: the seed of every random op created from here on (data shuffles included).
    keras.utils.set_random_seed(config.seed)
    continued = False
    if writes:  # before the data (slow): a run killed while it loads them can be resumed
        continued = _record_config(config, flags, derived)
    make_train, evaluation, input_shape, num_train = _data(config)
    steps_per_epoch = config.resolved_steps_per_epoch(num_train)
    steps_per_execution = config.resolved_steps_per_execution(steps_per_epoch, strategy)
    if steps_per_epoch % steps_per_execution:
        # Keras runs whole executions: the last one of every epoch would take batches of the
        # next epoch from the stream, and a resumed run would not see the same batches.
        logger.warning(
            "steps_per_execution=%d does not divide the %d steps of an epoch: every epoch will "
            "take %d batches of the next one, and a resumed run will not continue exactly.",
            steps_per_execution, steps_per_epoch, -steps_per_epoch % steps_per_execution,
        )
    warmup = config.resolved_mirror_warmup_steps(num_train)
    if writes:
        _record_config(config, flags, dict(
            derived or {}, steps_per_epoch=steps_per_epoch, mirror_warmup_steps=warmup
        ))
    logger.info(
        "Training %s with feedback=%r on %s on %d replicas (%s, dtype %s): global batch %d, "
        "%d steps per epoch, %d epochs, peak learning rate %.4g.",
        config.model, config.algo, config.dataset, strategy.num_replicas_in_sync, config.strategy,
        config.resolved_dtype, config.batch_size, steps_per_epoch, config.epochs,
        config.learning_rate,
    )
    with strategy.scope():
        model = build_model(config, input_shape)
        compile_model(model, config, steps_per_epoch)
    optimizer_steps = config.optimizer_steps_per_epoch(steps_per_epoch, steps_per_execution)
    first_epoch, results = 0, {}
    if config.model_dir:
        with strategy.scope():
            first_epoch = _backup(config, strategy, optimizer_steps).restore(model)
    if writes:
        results = resume.prepare(config.model_dir, first_epoch,
                                 evaluated_epochs(config.epochs, config.eval_every),
                                 optimizer_steps)
    if first_epoch:
        logger.info("Resuming %s after epoch %d (its latest good backup); any later epoch logged "
                    "above was interrupted and is trained again.", config.model_dir, first_epoch)
    elif continued:
        logger.info("Restarting %s from its first epoch: the interrupted run completed none.",
                    config.model_dir)
    probe = None
    if config.alignment == "full":
        probe = _probe_batch(evaluation, config.alignment_probe_size)
    all_callbacks = create_callbacks(
        model, config, strategy, probe=probe, results=results, extra=callbacks,
        mirror_warmup_steps=warmup, steps_per_epoch=optimizer_steps,
    )
    eval_steps = config.resolved_eval_steps
    with multi_worker_fit(model):
        history = model.fit(
            make_train(first_epoch),
            epochs=config.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_data=None if eval_steps == 0 else evaluation,
            validation_steps=eval_steps or None,
            validation_freq=evaluated_epochs(config.epochs, config.eval_every),
            callbacks=all_callbacks,
            shuffle=False,  # the pipelines shuffle, per epoch
            verbose=config.verbose,
        )
    if writes:
        path = os.path.join(config.model_dir, runs.MODEL_FILE)
        tmp = os.path.join(config.model_dir, f"tmp-{runs.MODEL_FILE}")
        if runs.is_local(path):
            model.save(tmp)  # then renamed: a kill while it saves leaves the previous file
            runs.replace_file(tmp, path)
        else:
            model.save(path)
        logger.info("Saved the trained model to %s", path)
    return model, history
