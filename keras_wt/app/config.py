"""The typed configs of a training run, in keras_wt's own units.

`TrainConfig` is the composition of one config per component, each defining, defaulting and
checking its own settings: `DataConfig` (what is read), `ModelConfig` (what is built),
`keras_wt.schedules.OptimizerConfig` (the schedule and the optimizer, weight decay included) and
`keras_wt.mirror.MirrorConfig` (the weight mirror), plus what belongs to the run itself (the
algorithm, epochs, evaluation, strategy, run folder, seed). It is the one input of
`keras_wt.app.training.train`; every front end (`keras-wt-train` through
`keras_wt.app.published.train_config`, `tpu/train_imagenet.py`) builds one. It resolves what
depends on the data or the strategy (steps per epoch and per execution, the mirror's warm-up, the
evaluation steps), each once, where `train` asks.
"""

import dataclasses
import json
import math

import keras
import tensorflow as tf

from keras_wt import algorithms
from keras_wt.algorithms import Learning
from keras_wt import callbacks as callbacks_lib
from keras_wt import models
from keras_wt.algorithms import ALGORITHMS
from keras_wt.app import strategies
from keras_wt.app.data import datasets
from keras_wt.mirror import MirrorConfig
from keras_wt.schedules import OptimizerConfig

DTYPES = ("auto", "float32", "mixed_bfloat16")
LOSSES = ("softmax", "summed_sigmoid")
ALIGNMENTS = ("none", "weights", "full")

# The most training steps per host call with `steps_per_execution="auto"` in a run's first epoch:
# fewer calls, less host overhead per step (the reference MLP's step is about 1 ms).
MAX_STEPS_PER_EXECUTION = 10
# After the first epoch, `steps_per_execution="auto"` groups as many steps per call as take about
# this long at the first epoch's measured step time (`tuned_steps_per_execution`): the console's
# progress and `StopOnDivergence` still see the run about once a second, and a fast step pays its
# host overhead once per call (issue #21 item 1: the reference MLP's whole epoch in one call).
SECONDS_PER_CALL = 1.0
# Settings (keys of `TrainConfig.record`) that may change between a run and its resumption
# without changing what is computed. `steps_per_execution` only groups steps into calls from the
# host (the weight mirror's steps run inside the training step, see
# `TrainConfig.resolved_steps_per_execution`).
RESUMABLE = ("model_dir", "data.data_dir", "tpu", "mirrored_devices", "verbose", "epochs",
             "steps_per_execution", "divergence_check")
# Seeds seed Python's, NumPy's (which takes 0 .. 2**32 − 1) and TensorFlow's generators.
MAX_SEED = 2**32 - 1

# The trainer's weight mirror (the convnets' and ImageNet's), in keras_wt's units: B → (σ²/λ)·W = W
# within ≈ 1/(η·λ) = 20 mirror steps, after every training step; each layer's noise batch sized
# for a residual angle of `target_angle` (convolutions need a handful of samples, wide Dense
# layers thousands), at most 2,048, and all of them within a budget of the training step's cost
# (`TrainConfig.mirror_cost`, `RECIPE_MIRROR_COST`): the layers that need more than the budget
# leaves them share a common cap and mirror at their own smaller rates, for the same angle with
# a longer lag (the BN CNN's 3,136-input dense layer: 89 samples at η = 0.0011, a lag of 892
# steps); warm-up: ten lags at η (200 steps, as before) or three of the slowest layer if longer.
# Rademacher noise (±σ), the library's default: the cheapest to draw (issue #21).
RECIPE_MIRROR = MirrorConfig(learning_rate=0.05, noise_std=1.0, decay=1.0, batch_size="auto",
                             target_angle=8.0, max_batch_size=2048, cap_policy="rate",
                             warmup_steps="auto", noise_distribution="rademacher")
# The budget: the mirror's products at most this fraction of a training step's (issue #21: `wm`
# does at most about 1.1x `bp`'s products; its measured steps are in BENCHMARKS.md).
RECIPE_MIRROR_COST = 0.1
# The recipe's earlier mirrors, all with normal noise, for comparison (RESULTS.md): before issue
# #21 (`--mirror_noise_distribution normal --mirror_cap_policy angle --mirror_warmup_steps 200
# --mirror_cost 0`: every layer at η, at most 2,048 samples), its first cheaper one
# (`--mirror_noise_distribution normal --mirror_max_batch_size 128 --mirror_cost 0`: at most 128
# samples, the convnets' training batch, a capped layer at its own rate), and its second
# (`--mirror_noise_distribution normal --mirror_cost 0.2`: a budget of a fifth of the step).
RECIPE_MIRROR_V3 = dataclasses.replace(RECIPE_MIRROR, noise_distribution="normal")
RECIPE_MIRROR_V3_COST = 0.2
RECIPE_MIRROR_V1 = dataclasses.replace(RECIPE_MIRROR_V3, cap_policy="angle", warmup_steps=200)
RECIPE_MIRROR_V2 = dataclasses.replace(RECIPE_MIRROR_V3, max_batch_size=128)
# The ImageNet recipe (Goyal et al.): 0.1 per 256 images at the global batch of 1024, 5 epochs of
# warm-up, ×0.1 at epochs 30, 60, 80, momentum 0.9, L2 1e-4 (OptimizerConfig's defaults).
IMAGENET_OPTIMIZER = OptimizerConfig(learning_rate=0.4)


def _check(owner, name, ok, allowed, optional=False):
    value = getattr(owner, name)
    if not ((optional and value is None) or (value is not None and ok(value))):
        raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}")


def _one_of(owner, name, allowed):
    if getattr(owner, name) not in allowed:
        raise ValueError(f"{name}={getattr(owner, name)!r} is not one of {tuple(allowed)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a run reads: `dataset` (`"imagenet"`, `"mnist"`, `"fashion_mnist"`, `"cifar10"`)
    from `data_dir` (or `use_synthetic_data` ImageNet batches of `image_size`), in global
    batches of `batch_size`; `steps_per_epoch` defaults to a full pass.

    `train_examples`, `eval_examples`: the examples of one pass over the ImageNet training and
    validation files (default: ImageNet's, `keras_wt.app.data.datasets.info`); a pass that reads
    another number stops the run (a truncated or missing file). `train_subset`: train on the
    first that many training examples (at least `batch_size`) of an in-memory dataset (a quick
    smoke run; the test set is unchanged). `num_classes`: default the dataset's.
    """

    dataset: str = "imagenet"
    data_dir: str = None
    batch_size: int = 1024
    image_size: int = 224
    num_classes: int = None
    use_synthetic_data: bool = False
    train_examples: int = None
    eval_examples: int = None
    train_subset: int = None
    steps_per_epoch: int = None

    def __post_init__(self):
        _one_of(self, "dataset", datasets.NAMES)
        if self.dataset == "imagenet" and not self.use_synthetic_data and not self.data_dir:
            raise ValueError(
                "data_dir is required (a directory of ImageNet TFRecords train-*/validation-*, "
                "possibly gs://...), unless use_synthetic_data is set."
            )
        if self.use_synthetic_data and self.dataset != "imagenet":
            raise ValueError("use_synthetic_data gives ImageNet-shaped batches: dataset='imagenet'")
        for name in ("batch_size", "image_size"):
            _check(self, name, lambda v: v >= 1, "an integer >= 1")
        _check(self, "steps_per_epoch", lambda v: v >= 1, "an integer >= 1 (or None: a full pass)",
               True)
        _check(self, "num_classes", lambda v: v >= 2, "an integer >= 2", True)
        for name in ("train_examples", "eval_examples"):
            _check(self, name, lambda v: v >= 1, "an integer >= 1 (or None: ImageNet's)", True)
        _check(self, "train_subset", lambda v: v >= 1, "an integer >= 1 (or None: all)", True)
        _check(self, "train_subset", lambda v: v >= self.batch_size,
               f"at least batch_size={self.batch_size} (one batch)", True)
        if self.train_subset is not None and self.dataset == "imagenet":
            raise ValueError("train_subset is for the in-memory datasets; for ImageNet give "
                             "steps_per_epoch (and train_examples for the files' size).")

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

    def resolved_steps_per_epoch(self, num_train):
        """`steps_per_epoch`, else a full pass over `num_train` examples: `N // batch_size` on
        ImageNet (full batches, as TPUs need), `ceil(N / batch_size)` on the small datasets (the
        last batch smaller)."""
        if self.steps_per_epoch:
            return self.steps_per_epoch
        if self.dataset == "imagenet":
            return num_train // self.batch_size
        return math.ceil(num_train / self.batch_size)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a run builds: the `keras_wt.models` network `name` with `options` (builder keyword
    arguments, e.g. `{"hidden": [500]}`), in `dtype` (`"auto"`: `mixed_bfloat16` on TPUs,
    `float32` elsewhere).

    `keep_unused_feedback`: keep the `B` of the layers whose input gradient no weight needs
    (`keras_wt.unused_feedback`; the first layer of every trainer model), mirroring or updating
    it, for figures that show its weight angle; by default it is not stored.
    """

    name: str = "resnet18"
    options: dict = dataclasses.field(default_factory=dict)
    dtype: str = "auto"
    keep_unused_feedback: bool = False

    def __post_init__(self):
        _one_of(self, "name", models.BUILDERS)
        _one_of(self, "dtype", DTYPES)
        object.__setattr__(self, "options", dict(self.options))


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on, in keras_wt's own units: the component configs
    and what belongs to the run.

    What is trained: `model` (`ModelConfig`) with the algorithm `algo` on `data`
    (`DataConfig`), with `loss` (`"softmax"`, with `label_smoothing`, or the reference
    `"summed_sigmoid"`), `optimizer` (`keras_wt.schedules.OptimizerConfig`: the schedule over
    `epochs`, SGD, weight decay) and, for an algorithm whose `B` learns by mirroring, `mirror`
    (`keras_wt.mirror.MirrorConfig`; its `seed` is set to the run's `seed`).
    `mirror_warmup_one_pass`: warm the mirror up for one pass over the training data
    (`num_train // batch_size` steps, the published code's) instead of `mirror.warmup_steps`.
    `mirror_cost`: with `mirror.batch_size="auto"` and no `mirror.max_cost` of its own, hold
    the mirror's products at most this fraction of a training step's (`resolved_mirror`); 0
    for no budget.

    Evaluation (`eval_steps`, default a full pass; 0: none) and the alignment probe
    (`alignment`: `"none"`, `"weights"` or `"full"` with `alignment_probe_size` examples) run
    every `eval_every` epochs, at the first and at the last. `divergence_check`: stop a run whose
    training loss explodes while finite (`StopOnDivergence`; a NaN or infinite loss, metric or
    weight stops it regardless).

    Where: `model_dir` is the run folder (`keras_wt.app.runs`; `None`: nothing is written), on
    `strategy` (`keras_wt.app.strategies.STRATEGIES`), `steps_per_execution` training steps per
    host call (an int, or `"auto"`: `resolved_steps_per_execution`).
    """

    data: DataConfig
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    algo: str = "bp"
    optimizer: OptimizerConfig = IMAGENET_OPTIMIZER
    mirror: MirrorConfig = RECIPE_MIRROR
    mirror_warmup_one_pass: bool = False
    mirror_cost: float = RECIPE_MIRROR_COST
    loss: str = "softmax"
    label_smoothing: float = 0.0
    epochs: int = 90
    eval_steps: int = None
    eval_every: int = 1
    alignment: str = "weights"
    alignment_probe_size: int = 64
    strategy: str = "default"
    tpu: str = None
    mirrored_devices: tuple = None
    steps_per_execution: object = 1
    jit_compile: bool = None
    model_dir: str = None
    keep_checkpoints: bool = True
    seed: int = 0
    verbose: int = 2
    divergence_check: bool = True

    def __post_init__(self):
        for name, kind in (("data", DataConfig), ("model", ModelConfig),
                           ("optimizer", OptimizerConfig), ("mirror", MirrorConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a {kind.__name__}")
        _one_of(self, "algo", ALGORITHMS)
        _one_of(self, "strategy", strategies.STRATEGIES)
        _one_of(self, "loss", LOSSES)
        _one_of(self, "alignment", ALIGNMENTS)
        if self.steps_per_execution != "auto":
            _check(self, "steps_per_execution", lambda v: isinstance(v, int) and v >= 1,
                   "an integer >= 1 or 'auto'")
        for name in ("epochs", "eval_every", "alignment_probe_size"):
            _check(self, name, lambda v: v >= 1, "an integer >= 1")
        _check(self, "eval_steps", lambda v: v >= 0, "an integer >= 0 (0: no evaluation)", True)
        _check(self, "seed", lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED,
               f"an integer in [0, {MAX_SEED}]")
        _check(self, "label_smoothing", lambda v: 0 <= v < 1, "a number in [0, 1)")
        _check(self, "mirror_cost", lambda v: isinstance(v, (int, float))
               and not isinstance(v, bool) and 0 <= v < math.inf, "a number >= 0 (0: no budget)")
        if self.mirror.seed != self.seed:  # the run's seed seeds the noise, as everything else
            self.mirror = dataclasses.replace(self.mirror, seed=self.seed)

    def record(self):
        """The settings as one flat JSON-able dict (`experiment_config.json`'s
        `"train_config"`): the run's own under their names, a component's as
        `<component>.<field>` (`"mirror.decay"`)."""
        values = json_values(dataclasses.asdict(self))
        flat = {}
        for key, value in values.items():
            if key in ("data", "model", "optimizer", "mirror"):
                flat.update({f"{key}.{name}": v for name, v in value.items()})
            else:
                flat[key] = value
        return flat

    @property
    def resolved_dtype(self):
        """`model.dtype`, with `"auto"` meaning `mixed_bfloat16` on TPUs and `float32`
        elsewhere."""
        if self.model.dtype == "auto":
            return "mixed_bfloat16" if self.strategy == "tpu" else "float32"
        return self.model.dtype

    def optimizer_steps_per_epoch(self, steps_per_epoch, steps_per_execution):
        """The optimizer steps of an epoch: Keras runs whole calls of `steps_per_execution`
        steps, so `steps_per_epoch` rounded up to a multiple of it."""
        return math.ceil(steps_per_epoch / steps_per_execution) * steps_per_execution

    def resolved_steps_per_execution(self, steps_per_epoch, strategy=None):
        """`steps_per_execution`, else (`"auto"`) the first epoch's: the largest divisor of
        `steps_per_epoch` up to `MAX_STEPS_PER_EXECUTION` (a divisor, so that no call crosses an
        epoch's end: the batches, their order and everything computed are those of one step per
        call; the later epochs' is `tuned_steps_per_execution`), and 1 where more would change or
        break training:

        * the weight mirror run between calls (`mirror.in_train_step=False`, or `mirror.every >
          1` under several replicas; `MirrorCallback`): one step per call keeps a mirror step
          after every batch;
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
            algorithms.get(self.algo).learns_feedback == Learning.MIRROR
            and not callbacks_lib.mirrors_in_train_step(
                self.mirror.in_train_step, self.mirror.every, replicas
            )
        )
        if unsupported or mirror_between_calls:
            return 1
        return max(d for d in range(1, MAX_STEPS_PER_EXECUTION + 1) if steps_per_epoch % d == 0)

    def tuned_steps_per_execution(self, steps_per_epoch, seconds_per_step, steps_per_execution):
        """The steps per call for the epochs after the first with `steps_per_execution="auto"`:
        the largest divisor of `steps_per_epoch` whose call takes at most `SECONDS_PER_CALL` at
        `seconds_per_step` (the first epoch's, measured: `keras_wt.app.callbacks.CallTimer`), and
        never fewer than the first epoch's `steps_per_execution`. The same as the first epoch's
        for an explicit `steps_per_execution`, one step per call (where the first epoch needed
        it) or no measurement (`None`)."""
        if (self.steps_per_execution != "auto" or steps_per_execution == 1
                or seconds_per_step is None):
            return steps_per_execution
        fits = [d for d in range(1, steps_per_epoch + 1)
                if steps_per_epoch % d == 0 and d * seconds_per_step <= SECONDS_PER_CALL]
        return max(fits + [steps_per_execution])

    def resolved_mirror(self, num_train):
        """`mirror`, its warm-up one pass over `num_train` examples (`num_train // batch_size`
        steps) with `mirror_warmup_one_pass`, and for `batch_size="auto"` without a `max_cost`
        of its own the `max_cost` of `mirror_cost`: a training step of the global batch `B`
        costs about `3·B` samples' products of every layer and each mirror step `2·n` (`steps`
        of them every `every` training steps), so `max_cost = 1.5·mirror_cost·B·every/steps`."""
        mirror = self.mirror
        if self.mirror_warmup_one_pass:
            mirror = dataclasses.replace(mirror, warmup_steps=num_train // self.data.batch_size)
        if mirror.batch_size == "auto" and mirror.max_cost is None and self.mirror_cost:
            mirror = dataclasses.replace(mirror, max_cost=1.5 * self.mirror_cost
                                         * self.data.batch_size * mirror.every / mirror.steps)
        return mirror

    @property
    def resolved_eval_steps(self):
        """`None` (a full pass over the evaluation data) or a number of batches."""
        if self.eval_steps is not None:
            return self.eval_steps
        if self.data.use_synthetic_data:
            return math.ceil(datasets.info("imagenet").num_test / self.data.batch_size)
        return None


def json_values(values):
    """`values` as JSON reads them back (tuples as lists; a callable noise batch as Keras
    serializes it)."""
    return json.loads(json.dumps(values, default=keras.saving.serialize_keras_object))


def evaluated_epochs(epochs, every):
    """The epochs (1-based) that are evaluated: the first, every `every`-th after it
    (1, 1 + every, ...) and the last, as the published code's `test_frequency`."""
    return sorted({e for e in range(1, epochs + 1) if (e - 1) % every == 0} | {epochs})

