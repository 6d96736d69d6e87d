"""`WeightMirror`: the compiled mirror steps of a model's `wm` layers (`keras_wt.mirror`'s
docstring), and `wm_layers`, which finds them."""

import collections.abc
import logging
import math
import numbers

import numpy as np
from keras import ops

from keras_wt import backend
from keras_wt import layers as layers_lib
from keras_wt import learners
from keras_wt.algorithms import Learning
from keras_wt.mirror.config import (AUTO, WARMUP_LAGS, WARMUP_SLOW_LAGS, MirrorConfig,
                                       MirrorSettings, _check_size)
from keras_wt.mirror.law import (_compact, _link_tensors, auto_batch_size, auto_learning_rate,
                                     cost_cap, mirror_fan_in, mirror_gradient, residual_angle)
from keras_wt.mirror.noise import draw_noise

logger = logging.getLogger("keras_wt")


def wm_layers(model):
    """The layers of `model` whose feedback kernel learns by mirroring (those without a stored
    `B`, `feedback_used=False`, included: they keep their place in the noise seeds)."""
    return list(_wm_keys(model))


def _wm_keys(model):
    """`{layer: key}` of `wm_layers(model)` (keys as `keras_wt.layers.feedback_keys`)."""
    return {
        layer: key
        for layer, key in layers_lib.feedback_keys(model).items()
        if layer.feedback_learning == Learning.MIRROR
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
      `decay > 0`), at most `max_batch_size` and, with `max_cost`, at most the common cap at
      which the batches' mean weighted by each layer's multiply-adds (`costs`) is `max_cost`
      (`cost_cap`: the cheap layers keep what they need, the costly ones share the rest), all
      before rounding up to the replicas. A layer that needs more is capped, and with
      `cap_policy="angle"` keeps `η` and settles at a larger angle (a warning gives it); with
      `cap_policy="rate"` it mirrors at its own smaller rate `η_l` (`auto_learning_rate`),
      which reaches `target_angle` with the capped batch and follows a moving `W` with a longer
      lag `1/(η_l·λ)`. Each layer's `n` is then rounded up to a multiple of the strategy's
      replicas, which draw `n / replicas` samples each; `batch_sizes` holds the results,
      `learning_rates` each layer's `η_l`;
    * `noise_distribution`: `"rademacher"` (the default: `±σ` with equal probability, drawn
      from one random bit per sample), `"normal"` (`N(0, σ²)`, the default before issue #21) or
      `"uniform"` (`U(−σ√3, σ√3)`, the same variance; the published code's noise in `[−a, a)`
      is `σ = a/√3`). Same mean step; the residual angle differs through the fourth moment `κ`
      (`mirror_fan_in`), and `"auto"` sizes for it.

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
            if layer.feedback_learning != Learning.MIRROR:
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
            learners.attach(layer, self)
        self.jit_compile = bool(jit_compile)
        self.strategy = strategy or backend.current_strategy()
        # Counts and fan-ins depend only on shapes: computed once, eagerly.
        statistics = [_link_tensors(layer) for layer in self.layers]
        self._counts = [_compact(np.maximum(ops.convert_to_numpy(c), 1.0)) for c, _ in statistics]
        # Each layer's multiply-adds on one sample: the pairs its kernel entries link.
        self.costs = tuple(float(np.sum(ops.convert_to_numpy(c))) for c, _ in statistics)
        self.batch_sizes, self.learning_rates = self._resolve_batch_sizes()
        replicas = self.strategy.num_replicas_in_sync
        self._local_batches = [n // replicas for n in self.batch_sizes]
        self._local_gradients = backend.function(self._gradients, jit_compile=jit_compile)
        self._compiled_noise = backend.function(self._noise, jit_compile=jit_compile)
        self._run = backend.function(self._distributed_steps)
        self._run_one = backend.function(self._distributed_step)  # no loop: one step, less overhead

    def _resolve_batch_sizes(self):
        spec = self.batch_size
        names = self.keys
        rates = [self.learning_rate] * len(self.layers)
        if isinstance(spec, str):  # "auto"
            # The leading-order m (no κ − 2 term, for every distribution): the published
            # recipes' noise batches stay as they were; the exact angle differs from the
            # target by a factor 1 + (κ − 2)/(2·d_in) or less (`expected_angles`).
            fan_ins = [mirror_fan_in(layer) for layer in self.layers]
            sizes = [auto_batch_size(fan_in, self.learning_rate, self.decay, self.target_angle,
                                     self.max_batch_size) for fan_in in fan_ins]
            caps = [f"max_batch_size={self.max_batch_size}"] * len(sizes)
            if self.max_cost is not None:
                common = cost_cap(sizes, self.costs, self.max_cost)
                caps = [f"{common} (max_cost={self.max_cost:g})" if n > common else cap
                        for n, cap in zip(sizes, caps)]
                sizes = [min(n, common) for n in sizes]
            for i, (fan_in, n, key, cap) in enumerate(zip(fan_ins, sizes, names, caps)):
                angle = residual_angle(fan_in, n, self.learning_rate, self.decay)
                capped = angle > self.target_angle * (1 + 1e-9)
                if capped and self.cap_policy == "rate":
                    rates[i] = auto_learning_rate(fan_in, n, self.decay, self.target_angle)
                    logger.info(
                        "Mirror noise batch of layer %r capped at %s: it mirrors at "
                        "learning_rate %.3g (lag about %d steps) for target_angle=%.1f.",
                        key, cap, rates[i], round(1 / (rates[i] * self.decay)), self.target_angle,
                    )
                elif capped:
                    logger.warning(
                        "Mirror noise batch of layer %r capped at %s: its residual angle will "
                        "be about %.1f degrees, not target_angle=%.1f.",
                        key, cap, angle, self.target_angle,
                    )
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
        return sizes, tuple(rates)

    @property
    def resolved_warmup_steps(self):
        """`warmup_steps`, or for `"auto"` the longer of `WARMUP_LAGS` lags `1/(η·λ)` at the
        mirror's own rate and `WARMUP_SLOW_LAGS` lags of the slowest layer (rounded up)."""
        if self.warmup_steps != AUTO:
            return self.warmup_steps
        lags = max(WARMUP_LAGS / self.learning_rate,
                   WARMUP_SLOW_LAGS / min(self.learning_rates)) / self.decay
        return int(math.ceil(lags * (1 - 1e-12)))

    def expected_angles(self):
        """`{key: degrees}`: the `residual_angle` of each layer at its noise batch (the angle
        `B` settles at if `W` stood still; needs `decay > 0`), with the noise's `κ`."""
        return {
            key: residual_angle(mirror_fan_in(layer, self.noise_distribution), n, rate,
                                self.decay)
            for key, layer, n, rate in zip(self.keys, self.layers, self.batch_sizes,
                                           self.learning_rates)
        }

    def noise(self, layer_index, counter, replica=0):
        """The noise batch fed to layer `layer_index` at mirror step `counter` on `replica`
        (drawn exactly as the mirror step draws it: XLA's generator differs from TF's)."""
        return self._compiled_noise(layer_index, _int(counter, "int64"), _int(replica, "int32"))

    def _noise(self, layer_index, counter, replica):
        shape = (self._local_batches[layer_index],) + self._input_shapes[layer_index]
        seed = ops.stack(
            [
                _int(self.seed, "int64") * 7919 + self._seed_indices[layer_index],
                ops.cast(counter, "int64"),
            ]
        )
        seed = backend.fold_in(seed, ops.cast(replica, "int64"))
        return draw_noise(shape, seed, self.noise_distribution, self.noise_std)

    def _gradients(self, counter, replica):
        return [
            mirror_gradient(layer, self._noise(i, counter, replica), counts)
            for i, (layer, counts) in enumerate(zip(self.layers, self._counts))
        ]

    def _replica_step(self, counter, values=None):
        """One mirror step in a replica context; `values`: `B`'s current value per layer where
        the caller knows it (`None`: `_current_value`). Returns the new values."""
        context = backend.replica_context()
        gradients = self._local_gradients(counter, context.replica_id_in_sync_group)
        gradients = context.all_reduce("sum", gradients)
        feedbacks = [layer.feedback_kernel for layer in self.layers]
        values = values or [None] * len(self.layers)
        updated = []
        for layer, gradient, n, rate, b in zip(self.layers, gradients, self.batch_sizes,
                                               self.learning_rates, values):
            if b is None:
                b = _current_value(layer)
            updated.append(b + rate * (gradient / n - self.decay * b))
        backend.assign_on_every_replica(self.strategy, feedbacks, updated)
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

            def step(i, state):
                self.strategy.run(self._replica_step, args=(start + i * stride,))
                return state

            backend.fori_loop(count, step)
            return None
        values = [_current_value(layer) if v is None else v for layer, v in zip(self.layers, values)]
        return backend.fori_loop(
            count, lambda i, values: self._replica_step(start + i * stride, values), values
        )

    def _caller_values(self):
        """`B`'s values known in the function calling `run` (its forward pass read them, or a
        mirror step there assigned them), per layer (`None`: unknown), or `None` for none.
        Only in the replica context of a single replica, from which the steps run directly."""
        if (not backend.in_graph() or backend.in_cross_replica_context()
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
    return backend.read_value(layer.feedback_kernel.value) if value is None else value


def _counter(value, name):
    """`value` as an int64 tensor; a Python number inside a function being traced is refused
    (it would be a constant of the graph: the same noise at every call)."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        if backend.in_graph() and name == "start":
            raise ValueError(
                f"The mirror step's counter is the Python number {value!r} inside a tf.function "
                "being traced: it would be frozen into the graph, and every call would draw the "
                "same noise. Pass a tensor that advances, e.g. optimizer.iterations, or call the "
                "mirror outside the tf.function."
            )
        return _int(value, "int64")
    return ops.cast(backend.read_value(value), "int64")


def _int(value, dtype):
    """The Python integer `value` as a constant tensor of the integer `dtype`."""
    return ops.convert_to_tensor(np.asarray(int(value), dtype))
