"""Weight mirror: feedback kernels that learn from noise (Akrout et al. 2019, DESIGN.md §2).

In mirror mode each `wm` layer is driven by its own zero-mean noise `x` (a batch of `n` samples
of the layer's real input shape, variance `σ²`) and produces its linear output `y = f_W(x)` (no
bias, no activation). The mirror update is

    ΔB = η · ∇_W(½‖f_W(x)‖²) ⊘ (n·C) − η·λ·B

the weight-gradient of the layer's own linear op, so one rule serves Dense and every
convolution: for Dense it is `η·xᵀ(xW)/n ≈ η·σ²·W`.

**Exact fixed point with any padding.** `C` (`link_counts`, W's shape) counts, for each kernel
entry, the (input element, output element) pairs it links on one sample where the input is real
rather than padding: 1 for Dense on vectors, the output's spatial size for a "valid"
convolution, fewer for the border taps of a "same", strided or dilated one. Since the noise is
white, `E[∇_W(½‖f_W(x)‖²)] = n·σ²·C ⊙ W` for any op in which each (input element, output element)
pair is linked by at most one kernel entry with coefficient 1 — matmuls, einsums and every
convolution (padding, stride, dilation, groups, depthwise, transposed) — so dividing by `C`
makes `E[ΔB] = η·(σ²·W − λ·B)` and `B → (σ²/λ)·W` exactly, with one mirror rate for every layer
type. `C = ∇_W Σ f_W(1)` (a sample of ones) is computed once per layer from `layer.linear`, with
no code per layer type; an entry that never meets real input (`C = 0`, only when a dilated
kernel is wider than twice its input) has no gradient, its `B` decays to 0, and it carries no
error either.

**Finite noise batches.** With `W` frozen the fixed point is a stationary distribution around
`(σ²/λ)·W`: every step adds fresh sampling noise, which the decay forgets at rate `ηλ`. Summing
the geometric series of the noise's variance gives the residual angle between `B` and `W`

    tan²θ ≈ η·λ·m / ((2 − η·λ)·n)       (≈ d_in·η·λ / (2n) for Dense and η·λ ≪ 1)

with `m = (d_in + κ − 2) / c` (`mirror_fan_in`), `κ = E[x⁴]/σ⁴` the noise's fourth moment
(normal 3, uniform 1.8, Rademacher 1): `d_in` the number of kernel entries feeding one output
element (Dense: `in`; convolution: `k1·…·kn·c_in/groups`), `c` the number of positions each kernel
entry is averaged over (Dense: 1; "valid" convolution: the output's spatial size). The sample
estimate `(1/n)·Σ x xᵀW` of `σ²·W` has per-sample variance `σ⁴·((κ − 2)·W_ij² + ‖W_:j‖²)` per
entry, `σ⁴·(d_in + κ − 2)·‖W‖²` in all; `"auto"` sizes with the leading order `d_in / c`.
Wide Dense layers therefore need
much bigger noise batches than convolutions, which average over many positions; `batch_size`
may be set per layer, or `"auto"` to size each layer's `n` for a target angle (`auto_batch_size`).
With `λ = 0` there is no fixed point (`B` grows like the step count and its angle shrinks like
`1/√(steps·n)`), so `"auto"` needs `λ > 0`.

Noise comes from a stateless generator seeded by `(seed, layer, counter, replica)`, so a run
resumed from a checkpoint draws exactly the noise the uninterrupted run would have drawn.
`mirror.run(start, count)` runs the `count` mirror steps of counters `start, start + 1, …` as
one compiled call (a loop inside one `tf.function`, the counter a tensor): exactly the noise and
updates of `count` calls of `mirror(counter)`. The counter may be a tensor, so a mirror step can
run inside a user's own `tf.function` (`mirror(optimizer.iterations)`).

A `wm` layer whose `B` no gradient uses (`feedback_used=False`, `keras_wt.unused_feedback`) has no
`B` and is not mirrored; the other layers keep the noise they would draw with it mirrored (a
layer's noise is seeded by its place among all the `wm` layers).
Under a `tf.distribute` strategy every replica draws `n / replicas` of each layer's noise
samples (`n` rounded up to a multiple of the replicas), the weight-gradients are summed across
replicas, and every replica applies the same update: all replicas keep the same `B`.
"""

import collections.abc
import dataclasses
import logging
import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_wt import layers as layers_lib
from keras_wt._distribute import assign_on_every_replica

NOISE_DISTRIBUTIONS = ("normal", "uniform", "rademacher")
# κ = E[x⁴]/σ⁴ of each noise distribution (enters the residual-angle law: `mirror_fan_in`).
NOISE_KURTOSIS = {"normal": 3.0, "uniform": 1.8, "rademacher": 1.0}
AUTO = "auto"
# Philox, named explicitly: XLA's default choice on CPU (ThreeFry) draws ~30x slower.
_RNG = "philox"
logger = logging.getLogger("keras_wt")


def _link_tensors(layer):
    """`(C, V)` of `layer`'s linear op on one sample, both of the kernel's shape.

    With `F = f_1(1)` (ones as input and kernel: each output element's fan-in of real input),
    `C = ∇_W Σ f_W(1)` counts the pairs each kernel entry links on real input and
    `V = ∇_W Σ F ⊙ f_W(1)` sums `F` over those pairs. Both depend only on shapes and padding.
    """
    shape = (1,) + layer.mirror_input_shape
    kernel = tf.ones(tuple(layer.kernel.shape), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(kernel)
        fan_in = layer.linear(tf.ones(shape, tf.float32), kernel)
    counts = tape.gradient(fan_in, kernel)
    weighted = tape.gradient(fan_in, kernel, output_gradients=tf.stop_gradient(fan_in))
    del tape
    return counts, weighted


def link_counts(layer):
    """`C`: for each entry of `layer`'s kernel, the number of (input, output) element pairs it
    links on one sample where the input is real, not padding (a NumPy array of W's shape).

    It is `∇_W Σ f_W(1)`, the weight-gradient of the layer's linear op on a sample of ones: all
    ones for Dense on vectors, the output's spatial size for a "valid" convolution, fewer at the
    border taps of a padded one.
    """
    return _link_tensors(layer)[0].numpy()


def mirror_fan_in(layer, noise_distribution=None):
    """`m` of the residual-angle law (`residual_angle`) for `layer`: `d_in / c` to leading order,
    `d_in + κ − 2` for Dense with noise `noise_distribution` (`κ = E[x⁴]/σ⁴`, `NOISE_KURTOSIS`).

    In general `m = mean_k (V_k + (κ − 2)·C_k) / C_k²` over the kernel entries `k` that meet
    real input (see `_link_tensors`): each entry's mirror step averages `C_k` products
    `x_i·y_o`, and the variance of each product is `σ⁴` times the fan-in `F_o` of its output
    plus `(κ − 2)` for the product's own term `x_i²·W_k` (for weights of equal magnitude). It is
    `d_in + κ − 2` for Dense and `(d_in + κ − 2) / P` for a "valid" convolution with `P` output
    positions; padding makes the border taps' share larger. `noise_distribution=None` leaves
    out the `κ − 2` term (`m = mean_k V_k / C_k²`, the large-`d_in` form, as before `κ`).
    """
    counts, weighted = (t.numpy().astype(np.float64) for t in _link_tensors(layer))
    live = counts > 0
    excess = 0.0 if noise_distribution is None else noise_kurtosis(noise_distribution) - 2.0
    return float(np.mean((weighted[live] + excess * counts[live]) / counts[live] ** 2))


def noise_kurtosis(noise_distribution):
    """`κ = E[x⁴]/σ⁴` of `noise_distribution`: 3 (normal), 1.8 (uniform), 1 (Rademacher)."""
    if noise_distribution not in NOISE_KURTOSIS:
        raise ValueError(
            f"noise_distribution={noise_distribution!r} is not one of {NOISE_DISTRIBUTIONS}"
        )
    return NOISE_KURTOSIS[noise_distribution]


def residual_angle(fan_in, batch_size, learning_rate, decay):
    """Degrees: the expected angle between `B` and a frozen `W` at the mirror's fixed point,
    `atan √(η·λ·m / ((2 − η·λ)·n))` for `m = fan_in` (`mirror_fan_in`) and `n = batch_size`."""
    _check_fixed_point(learning_rate, decay)
    rate = learning_rate * decay
    return math.degrees(math.atan(math.sqrt(rate * fan_in / ((2.0 - rate) * batch_size))))


def auto_batch_size(fan_in, learning_rate, decay, target_angle, max_batch_size):
    """The smallest noise batch `n` whose `residual_angle` is at most `target_angle` degrees:
    `n = ⌈η·λ·m / ((2 − η·λ)·tan²θ)⌉`, at least 1 and at most `max_batch_size`."""
    _check_fixed_point(learning_rate, decay)
    if not 0 < target_angle < 90 or max_batch_size < 1:
        raise ValueError(
            f"target_angle={target_angle} must be in (0, 90) degrees and "
            f"max_batch_size={max_batch_size} >= 1."
        )
    rate = learning_rate * decay
    tan2 = math.tan(math.radians(target_angle)) ** 2
    needed = math.ceil(rate * fan_in / ((2.0 - rate) * tan2) * (1 - 1e-12))
    return int(min(max(needed, 1), max_batch_size))


def _check_fixed_point(learning_rate, decay):
    if decay <= 0:
        raise ValueError(
            f"The mirror has a residual angle only with decay > 0 (got decay={decay}): with "
            "decay=0 there is no fixed point, B grows with the step count and its angle to W "
            "shrinks like 1/sqrt(steps * batch_size). Give decay > 0, or an explicit "
            "batch_size instead of 'auto'."
        )
    if not 0 <= learning_rate * decay < 2:
        raise ValueError(
            f"learning_rate * decay = {learning_rate * decay} must be in [0, 2) for the mirror "
            "to converge."
        )


def check_batch_size(batch_size):
    """Returns `batch_size` (ints as Python ints, a mapping as a dict) if it is a positive int,
    `"auto"`, a mapping from layer names to positive ints, or a callable; else raises a
    `ValueError`."""
    if isinstance(batch_size, str):
        if batch_size != AUTO:
            raise ValueError(f"batch_size={batch_size!r} is not an int, a dict, a callable or 'auto'")
        return batch_size
    if isinstance(batch_size, collections.abc.Mapping):
        return {name: _check_size(n, f"batch_size[{name!r}]") for name, n in batch_size.items()}
    if callable(batch_size):
        return batch_size
    return _check_size(batch_size, "batch_size")


def _check_size(n, what):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{what}={n!r} must be a positive int")
    return int(n)


@dataclasses.dataclass(frozen=True)
class MirrorConfig:
    """Every setting of the weight mirror, in keras_wt's units (`η`, `σ`, `λ`): the one place
    where each is defined, defaulted and checked. `WeightMirror` and `MirrorCallback` take one
    (`config=`), or keyword arguments of the same names, which make one.

    The defaults are the library's (no decay, a noise batch of 128); the trainer's recipe for the
    convnets and ImageNet passes its own values (`keras_wt.app.config.RECIPE_MIRROR`), and the
    reference MLP's come from the published units (`keras_wt.app.published`).

    Args:
        learning_rate: `η`, the mirror learning rate (>= 0; required).
        noise_std: `σ`, the standard deviation of the noise (> 0; required).
        decay: `λ`, the mirror decay of `B` (>= 0; `B → (σ²/λ)·W` when `λ > 0`).
        every: mirror after every `every` training batches (`MirrorCallback`).
        steps: mirror steps each time (`MirrorCallback`).
        batch_size: `n`, noise samples per layer and step: an int, a `{key: n}` dict, a
            callable `layer -> n`, or `"auto"` (needs `decay > 0` and `η·λ < 2`): see
            `WeightMirror`.
        warmup_steps: mirror steps before the first training step (`MirrorCallback`).
        noise_distribution: `"normal"`, `"uniform"` or `"rademacher"`, all of variance `σ²`.
        seed: integer seed of the noise.
        target_angle: for `batch_size="auto"`: the residual angle in degrees, in (0, 90).
        max_batch_size: for `batch_size="auto"`: the cap on a layer's noise batch (>= 1).
        in_train_step: run the mirror steps inside the compiled training step
            (`MirrorCallback`).

    Raises:
        ValueError: a setting out of range, named with the value given.
    """

    learning_rate: float
    noise_std: float
    decay: float = 0.0
    every: int = 1
    steps: int = 1
    batch_size: object = 128
    warmup_steps: int = 0
    noise_distribution: str = "normal"
    seed: int = 0
    target_angle: float = 5.0
    max_batch_size: int = 4096
    in_train_step: bool = True

    def __post_init__(self):
        def setting(name, value):  # frozen: normalised values are set once, here
            object.__setattr__(self, name, value)

        if self.noise_distribution not in NOISE_DISTRIBUTIONS:
            raise ValueError(
                f"noise_distribution={self.noise_distribution!r} is not one of "
                f"{NOISE_DISTRIBUTIONS}"
            )
        for name, low, strict in (("learning_rate", 0, False), ("noise_std", 0, True),
                                  ("decay", 0, False)):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value)
                    and (value > low if strict else value >= low)):
                raise ValueError(
                    f"{name}={value!r} must be a finite number {'>' if strict else '>='} {low}"
                )
            setting(name, float(value))
        for name, low in (("every", 1), ("steps", 1), ("warmup_steps", 0),
                          ("max_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
            setting(name, int(value))
        if not (isinstance(self.target_angle, numbers.Real) and 0 < self.target_angle < 90):
            raise ValueError(f"target_angle={self.target_angle!r} must be in (0, 90) degrees")
        setting("target_angle", float(self.target_angle))
        setting("seed", int(self.seed))
        setting("in_train_step", bool(self.in_train_step))
        setting("batch_size", check_batch_size(self.batch_size))
        if self.batch_size == AUTO:
            _check_fixed_point(self.learning_rate, self.decay)

    @classmethod
    def of(cls, config=None, **settings):
        """`config` (default: the defaults) with `settings` replaced: how `WeightMirror` and
        `MirrorCallback` turn their keyword arguments into one config. A setting given as `None`
        is not given."""
        settings = {k: v for k, v in settings.items() if v is not None}
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"{unknown} are not mirror settings: they are {sorted(names)}")
        if config is None:
            missing = [name for name in ("learning_rate", "noise_std") if name not in settings]
            if missing:
                raise ValueError(
                    f"The weight mirror needs {' and '.join(missing)} (its η and σ): give them, "
                    "or config=MirrorConfig(...)."
                )
            return cls(**settings)
        if not isinstance(config, cls):
            raise ValueError(f"config={config!r} is not a {cls.__name__}")
        return dataclasses.replace(config, **settings) if settings else config

    def get_config(self):
        """The settings as a JSON-able dict (a callable `batch_size` serialized by Keras)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        if isinstance(self.batch_size, collections.abc.Mapping):
            values["batch_size"] = {name: int(n) for name, n in self.batch_size.items()}
        elif callable(self.batch_size):
            values["batch_size"] = keras.saving.serialize_keras_object(self.batch_size)
        return values

    @classmethod
    def from_config(cls, values):
        """The inverse of `get_config`."""
        values = dict(values)
        batch_size = values.get("batch_size")
        # A serialized callable, not a {layer_name: int} map (whose values are all ints).
        if isinstance(batch_size, dict) and isinstance(batch_size.get("class_name"), str):
            values["batch_size"] = keras.saving.deserialize_keras_object(batch_size)
        return cls(**values)


class MirrorSettings:
    """Reads the settings of `self.config` (a `MirrorConfig`) as attributes: `mirror.decay` is
    `mirror.config.decay`. They are set once, through the constructor."""

    def __getattr__(self, name):
        if name in _MIRROR_SETTINGS and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in _MIRROR_SETTINGS:
            raise AttributeError(
                f"{name} is a setting of the frozen MirrorConfig `config`: give it to the "
                "constructor"
            )
        super().__setattr__(name, value)


_MIRROR_SETTINGS = frozenset(field.name for field in dataclasses.fields(MirrorConfig))


def mirror_gradient(layer, x, counts=None):
    """`∇_W(½‖f_W(x)‖²) ⊘ C` of `layer`'s linear op at its current kernel, for noise `x`.

    `C` (`counts`, default `link_counts(layer)` with zeros raised to 1; anything that broadcasts
    to W's shape) counts the real-input positions of each kernel entry, so the step is an
    average over every (sample, position) pair that entry actually sees, and `B → (σ²/λ)·W`
    exactly for Dense and every convolution, with any padding.
    """
    kernel = tf.convert_to_tensor(layer.kernel.value)
    if counts is None:
        counts = tf.maximum(_link_tensors(layer)[0], 1.0)
    with tf.GradientTape() as tape:
        tape.watch(kernel)
        y = layer.linear(tf.cast(x, kernel.dtype), kernel)
        energy = 0.5 * tf.reduce_sum(tf.square(y))
    return tape.gradient(energy, kernel) / tf.cast(counts, kernel.dtype)


def _compact(array):
    """`array` reduced to length 1 along every axis on which it is constant: it broadcasts back
    to its shape, and the compiled step embeds `(k1, …, kn, 1, 1)` counts, not a kernel's worth."""
    for axis in range(array.ndim):
        first = np.take(array, [0], axis=axis)
        if np.array_equal(array, np.broadcast_to(first, array.shape)):
            array = first
    return array


def wm_layers(model):
    """The layers of `model` whose feedback kernel learns by mirroring (those without a stored
    `B`, `feedback_used=False`, included: they keep their place in the noise seeds)."""
    return list(_wm_keys(model))


def _wm_keys(model):
    """`{layer: key}` of `wm_layers(model)` (keys as `keras_wt.layers.feedback_keys`)."""
    return {
        layer: key
        for layer, key in layers_lib.feedback_keys(model).items()
        if layer.feedback_learning == "mirror"
    }


class WeightMirror(MirrorSettings):
    """Compiled mirror steps for a list of `wm` layers (built layers with known input shapes).

    Each layer draws noise of its `mirror_input_shape`: its input shape, with 1 for an unknown
    length along which its linear op works slice by slice (the sequence axis of a `Dense` or
    `EinsumDense` projection), which gives the same mirror step in expectation whatever the length.

    The settings are a `MirrorConfig` (`config`), or its fields as keyword arguments
    (`WeightMirror(model, learning_rate=0.1, noise_std=1.0, decay=0.5)`; `learning_rate` and
    `noise_std` may be given by position), which replace those of `config` when both are given;
    they read as attributes (`mirror.decay`). Of them the mirror uses:

    * `learning_rate` `η`, `noise_std` `σ`, `decay` `λ`, `seed`;
    * `batch_size`, `n`, noise samples per layer and step: an int for every layer; a dict
      `{key: n}` naming every `wm` layer (keys as `keras_wt.layers.feedback_keys`: the layer's
      name unless another feedback layer has it; for a list of layers, their names); a callable
      `layer -> n`; or `"auto"`: each layer's `auto_batch_size` for `target_angle` (needs
      `decay > 0`), at most `max_batch_size` (before rounding up to the replicas; a layer that
      needs more is capped, with a warning giving the angle it will reach). Each layer's `n` is
      then rounded up to a multiple of the strategy's replicas, which draw `n / replicas`
      samples each; `batch_sizes` holds the results;
    * `noise_distribution`: `"normal"` (`N(0, σ²)`), `"uniform"` (`U(−σ√3, σ√3)`, the same
      variance; the published code's noise in `[−a, a)` is `σ = a/√3`) or `"rademacher"` (`±σ`
      with equal probability, the same variance, drawn from one random bit per sample). Same
      mean step; the residual angle differs through the fourth moment `κ` (`mirror_fan_in`), and
      `"auto"` sizes for it.

    Args:
        layers: the `wm` feedback layers, or a model (its `wm` layers are used).
        learning_rate, noise_std: `η` and `σ` (or in `config`).
        config: a `MirrorConfig`.
        jit_compile: compile the per-replica noise and weight-gradients with XLA.
        strategy: the `tf.distribute` strategy of the model's variables (default: current).
        **settings: other fields of `MirrorConfig`.
    """

    def __init__(self, layers, learning_rate=None, noise_std=None, *, config=None,
                 jit_compile=False, strategy=None, **settings):
        self.config = MirrorConfig.of(config, learning_rate=learning_rate, noise_std=noise_std,
                                      **settings)
        if isinstance(layers, (list, tuple)):
            keys = {layer: layer.name for layer in layers}
        else:
            keys = _wm_keys(layers)
            layers = list(keys)
        if not layers:
            raise ValueError(
                "Weight mirror needs at least one layer with feedback='wm'; found none."
            )
        for layer in layers:
            if layer.feedback_learning != "mirror":
                raise ValueError(f"Layer {layer.name!r} has feedback={layer.feedback!r}, not 'wm'.")
        # A layer's noise is seeded by its place in `layers`; those without a `B` (no gradient
        # uses it) are not mirrored, and the others keep their places.
        self._seed_indices = [i for i, layer in enumerate(layers) if layer.feedback_used]
        self._unused_names = {keys[layer] for layer in layers if not layer.feedback_used}
        layers = [layers[i] for i in self._seed_indices]
        self.keys = [keys[layer] for layer in layers]
        # Raises where a layer is not built, or an unknown input length meets its kernel.
        self._input_shapes = [layer.mirror_input_shape for layer in layers]
        self.layers = list(layers)
        for layer in self.layers:  # read by FeedbackLayer._check_feedback_learner
            layer.feedback_learner = self
        self.jit_compile = bool(jit_compile)
        self.strategy = strategy or tf.distribute.get_strategy()
        # Counts and fan-ins depend only on shapes: computed once, eagerly.
        statistics = [_link_tensors(layer) for layer in self.layers]
        self._counts = [_compact(np.maximum(c.numpy(), 1.0)) for c, _ in statistics]
        self.batch_sizes = self._resolve_batch_sizes()
        replicas = self.strategy.num_replicas_in_sync
        self._local_batches = [n // replicas for n in self.batch_sizes]
        self._local_gradients = tf.function(self._gradients, jit_compile=jit_compile)
        self._compiled_noise = tf.function(self._noise, jit_compile=jit_compile)
        self._run = tf.function(self._distributed_steps)
        self._run_one = tf.function(self._distributed_step)  # no loop: one step, less overhead

    def _resolve_batch_sizes(self):
        spec = self.batch_size
        names = self.keys
        if isinstance(spec, str):  # "auto"
            sizes = []
            for layer, key in zip(self.layers, names):
                # The leading-order m (no κ − 2 term, for every distribution): the published
                # recipes' noise batches stay as they were; the exact angle differs from the
                # target by a factor 1 + (κ − 2)/(2·d_in) or less (`expected_angles`).
                fan_in = mirror_fan_in(layer)
                n = auto_batch_size(fan_in, self.learning_rate, self.decay, self.target_angle,
                                    self.max_batch_size)
                angle = residual_angle(fan_in, n, self.learning_rate, self.decay)
                if angle > self.target_angle * (1 + 1e-9):
                    logger.warning(
                        "Mirror noise batch of layer %r capped at max_batch_size=%d: its "
                        "residual angle will be about %.1f degrees, not target_angle=%.1f.",
                        key, n, angle, self.target_angle,
                    )
                sizes.append(n)
        elif isinstance(spec, collections.abc.Mapping):
            missing = [name for name in names if name not in spec]
            unknown = [name for name in spec if name not in set(names) | self._unused_names]
            if missing or unknown:
                raise ValueError(
                    f"batch_size must name every wm layer {names} exactly; missing {missing}, "
                    f"not wm layers {unknown}."
                )
            sizes = [spec[name] for name in names]
        elif callable(spec):
            sizes = [
                _check_size(spec(layer), f"batch_size({key!r})")
                for layer, key in zip(self.layers, names)
            ]
        else:
            sizes = [spec] * len(self.layers)
        replicas = self.strategy.num_replicas_in_sync
        sizes = tuple(int(math.ceil(n / replicas)) * replicas for n in sizes)
        logger.info("Mirror noise batches: %s", dict(zip(names, sizes)))
        return sizes

    def expected_angles(self):
        """`{key: degrees}`: the `residual_angle` of each layer at its noise batch (the angle
        `B` settles at if `W` stood still; needs `decay > 0`), with the noise's `κ`."""
        return {
            key: residual_angle(mirror_fan_in(layer, self.noise_distribution), n,
                                self.learning_rate, self.decay)
            for key, layer, n in zip(self.keys, self.layers, self.batch_sizes)
        }

    def noise(self, layer_index, counter, replica=0):
        """The noise batch fed to layer `layer_index` at mirror step `counter` on `replica`
        (drawn exactly as the mirror step draws it: XLA's generator differs from TF's)."""
        return self._compiled_noise(layer_index, tf.constant(counter, tf.int64), tf.constant(replica, tf.int32))

    def _noise(self, layer_index, counter, replica):
        shape = (self._local_batches[layer_index],) + self._input_shapes[layer_index]
        seed = tf.stack(
            [
                tf.constant(self.seed, tf.int64) * 7919 + self._seed_indices[layer_index],
                tf.cast(counter, tf.int64),
            ]
        )
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int64))
        return draw_noise(shape, seed, self.noise_distribution, self.noise_std)

    def _gradients(self, counter, replica):
        return [
            mirror_gradient(layer, self._noise(i, counter, replica), counts)
            for i, (layer, counts) in enumerate(zip(self.layers, self._counts))
        ]

    def _replica_step(self, counter, values=None):
        """One mirror step in a replica context; `values`: `B`'s current value per layer where
        the caller knows it (`None`: `_current_value`). Returns the new values."""
        context = tf.distribute.get_replica_context()
        gradients = self._local_gradients(counter, context.replica_id_in_sync_group)
        gradients = context.all_reduce("sum", gradients)
        feedbacks = [layer.feedback_kernel for layer in self.layers]
        values = values or [None] * len(self.layers)
        updated = []
        for layer, gradient, n, b in zip(self.layers, gradients, self.batch_sizes, values):
            if b is None:
                b = _current_value(layer)
            updated.append(b + self.learning_rate * (gradient / n - self.decay * b))
        assign_on_every_replica(self.strategy, feedbacks, updated)
        for layer, value in zip(self.layers, updated):
            layer.set_feedback_value(value)
        return updated

    def _distributed_step(self, counter, values=None):
        if values is None:
            self.strategy.run(self._replica_step, args=(counter,))
            return None
        # Values known in the caller's graph: called from its replica context (one replica).
        return self._replica_step(counter, values)

    def _distributed_steps(self, start, count, stride, values=None):
        # One compiled call for `count` steps; the loop's counter is a tensor, so the function
        # is traced once for every number of steps.
        if values is None:
            for i in tf.range(count):
                self.strategy.run(self._replica_step, args=(start + i * stride,))
            return None
        values = [_current_value(layer) if v is None else v for layer, v in zip(self.layers, values)]
        for i in tf.range(count):
            values = self._replica_step(start + i * stride, values)
        return values

    def _caller_values(self):
        """`B`'s values known in the function calling `run` (its forward pass read them, or a
        mirror step there assigned them), per layer (`None`: unknown), or `None` for none.
        Only in the replica context of a single replica, from which the steps run directly."""
        if (not tf.inside_function() or tf.distribute.in_cross_replica_context()
                or self.strategy.num_replicas_in_sync != 1):
            return None
        values = self.known_values()
        return values if any(v is not None for v in values) else None

    def run(self, start, count=1, stride=1):
        """Runs `count` mirror steps, with counters `start, start + stride, …`, as one compiled
        call: exactly the noise and updates of `count` calls of `mirror(counter)`.

        Args:
            start: the first counter: a Python int, or an integer tensor or variable (e.g.
                `optimizer.iterations`) inside or outside a `tf.function`.
            count: the number of steps (an int or an integer tensor; 0 runs none).
            stride: the difference between consecutive counters (an int or a tensor).

        Raises:
            ValueError: `start` is a Python number while a `tf.function` is being traced: it
                would be frozen into the graph, and every call would draw the same noise.
        """
        if not self.layers:
            return
        # Inside the caller's `tf.function`, after its forward pass: the steps start from the
        # tensors that pass read, so they wait for it by data (`_current_value`).
        values = self._caller_values()
        if isinstance(count, int) and count == 1:
            values = self._run_one(_counter(start, "start"), values)
        else:
            values = self._run(
                _counter(start, "start"), _counter(count, "count"), _counter(stride, "stride"),
                values,
            )
        if values is not None:
            for layer, value in zip(self.layers, values):
                layer.set_feedback_value(value)

    def replica_step(self, counter, values=None):
        """Runs one mirror step from inside a replica context: the body of a training step that
        `strategy.run` runs (as `MirrorCallback(in_train_step=True)` does), or outside any
        strategy. The weight-gradients are summed across the replicas, and every replica applies
        the same update; `counter` (an integer tensor, e.g. `optimizer.iterations`) seeds the
        noise exactly as in `run`.

        Each layer's `B` is updated from the tensor that the traced function read it into (its
        forward pass) or assigned it from (a mirror step before), so the update waits for those
        reads by data. `values` (per layer a tensor or `None`; default `known_values()`) gives
        them where that function is not the one being traced, e.g. a `tf.cond` branch.
        Returns the new values of `B`."""
        if not self.layers:
            return []
        return self._replica_step(_counter(counter, "start"), values)

    def known_values(self):
        """Per layer, `B`'s value as a tensor of the function being traced where it has read
        or assigned it, else `None` (see `replica_step`)."""
        return [_known_value(layer) for layer in self.layers]

    def __call__(self, counter):
        """Runs one mirror step on every layer; `counter` (an int, or an integer tensor or
        variable such as `optimizer.iterations`) seeds the noise. Inside a `tf.function` the
        counter must be a tensor (see `run`)."""
        self.run(counter, 1, 1)


def draw_noise(shape, seed, noise_distribution, noise_std):
    """Float32 noise of `shape`, mean 0 and standard deviation `noise_std`, from the stateless
    seed `seed` (two int64s): `"normal"`, `"uniform"` (`U(−σ√3, σ√3)`) or `"rademacher"` (`±σ`,
    the sign of one random int32 per sample: no float transform of the generator's output)."""
    if noise_distribution == "normal":
        return tf.random.stateless_normal(shape, seed, stddev=noise_std, alg=_RNG)
    if noise_distribution == "rademacher":
        bits = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None,
                                           dtype=tf.int32, alg=_RNG)
        return tf.where(bits < 0, -noise_std, noise_std)
    limit = noise_std * math.sqrt(3.0)
    return tf.random.stateless_uniform(shape, seed, minval=-limit, maxval=limit, alg=_RNG)


def _known_value(layer):
    """`B`'s value as a tensor of the function being traced, if that function has read it (the
    forward pass of the training step a mirror step ends) or assigned it (the mirror step
    before); else `None`. Several calls of the layer read the same value: the first is
    returned, with each other read added at weight 0 (exactly the same value), so that what is
    computed from it waits for all of them."""
    values = layer.feedback_values()
    if not values:
        return None
    value = values[0]
    for other in values[1:]:
        value = value + 0.0 * other
    return value


def _current_value(layer):
    """`B`'s value for a mirror step: the tensor the function has read or assigned already
    (`_known_value`), so the new value, and its assignment, wait for every read of `B` by data
    (see `FeedbackLayer.read_feedback_kernel`); else a read of the variable."""
    value = _known_value(layer)
    return tf.convert_to_tensor(layer.feedback_kernel.value) if value is None else value


def _counter(value, name):
    """`value` as an int64 tensor; a Python number inside a function being traced is refused
    (it would be a constant of the graph: the same noise at every call)."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        if tf.inside_function() and name == "start":
            raise ValueError(
                f"The mirror step's counter is the Python number {value!r} inside a tf.function "
                "being traced: it would be frozen into the graph, and every call would draw the "
                "same noise. Pass a tensor that advances, e.g. optimizer.iterations, or call the "
                "mirror outside the tf.function."
            )
        return tf.constant(int(value), tf.int64)
    return tf.cast(tf.convert_to_tensor(value), tf.int64)
