"""`TrainConfig`: everything a training run depends on, in keras_wt's own units.

The one typed config of `keras_wt.app.training.train`; every front end (`keras-wt-train` through
`keras_wt.app.experiment`, `tpu/train_imagenet.py`) builds one. It validates its fields and
resolves what depends on the data or the strategy (steps per epoch and per execution, the
mirror's warm-up, the evaluation steps).
"""

import dataclasses
import math

import tensorflow as tf

from keras_wt import algorithms
from keras_wt import callbacks as callbacks_lib
from keras_wt import models
from keras_wt import schedules
from keras_wt.algorithms import ALGORITHMS
from keras_wt.app import strategies
from keras_wt.app.data import datasets

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
    run (a truncated or missing file). `train_subset`: train on the first that many training
    examples of an in-memory dataset (a quick smoke run; the test set is unchanged).

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
    train_subset: int = None

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
        check("train_subset", lambda v: v >= 1, "an integer >= 1 (or None: all)", True)
        if self.train_subset is not None and self.dataset == "imagenet":
            raise ValueError("train_subset is for the in-memory datasets; for ImageNet give "
                             "steps_per_epoch (and train_examples for the files' size).")
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

