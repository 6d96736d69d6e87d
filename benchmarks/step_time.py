"""What each keras_wt algorithm costs per training step against stock Keras (issues #5, #12).

For three models — the reference MLP (784-500-10, sigmoid, batch 128), a small CNN
(`keras_wt.models.cnn`, 28x28x1, batch 128) and ResNet-18 at 32x32x3 (batch 64) — versions
of the same network are built: the **stock Keras** model (`keras.layers.Dense`/`Conv2D`), and the
keras_wt model with `feedback=` `bp`, `fa`, `ss`, `kp` (trained by the `KolenPollack` optimizer)
and `wm` (a `MirrorCallback` mirror step after every batch, noise batch = training batch: inside
the compiled training step, and as `wm/calls` between calls); `+B1` keeps the first layer's B,
which no gradient uses. Each is compiled with `jit_compile` off and on and trained the way
`model.fit` trains it: one call of `model.train_function` on a `tf.data` iterator per step, with,
for `wm`, `MirrorCallback.on_train_batch_begin/end` around it. The versions run **interleaved,
one step each in a shuffled order per round**, in one process, so machine drift hits them alike;
every step ends with a host read of the loss (as a progress bar does), so each step is timed to
completion. `wm` on the MLP is also timed with 10 steps per call and without its noise draw.

Measured:

* median step time over the timed steps (after warm-up steps that include tracing/compilation),
  and its ratio to stock Keras with a 95% bootstrap interval over rounds;
* memory (TF on CPU has no per-variant process peak, so what is counted is stated exactly):
  `state`, the bytes of the model's variables (W, biases, batch-norm statistics, B) plus the
  optimizer's own variables (those that are not model variables: momentum, iterations, ...);
  the optimizer's variables as `optimizer.variables` lists them (what saving it writes); and
  `peak`, `state` plus the peak bytes the TensorFlow CPU allocator held above its level before
  one training step (+ mirror step): that step's activations, gradients and temporaries
  (`tf.config.experimental.get_memory_info("CPU:0")`, reset before the step; max of 3 steps).
  XLA steps on CPU keep their temporaries outside that allocator, so `peak` is shown for the
  steps without XLA only;
* seconds per epoch of the reference MLP on Fashion-MNIST (`model.fit`, 60,000 images, batch 128)
  for every algorithm, epochs interleaved across algorithms;
* the cost of one mirror step against model size: 784-h-10 MLPs of growing width h, and the CNN
  and ResNet-18 above, against a stock Keras training step of the same model, with the ratio of
  their matmul/convolution FLOPs (a mirror step is one forward pass of noise and one
  weight-gradient per layer; a training step is a forward pass and two gradients per layer), the
  time of drawing the noise alone, and the mirror step without the first layer (whose B only
  ever carries the gradient with respect to the model's input, which training never computes).

Usage (from the repository root):

    .venv/bin/python benchmarks/step_time.py --quick                 # < 5 min on 2 cores
    .venv/bin/python benchmarks/step_time.py --write BENCHMARKS.md   # the full benchmark

`--write` replaces the tables between the `step_time` markers of the file (creating it if
needed) and keeps the prose around them.
"""

import argparse
import dataclasses
import datetime
import logging
import math
import os
import platform
import re
import resource
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_wt  # noqa: E402
from keras_wt import _compat  # noqa: E402
from keras_wt import layers as wt_layers  # noqa: E402

logger = logging.getLogger("keras_wt.benchmarks")

# `kp` and `wm` are built as `keras_wt.app.training.train` and `keras_wt.convert` build them: the
# first layer, whose B no gradient uses, stores none (`keras_wt.unused_feedback`); `kp+B1` and
# `wm+B1` keep it (and update or mirror it), as every layer did before issue #12.
KEEP_UNUSED = "+B1"
# `wm` runs its mirror step inside the training step (`MirrorCallback(in_train_step=True)`, the
# default); `wm/calls` from the callback between calls of the training function, as before.
BETWEEN_CALLS = "/calls"
VARIANTS = ("keras", "bp", "fa", "ss", "kp", "wm", "kp+B1", "wm+B1", "wm/calls")
# Ratio-to-stock targets of issues #5 and #12: step time of each variant, KP's optimizer memory.
STEP_TARGETS = {"bp": 1.05, "fa": 1.05, "ss": 1.05, "kp": 1.02, "wm": 1.3}
WM_MLP_TARGET = 1.10  # issue #12: wm with a mirror step after every batch, reference MLP
KP_OPTIMIZER_MEMORY_TARGET = 1.1

LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
MIRROR = dict(learning_rate=0.05, noise_std=1.0, decay=0.1)

BEGIN_MARK = "<!-- step_time:begin -->"
END_MARK = "<!-- step_time:end -->"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelSpec:
    """A benchmark model: `build(feedback)` returns the keras_wt model with `feedback=`."""

    name: str
    description: str
    batch_size: int
    input_shape: tuple
    build: object
    loss: object


def model_specs():
    """The three models of the step-time table. `keras_wt.models` is imported here, lazily."""
    from keras_wt import models

    logits = lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # noqa: E731
    return {
        "mlp": mlp_spec(500),
        "cnn": ModelSpec(
            "cnn",
            "CNN 28x28x1 (conv5x5x32-pool-conv5x5x64-pool-256-10)",
            128,
            (28, 28, 1),
            lambda feedback: models.cnn(input_shape=(28, 28, 1), feedback=feedback, seed=1),
            logits,
        ),
        "resnet18": ModelSpec(
            "resnet18",
            "ResNet-18 32x32x3, 10 classes",
            64,
            (32, 32, 3),
            lambda feedback: models.resnet18(
                input_shape=(32, 32, 3), num_classes=10, feedback=feedback, seed=1
            ),
            logits,
        ),
    }


def mlp_spec(hidden, batch_size=128):
    """The reference MLP 784-`hidden`-10: sigmoid units, reference initializer and loss."""
    from keras_wt import models

    return ModelSpec(
        "mlp" if hidden == 500 else f"mlp{hidden}",
        f"MLP 784-{hidden}-10 (sigmoid)",
        batch_size,
        (784,),
        lambda feedback: models.mlp(hidden=(hidden,), feedback=feedback, seed=1),
        models.reference_loss,
    )


def _stock_class(layer):
    for stock in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense):
        if isinstance(layer, stock):
            return stock
    raise TypeError(f"no stock Keras twin for {type(layer).__name__}")


def stock_twin(model):
    """The same network with every keras_wt layer replaced by its stock Keras layer."""

    def clone(layer):
        if isinstance(layer, wt_layers.FeedbackLayer):
            config = layer.get_config()
            for key in wt_layers.FEEDBACK_CONFIG_KEYS:
                config.pop(key, None)
            return _stock_class(layer).from_config(config)
        return layer.__class__.from_config(layer.get_config())

    twin = keras.models.clone_model(model, clone_function=clone)
    assert not wt_layers.feedback_layers(twin)
    return twin


def linear_flops(model, batch_size):
    """Multiply-add FLOPs (x2) of every Dense/Conv forward product of `model` for one batch,
    in layer order: `2·n·(output positions)·|W|`."""
    flops = []
    for layer in _compat.flatten_layers(model)[1:]:  # without the model itself
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)):
            positions = math.prod(int(d) for d in layer.output.shape[1:-1])
            flops.append(2 * batch_size * positions * math.prod(layer.kernel.shape))
    return flops


def variable_bytes(variables):
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)


# --------------------------------------------------------------------------------------------
# One trainable version of a model
# --------------------------------------------------------------------------------------------


class Trainee:
    """One version (`variant`) of a model, compiled, with a repeating batch to train on."""

    def __init__(self, spec, variant, jit_compile, seed=0, steps_per_execution=1):
        self.spec = spec
        self.variant = variant
        self.steps_per_execution = steps_per_execution
        feedback = variant.replace(KEEP_UNUSED, "").replace(BETWEEN_CALLS, "")
        feedback = "bp" if feedback == "keras" else feedback
        learns = keras_wt.algorithms.get(feedback).learns_feedback
        model = spec.build(feedback)
        if variant == "keras":
            model = stock_twin(model)
        elif not variant.endswith(KEEP_UNUSED):
            keras_wt.drop_unused_feedback(model)
        if learns == keras_wt.algorithms.Learning.OPTIMIZER:
            optimizer = keras_wt.optimizers.KolenPollack(
                keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM), weight_decay=WEIGHT_DECAY
            )
        else:
            optimizer = keras.optimizers.SGD(
                LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
            )
        model.compile(optimizer=optimizer, loss=spec.loss(), jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
        self.model = model
        self.callback = None
        if learns == keras_wt.algorithms.Learning.MIRROR:
            self.callback = keras_wt.callbacks.MirrorCallback(
                every=1,
                steps=1,
                batch_size=spec.batch_size,
                jit_compile=jit_compile,
                in_train_step=not variant.endswith(BETWEEN_CALLS),
                **MIRROR,
            )
            self.callback.set_model(model)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((spec.batch_size,) + spec.input_shape).astype("float32")
        y = rng.integers(0, 10, spec.batch_size).astype("int32")
        self.iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
        model.make_train_function()
        # model.fit builds the optimizer before the first step; so do we (KP pairs need it).
        model.optimizer.build(model.trainable_variables)
        if self.callback is not None:
            # As model.fit: one epoch that never ends; `batch` counts its batches.
            self.callback.on_train_begin()
            self.callback.on_epoch_begin(0)
        self.batch = 0

    def step(self):
        """One call of the training function as `model.fit` runs it (`steps_per_execution`
        steps). Returns (train seconds, mirror seconds) per step."""
        start = time.perf_counter()
        if self.callback is not None:
            self.callback.on_train_batch_begin(self.batch)
        begun = time.perf_counter()
        logs = self.model.train_function(self.iterator)
        float(logs["loss"])
        trained = time.perf_counter()
        if self.callback is not None:
            self.callback.on_train_batch_end(self.batch + self.steps_per_execution - 1, logs)
        end = time.perf_counter()
        self.batch += self.steps_per_execution
        per_step = 1.0 / self.steps_per_execution
        return (trained - begun) * per_step, ((begun - start) + (end - trained)) * per_step

    def mirror_step(self, skip_first=False):
        """One compiled mirror step alone (`WeightMirror.__call__`), in seconds.

        With `skip_first`, the step leaves out the first `wm` layer: the layer that reads the
        model's input, whose B would only carry the gradient with respect to the input, which
        training never computes.
        """
        mirror = self.callback.mirror
        if skip_first and mirror.layers[0].feedback_used:
            if getattr(self, "_skip_first_mirror", None) is None:
                self._skip_first_mirror = keras_wt.mirror.WeightMirror(
                    mirror.layers[1:],
                    batch_size=self.spec.batch_size,
                    jit_compile=self.callback.jit_compile,
                    **MIRROR,
                )
            mirror = self._skip_first_mirror
        start = time.perf_counter()
        mirror(self.batch)
        self.batch += 1
        return time.perf_counter() - start

    def state_bytes(self):
        """Bytes of: the model's variables, its feedback kernels B, the optimizer's own state
        (its variables that are not the model's, each counted once), and the optimizer's
        variables as `optimizer.variables` lists them (what a checkpoint of it saves)."""
        feedback = [
            layer.feedback_kernel
            for layer in wt_layers.feedback_layers(self.model)
            if layer.feedback_kernel is not None
        ]
        model_ids = {id(v) for v in self.model.weights}
        owned = {id(v): v for v in self.model.optimizer.variables if id(v) not in model_ids}
        return (
            variable_bytes(self.model.weights),
            variable_bytes(feedback),
            variable_bytes(owned.values()),
            variable_bytes(self.model.optimizer.variables),
        )

    def transient_peak_bytes(self, repeats=3):
        """Peak bytes the TF CPU allocator held above its level before a step, max over
        `repeats` steps; `None` where the allocator keeps no statistics."""
        peaks = []
        for _ in range(repeats):
            try:
                tf.config.experimental.reset_memory_stats("CPU:0")
                before = tf.config.experimental.get_memory_info("CPU:0")["current"]
                self.step()
                peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
            except (ValueError, tf.errors.OpError):
                return None
            peaks.append(peak - before)
        return max(peaks)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def ratio_interval(numerator, denominator, rng, resamples=2000):
    """Ratio of medians of two per-round series, with a 95% bootstrap interval over rounds."""
    numerator, denominator = np.asarray(numerator), np.asarray(denominator)
    ratio = np.median(numerator) / np.median(denominator)
    rounds = len(numerator)
    picks = rng.integers(0, rounds, (resamples, rounds))
    ratios = np.median(numerator[picks], axis=1) / np.median(denominator[picks], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(ratio), float(low), float(high)


def interleaved(functions, rounds, rng):
    """Calls every function once per round, in a fresh random order each round.

    Returns `{name: [result of round 0, round 1, ...]}`.
    """
    results = {name: [] for name in functions}
    names = list(functions)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            results[name].append(functions[name]())
    return results


# --------------------------------------------------------------------------------------------
# The benchmarks
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepResult:
    model: str
    description: str
    batch_size: int
    jit_compile: bool
    steps: int
    median_ms: dict  # variant -> median total step ms
    ratio: dict  # variant -> (ratio, low, high) of total step time to stock Keras
    mirror_ms: float  # median of the wm mirror part alone
    train_ms_wm: float  # median of the wm train_function part alone
    state: dict  # variant -> (model bytes, B bytes, optimizer bytes)
    transient: dict  # variant -> bytes or None
    flops: list  # forward FLOPs of every linear layer
    params: int  # trainable parameters of the stock model
    mirror: object  # a MirrorResult (jit_compile off only) or None
    times: dict  # variant -> [(train seconds, mirror seconds) per timed step]
    fused: tuple  # (ms of FUSED_STEPS separate mirror calls, ms of one fused call) of "wm"


def step_benchmark(spec, jit_compile, warmup, steps, rng, mirror_rounds=0):
    """Interleaved step times of the six versions of `spec` (one `StepResult`)."""
    logger.info("%s, jit_compile=%s: building and compiling", spec.name, jit_compile)
    trainees = {variant: Trainee(spec, variant, jit_compile) for variant in VARIANTS}
    start = time.perf_counter()
    for trainee in trainees.values():
        for _ in range(warmup):
            trainee.step()
    logger.info("  warm-up (%d steps each, incl. tracing): %.1fs", warmup,
                time.perf_counter() - start)
    start = time.perf_counter()
    times = interleaved({v: t.step for v, t in trainees.items()}, steps, rng)
    logger.info("  %d timed steps each: %.1fs", steps, time.perf_counter() - start)
    totals = {v: [a + b for a, b in times[v]] for v in VARIANTS}
    median_ms = {v: 1e3 * float(np.median(totals[v])) for v in VARIANTS}
    ratio = {v: ratio_interval(totals[v], totals["keras"], rng) for v in VARIANTS}
    transient = {v: trainees[v].transient_peak_bytes() for v in VARIANTS}
    fused = fused_mirror_times(trainees["wm"].callback.mirror, max(steps // 10, 3), rng)
    result = StepResult(
        model=spec.name,
        description=spec.description,
        batch_size=spec.batch_size,
        jit_compile=jit_compile,
        steps=steps,
        median_ms=median_ms,
        ratio=ratio,
        mirror_ms=1e3 * float(np.median([m for _, m in times["wm"]])),
        train_ms_wm=1e3 * float(np.median([t for t, _ in times["wm"]])),
        state={v: trainees[v].state_bytes() for v in VARIANTS},
        transient=transient,
        flops=linear_flops(trainees["keras"].model, spec.batch_size),
        params=sum(math.prod(w.shape) for w in trainees["keras"].model.trainable_weights),
        mirror=(
            mirror_measurement(spec, trainees["keras"], trainees["wm+B1"], 1, mirror_rounds, rng)
            if mirror_rounds and not jit_compile
            else None
        ),
        times=times,
        fused=fused,
    )
    logger.info(
        "  median ms: %s",
        ", ".join(f"{v} {median_ms[v]:.2f} ({ratio[v][0]:.3f}x)" for v in VARIANTS),
    )
    del trainees
    keras.backend.clear_session()
    return result


@dataclasses.dataclass
class WmResult:
    jit_compile: bool
    steps_per_execution: int
    calls: int
    median_ms: dict  # variant -> median ms per training step
    ratio: dict  # variant -> (ratio, low, high) to stock Keras


WM_VARIANTS = ("keras", "wm", "wm/calls", "wm/no-noise")


def _noiseless(trainee):
    """`trainee`'s mirror with its noise replaced by a constant batch (of the counter's parity:
    not folded away): the mirror step's cost without the draw of its Gaussian noise."""
    mirror = trainee.callback.mirror

    def constant(layer_index, counter, replica):
        layer = mirror.layers[layer_index]
        shape = (mirror._local_batches[layer_index],) + tuple(layer.feedback_input_shape[1:])
        return tf.fill(shape, tf.cast(counter % 2, tf.float32) * mirror.noise_std)

    mirror._noise = constant  # before the first call traces the training function
    return trainee


def wm_mlp_benchmark(jit_compile, steps_per_execution, calls, rng, warmup=3):
    """Interleaved ms per training step of the reference MLP with `steps_per_execution` steps
    per call: stock Keras; `wm` (mirror inside the step); `wm/calls` (mirror between calls);
    `wm/no-noise` (inside the step, the noise a constant)."""
    spec = mlp_spec(500)
    trainees = {
        variant: Trainee(spec, variant.replace("/no-noise", ""), jit_compile,
                         steps_per_execution=steps_per_execution)
        for variant in WM_VARIANTS
    }
    _noiseless(trainees["wm/no-noise"])
    for trainee in trainees.values():
        for _ in range(warmup):
            trainee.step()
    times = interleaved({v: t.step for v, t in trainees.items()}, calls, rng)
    totals = {v: [a + b for a, b in times[v]] for v in WM_VARIANTS}
    result = WmResult(
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
        calls=calls,
        median_ms={v: 1e3 * float(np.median(totals[v])) for v in WM_VARIANTS},
        ratio={v: ratio_interval(totals[v], totals["keras"], rng) for v in WM_VARIANTS},
    )
    logger.info(
        "  wm on the MLP, jit_compile=%s, %d steps per call: %s", jit_compile,
        steps_per_execution,
        ", ".join(f"{v} {result.median_ms[v]:.3f} ms ({result.ratio[v][0]:.3f}x)"
                  for v in WM_VARIANTS),
    )
    del trainees
    keras.backend.clear_session()
    return result


FUSED_STEPS = 10


def fused_mirror_times(mirror, rounds, rng):
    """Median ms of the `FUSED_STEPS` mirror steps owed after an execution of that many batches:
    as separate calls (`mirror(counter)` each) and as one fused call (`mirror.run`)."""
    def separate():
        start = time.perf_counter()
        for counter in range(FUSED_STEPS):
            mirror(counter)
        return time.perf_counter() - start

    def fused():
        start = time.perf_counter()
        mirror.run(0, FUSED_STEPS)
        return time.perf_counter() - start

    separate(), fused()  # tracing
    times = interleaved({"separate": separate, "fused": fused}, rounds, rng)
    return tuple(1e3 * float(np.median(times[k])) for k in ("separate", "fused"))


@dataclasses.dataclass
class MirrorResult:
    model: str
    description: str
    batch_size: int
    jit_compile: bool
    params: int
    mirror_ms: float
    mirror_skip_first_ms: float
    stock_ms: float
    flop_ratio: float
    noise_samples: int
    noise_ms: float


def flop_ratio(flops):
    """Mirror-step FLOPs over training-step FLOPs of the linear layers.

    A mirror step: a forward product and a weight-gradient per layer (2·f). A training step:
    a forward product, a weight-gradient and an input-gradient per layer, except that the first
    layer needs no input-gradient (3·f, minus f of the first layer).
    """
    return 2 * sum(flops) / (3 * sum(flops) - flops[0])


def unused_first_flop_ratio(flops):
    """`flop_ratio` of the mirror without the first layer (whose B no gradient uses, so it is
    neither stored nor mirrored): `2·(Σf − f₁) / (3·Σf − f₁)`."""
    return 2 * (sum(flops) - flops[0]) / (3 * sum(flops) - flops[0])


def noise_cost(trainee, repeats=10):
    """(samples, median ms) of drawing one mirror step's noise — a batch of every `wm` layer's
    input shape — with TensorFlow's stateless normal generator in one `tf.function`."""
    shapes = [
        (trainee.spec.batch_size,) + tuple(layer.feedback_input_shape[1:])
        for layer in trainee.callback.mirror.layers
    ]

    @tf.function
    def draw(counter):
        seed = tf.stack([tf.constant(0, tf.int64), counter])
        return [tf.random.stateless_normal(shape, seed) for shape in shapes]

    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        draw(tf.constant(i, tf.int64))
        times.append(time.perf_counter() - start)
    samples = sum(math.prod(shape) for shape in shapes)
    return samples, 1e3 * float(np.median(times[2:]))


def mirror_measurement(spec, stock, mirrored, warmup, rounds, rng):
    """One stock training step, one mirror step and one mirror step without the first layer
    of the same model, interleaved (a `MirrorResult`)."""
    functions = {
        "stock": lambda: stock.step()[0],
        "mirror": mirrored.mirror_step,
        "skip_first": lambda: mirrored.mirror_step(skip_first=True),
    }
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = interleaved(functions, rounds, rng)
    noise_samples, noise_ms = noise_cost(mirrored)
    median = {name: 1e3 * float(np.median(times[name])) for name in functions}
    return MirrorResult(
        model=spec.name,
        description=spec.description,
        batch_size=spec.batch_size,
        jit_compile=stock.model.jit_compile,
        params=sum(math.prod(w.shape) for w in stock.model.trainable_weights),
        mirror_ms=median["mirror"],
        mirror_skip_first_ms=median["skip_first"],
        stock_ms=median["stock"],
        flop_ratio=flop_ratio(linear_flops(stock.model, spec.batch_size)),
        noise_samples=noise_samples,
        noise_ms=noise_ms,
    )


def mirror_sweep(widths, warmup, rounds, rng):
    """`mirror_measurement` for 784-h-10 MLPs of width h (jit_compile off)."""
    results = []
    for hidden in widths:
        spec = mlp_spec(hidden)
        stock = Trainee(spec, "keras", False)
        mirrored = Trainee(spec, "wm+B1", False)
        results.append(mirror_measurement(spec, stock, mirrored, warmup, rounds, rng))
        del stock, mirrored
        keras.backend.clear_session()
    return results


def _read_idx(path):
    """An MNIST-format IDX file (gzip), as a numpy array."""
    import gzip

    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_train():
    """Fashion-MNIST training images (flattened, in [0, 1]) and labels."""
    try:
        from keras_wt.app.data import datasets

        (x, y), _ = datasets.load_numpy("fashion_mnist", FASHION_MNIST_DIR)
    except (ImportError, FileNotFoundError, AttributeError):
        x = _read_idx(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
        y = _read_idx(os.path.join(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz"))
    x = np.asarray(x, np.float32).reshape(len(x), -1) / 255.0
    return x, np.asarray(y, np.int32)


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self._start


def epoch_benchmark(jit_compile, rounds, rng):
    """Seconds per `model.fit` epoch of the reference MLP on Fashion-MNIST, every version."""
    x, y = fashion_mnist_train()
    spec = mlp_spec(500)
    trainees = {variant: Trainee(spec, variant, jit_compile) for variant in VARIANTS}
    warm = 128 * 10 + 96  # traces the full batches and the last, partial batch of an epoch

    def epoch(trainee, x, y):
        timer = _EpochTimer()
        callbacks = [timer] if trainee.callback is None else [trainee.callback, timer]
        trainee.model.fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=callbacks)
        return timer.seconds

    for trainee in trainees.values():
        epoch(trainee, x[:warm], y[:warm])
    times = interleaved(
        {v: (lambda t=t: epoch(t, x, y)) for v, t in trainees.items()}, rounds, rng
    )
    del trainees
    keras.backend.clear_session()
    return {v: float(np.median(times[v])) for v in VARIANTS}, len(x)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mib(nbytes):
    return nbytes / 2**20


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description():
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory = f"{memory:.0f} GiB RAM"
    except (ValueError, OSError):
        memory = "unknown RAM"
    devices = ", ".join(d.device_type for d in tf.config.list_physical_devices()) or "none"
    return (
        f"{_cpu_name()}, {os.cpu_count()} cores, {memory}; TF devices: {devices}; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, keras_wt "
        f"{keras_wt.__version__}"
    )


def _mark(ratio, target):
    value, low, high = ratio
    if high <= target:
        return "yes"
    if value <= target:
        return "yes (within noise)"
    if low <= target:
        return "no (within noise)"
    return "no"


def _fmt_ratio(ratio):
    value, low, high = ratio
    return f"{value:.2f} ({low:.2f}–{high:.2f})"


def render(step_results, mirror_results, epochs, header, wm_results=()):
    lines = [header, ""]
    lines += [
        "### Step time, ratio to stock Keras",
        "",
        "Median training step (`train_function` + host read of the loss; for `wm` plus "
        "`MirrorCallback.on_train_batch_begin/end`), as a ratio to the stock Keras model's "
        "median, with a 95% bootstrap interval over rounds. Targets: bp, fa, ss ≤ 1.05; kp ≤ 1.02; "
        "wm ≤ 1.3, and ≤ 1.10 on the reference MLP. `kp`, `wm`: the first layer's B, which no "
        "gradient uses, not stored (as `train` and `convert` build models); `kp+B1`, `wm+B1`: "
        "kept, updated and mirrored. `wm`, `wm+B1`: the mirror step inside the compiled "
        "training step (`MirrorCallback`'s default); `wm/calls`: as `wm`, the mirror step "
        "called by the callback after each call of the training function.",
        "",
        "| model | batch | jit | steps | Keras ms | " + " | ".join(VARIANTS[1:]) + " |",
        "|---|---|---|---|---|" + "---|" * (len(VARIANTS) - 1),
    ]
    for r in step_results:
        cells = [_fmt_ratio(r.ratio[v]) for v in VARIANTS[1:]]
        lines.append(
            f"| {r.description} | {r.batch_size} | {'on' if r.jit_compile else 'off'} | "
            f"{r.steps} | {r.median_ms['keras']:.2f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "### Targets",
        "",
        "| model | jit | bp ≤ 1.05 | fa ≤ 1.05 | ss ≤ 1.05 | kp ≤ 1.02 | wm ≤ 1.3 | "
        "wm ≤ 1.10 (MLP) | wm ≤ 1.1 × (1 + mirror FLOPs / step FLOPs) | "
        "KP optimizer memory ≤ 1.1 (own state; as listed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in step_results:
        marks = [_mark(r.ratio[v], STEP_TARGETS[v]) for v in STEP_TARGETS]
        marks.append(_mark(r.ratio["wm"], WM_MLP_TARGET) if r.model == "mlp" else "—")
        arithmetic = 1 + unused_first_flop_ratio(r.flops)
        marks.append(f"{_mark(r.ratio['wm'], 1.1 * arithmetic)} (≤ {1.1 * arithmetic:.2f})")
        kp_memory = r.state["kp"][2] / r.state["keras"][2]
        kp_listed = r.state["kp"][3] / r.state["keras"][3]
        marks.append(
            f"{'yes' if kp_memory <= KP_OPTIMIZER_MEMORY_TARGET else 'no'} ({kp_memory:.3f}; "
            f"{kp_listed:.2f})"
        )
        lines.append(
            f"| {r.model} | {'on' if r.jit_compile else 'off'} | " + " | ".join(marks) + " |"
        )
    lines += [
        "",
        "### Memory",
        "",
        "`state`: bytes of the model's variables (W, biases, batch-norm statistics and, for fa, "
        "kp, wm, the feedback kernels B) plus the optimizer's own state. `optimizer`: the "
        "optimizer's own state, i.e. its variables that are not model variables, each counted "
        "once (SGD momentum buffers, iterations, learning rate; for kp the wrapped SGD's plus "
        "KolenPollack's own two scalars). `listed`: the bytes of `optimizer.variables` as the "
        "optimizer lists them, which is what saving the optimizer writes. `peak`: `state` plus "
        "the peak bytes the TensorFlow CPU allocator held above its level before one training "
        "step (+ mirror step for wm): activations, gradients, temporaries. Only for steps "
        "without XLA: an XLA step on CPU shows only its input/output buffers (MLP) or one "
        "fixed 256 MiB block (CNN) there. Ratios are to stock Keras.",
        "",
        "| model | Keras state MiB | Keras optimizer MiB | Keras peak MiB | "
        f"state ratio {'/'.join(VARIANTS[1:])} | optimizer ratio {'/'.join(VARIANTS[1:])} | "
        f"listed ratio kp | peak ratio {'/'.join(VARIANTS[1:])} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in step_results:
        if r.jit_compile:
            continue
        state = {v: r.state[v][0] + r.state[v][2] for v in VARIANTS}
        optimizer = {v: r.state[v][2] for v in VARIANTS}
        listed = r.state["kp"][3] / r.state["keras"][3]
        if all(r.transient[v] is not None for v in VARIANTS):
            peak = {v: state[v] + r.transient[v] for v in VARIANTS}
            peak_cell = f"{_mib(peak['keras']):.1f}"
            peak_ratios = "/".join(f"{peak[v] / peak['keras']:.2f}" for v in VARIANTS[1:])
        else:
            peak_cell, peak_ratios = "n/a", "n/a"
        lines.append(
            f"| {r.model} | {_mib(state['keras']):.1f} | {_mib(optimizer['keras']):.2f} | "
            f"{peak_cell} | "
            + "/".join(f"{state[v] / state['keras']:.2f}" for v in VARIANTS[1:])
            + " | "
            + "/".join(f"{optimizer[v] / optimizer['keras']:.3f}" for v in VARIANTS[1:])
            + f" | {listed:.2f} | {peak_ratios} |"
        )
    lines += [
        "",
        "### Median step time, ms",
        "",
        "| model | jit | Keras | " + " | ".join(VARIANTS[1:]) + " | wm: train part | "
        "wm: mirror part |",
        "|---|---|---|" + "---|" * (len(VARIANTS) + 1),
    ]
    for r in step_results:
        lines.append(
            f"| {r.model} | {'on' if r.jit_compile else 'off'} | "
            + " | ".join(f"{r.median_ms[v]:.2f}" for v in VARIANTS)
            + f" | {r.train_ms_wm:.2f} | {r.mirror_ms:.2f} |"
        )
    if wm_results:
        lines += [
            "",
            "### `wm` on the reference MLP: where the mirror step runs, and what it costs",
            "",
            "Median ms per training step (a call's time / its steps), interleaved, and the ratio "
            "to stock Keras with a 95% bootstrap interval. `wm`: the mirror step inside the "
            "compiled training step (`MirrorCallback(in_train_step=True)`, the default); "
            "`wm/calls`: from the callback between calls (`in_train_step=False`; with several "
            "steps per call its owed steps run as one fused call after the call); "
            "`wm/no-noise`: inside the step with its noise replaced by a constant batch, "
            "i.e. the mirror step's cost without drawing its noise. Target (issue #12): `wm` ≤ "
            f"{WM_MLP_TARGET:.2f} with 1 and 10 steps per call.",
            "",
            "| jit | steps per call | calls | Keras ms | wm | wm/calls | wm/no-noise | "
            f"wm ≤ {WM_MLP_TARGET:.2f} |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for w in wm_results:
            lines.append(
                f"| {'on' if w.jit_compile else 'off'} | {w.steps_per_execution} | {w.calls} | "
                f"{w.median_ms['keras']:.2f} | "
                + " | ".join(_fmt_ratio(w.ratio[v]) for v in WM_VARIANTS[1:])
                + f" | {_mark(w.ratio['wm'], WM_MLP_TARGET)} |"
            )
    lines += [
        "",
        f"### Mirror steps owed after an execution of {FUSED_STEPS} batches",
        "",
        f"`steps_per_execution={FUSED_STEPS}`: `MirrorCallback` owes {FUSED_STEPS} mirror steps "
        f"after each execution. Median ms of running them as {FUSED_STEPS} separate calls "
        "(`mirror(counter)`, as before issue #12) and as one compiled call (`mirror.run(start, "
        f"{FUSED_STEPS})`, what the callback does now; same noise, same B), `wm` model.",
        "",
        f"| model | jit | {FUSED_STEPS} separate calls ms | one fused call ms | fused / separate |",
        "|---|---|---|---|---|",
    ]
    for r in step_results:
        separate, fused = r.fused
        lines.append(
            f"| {r.model} | {'on' if r.jit_compile else 'off'} | {separate:.2f} | {fused:.2f} | "
            f"{fused / separate:.2f} |"
        )
    if epochs:
        lines += [
            "",
            "### Reference MLP on Fashion-MNIST: seconds per epoch",
            "",
            "`model.fit(x, y, batch_size=128, epochs=1)` on the 60,000 training images "
            "(784-500-10, sigmoid, SGD momentum; wm mirrors after every batch), median over "
            "interleaved epochs after a warm-up fit.",
            "",
            "| jit | epochs | Keras | " + " | ".join(VARIANTS[1:]) + " |",
            "|---|---|---|" + "---|" * (len(VARIANTS) - 1),
        ]
        for jit_compile, (seconds, rounds) in epochs.items():
            lines.append(
                f"| {'on' if jit_compile else 'off'} | {rounds} | "
                + " | ".join(
                    f"{seconds[v]:.2f}" + ("" if v == "keras" else
                                           f" ({seconds[v] / seconds['keras']:.2f}x)")
                    for v in VARIANTS
                )
                + " |"
            )
    if mirror_results:
        lines += [
            "",
            "### One mirror step against model size",
            "",
            "Median time of one compiled mirror step (`WeightMirror`, noise batch = training "
            "batch, every layer, jit_compile off) against the median stock Keras training step "
            "of the same model. `FLOP ratio`: the mirror step's matmul/convolution FLOPs over "
            "the training step's (2·Σf / (3·Σf − f₁), f = one layer's forward product): what "
            "the mirror step would cost if only the linear algebra counted. `noise`: Gaussian "
            "samples one mirror step draws (a batch of every layer's input shape) and what "
            "drawing them alone takes with `tf.random.stateless_normal`. `every ≥`: the "
            "smallest `MirrorCallback(every=...)` for which the mirror adds ≤ 30% to the step. "
            "`without layer 1`: the mirror step leaving out the first layer, whose B would only "
            "carry the gradient with respect to the model's input, which training never "
            "computes (`WeightMirror(layers[1:])`).",
            "",
            "| model | batch | parameters | Keras step ms | mirror step ms | mirror / step | "
            "FLOP ratio | noise samples | noise ms | every ≥ | without layer 1: ms | "
            "/ step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in mirror_results:
            lines.append(
                f"| {m.description} | {m.batch_size} | {m.params:,} | {m.stock_ms:.2f} | "
                f"{m.mirror_ms:.2f} | {m.mirror_ms / m.stock_ms:.2f} | {m.flop_ratio:.2f} | "
                f"{m.noise_samples:,} | {m.noise_ms:.2f} | "
                f"{math.ceil(m.mirror_ms / (0.3 * m.stock_ms))} | "
                f"{m.mirror_skip_first_ms:.2f} | {m.mirror_skip_first_ms / m.stock_ms:.2f} |"
            )
    return "\n".join(lines) + "\n"


def write_markdown(path, text):
    """Replaces the marked tables of `path` with `text` (creating the file if needed)."""
    block = f"{BEGIN_MARK}\n{text}{END_MARK}\n"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        if BEGIN_MARK in old and END_MARK in old:
            pattern = re.escape(BEGIN_MARK) + r".*?" + re.escape(END_MARK) + r"\n?"
            new = re.sub(pattern, lambda _: block, old, count=1, flags=re.S)
        else:
            new = old.rstrip("\n") + "\n\n" + block
    else:
        new = "# keras_wt benchmarks\n\n" + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

QUICK = dict(
    runs=[("mlp", False), ("mlp", True), ("cnn", False), ("resnet18", False)],
    warmup=2,
    steps={"mlp": 60, "cnn": 15, "resnet18": 10},
    mirror_widths=(250, 1000, 4000),
    mirror_rounds={"mlp": 15, "cnn": 6, "resnet18": 4},
    epoch_jit=(False,),
    epoch_rounds=1,
    wm_jit=(False, True),
    wm_calls={1: 150, 10: 20},
)
FULL = dict(
    runs=[
        ("mlp", False), ("mlp", True), ("cnn", False), ("cnn", True),
        ("resnet18", False), ("resnet18", True),
    ],
    warmup=5,
    steps={"mlp": 400, "cnn": 60, "resnet18": 50},
    mirror_widths=(125, 250, 500, 1000, 2000, 4000, 8000),
    mirror_rounds={"mlp": 50, "cnn": 20, "resnet18": 15},
    epoch_jit=(False, True),
    epoch_rounds=5,
    wm_jit=(False, True),
    wm_calls={1: 600, 10: 80},
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps, jit_compile on for the MLP only (< 5 min, 2 cores)")
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn", "resnet18"),
                        help="only these models in the step-time table")
    parser.add_argument("--jit", choices=("off", "on", "both"),
                        help="only these jit_compile settings in the step-time table")
    parser.add_argument("--steps", type=int, help="timed steps per version (all models)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per version")
    parser.add_argument("--no-epochs", action="store_true", help="skip the Fashion-MNIST epochs")
    parser.add_argument("--no-mirror-sweep", action="store_true",
                        help="skip the mirror step against model size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    parser.add_argument("--write", metavar="PATH",
                        help="write the tables into this markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--raw", metavar="PATH",
                        help="also write every measurement (per-step times included) as JSON")
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = dict(QUICK if args.quick else FULL)
    runs = plan["runs"]
    if args.models:
        runs = [(m, j) for m, j in runs if m in args.models]
    if args.jit:
        wanted = {"off": (False,), "on": (True,), "both": (False, True)}[args.jit]
        runs = [(m, j) for m, j in runs if j in wanted] or [
            (m, j) for m in dict.fromkeys(m for m, _ in runs) for j in wanted
        ]
    warmup = args.warmup if args.warmup is not None else plan["warmup"]
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    load_start = os.getloadavg()

    specs = model_specs()
    mirror_rounds = 0 if args.no_mirror_sweep else plan["mirror_rounds"]
    step_results = []
    for name, jit_compile in runs:
        steps = args.steps or plan["steps"][name]
        # The MLP's mirror cost is measured by the width sweep below.
        rounds = 0 if not mirror_rounds or name == "mlp" else mirror_rounds[name]
        step_results.append(
            step_benchmark(specs[name], jit_compile, warmup, steps, rng, rounds)
        )

    mirror_results = []
    if not args.no_mirror_sweep:
        logger.info(
            "mirror step against model size (%.0fs so far)", time.perf_counter() - started
        )
        mirror_results = mirror_sweep(
            plan["mirror_widths"], warmup, plan["mirror_rounds"]["mlp"], rng
        )
        mirror_results += [r.mirror for r in step_results if r.mirror and r.model != "mlp"]

    wm_results = []
    if not args.models or "mlp" in args.models:
        for jit_compile in plan["wm_jit"]:
            for steps_per_execution, calls in plan["wm_calls"].items():
                wm_results.append(wm_mlp_benchmark(jit_compile, steps_per_execution, calls, rng))

    epochs = {}
    if not args.no_epochs:
        for jit_compile in plan["epoch_jit"]:
            logger.info("Fashion-MNIST epochs, jit_compile=%s (%.0fs so far)", jit_compile,
                        time.perf_counter() - started)
            seconds, _ = epoch_benchmark(jit_compile, plan["epoch_rounds"], rng)
            epochs[jit_compile] = (seconds, plan["epoch_rounds"])

    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()
    command = "python benchmarks/step_time.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    header = "\n".join(
        [
            f"Command: `{command.strip()}`  ",
            f"Machine: {machine_description()}  ",
            f"Run: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
            f"{elapsed / 60:.1f} min; 1-minute load average {load_start[0]:.1f} at the start, "
            f"{load_end[0]:.1f} at the end ({os.cpu_count()} cores; a load above the core "
            "count means other processes shared the machine)  ",
            f"Process peak RSS (whole run, all models at once): "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB  ",
            f"Optimizer: SGD(learning_rate={LEARNING_RATE}, momentum={MOMENTUM}, "
            f"weight_decay={WEIGHT_DECAY}); kp: KolenPollack(SGD({LEARNING_RATE}, "
            f"momentum={MOMENTUM}), weight_decay={WEIGHT_DECAY}); wm: MirrorCallback(every=1, "
            f"steps=1, batch_size=<training batch>, jit_compile=<as the model>, noise "
            f"{keras_wt.mirror.MirrorConfig(**MIRROR).noise_distribution}; "
            f"in_train_step=True, False for wm/calls).",
        ]
    )
    text = render(step_results, mirror_results, epochs, header, wm_results)
    logger.info("\n%s", text)
    if args.write:
        write_markdown(args.write, text)
        logger.info("wrote %s", args.write)
    if args.raw:
        import json

        with open(args.raw, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "command": command,
                    "steps": [dataclasses.asdict(r) for r in step_results],
                    "mirror": [dataclasses.asdict(m) for m in mirror_results],
                    "epochs": {str(k): v for k, v in epochs.items()},
                    "wm_mlp": [dataclasses.asdict(w) for w in wm_results],
                },
                f,
                default=str,
            )
        logger.info("wrote %s", args.raw)


if __name__ == "__main__":
    main()
