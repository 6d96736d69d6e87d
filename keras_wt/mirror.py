"""Weight mirror: feedback kernels that learn from noise (Akrout et al. 2019, DESIGN.md §2).

In mirror mode each `wm` layer is driven by its own zero-mean noise `x` (a batch of the layer's
real input shape) and produces its linear output `y = f_W(x)` (no bias, no activation). The
mirror update is

    ΔB = η · ∇_W(½‖f_W(x)‖²) / (n·P) − η·λ·B

the weight-gradient of the layer's own linear op, so one rule serves Dense and every
convolution: for Dense it is `η·xᵀ(xW)/n ≈ η·σ²·W`. `n` is the noise batch and `P` the number of
positions at which the op applies its kernel to one sample (1 for Dense, the output's spatial
size for a convolution): the step averages over every (sample, position) pair, so one mirror
learning rate serves every layer type and `B → (σ²/λ)·W` for all of them.

For a convolution with zero padding ("same"), border taps of the kernel see fewer noise
samples than the centre tap, so the fixed point is `W` scaled per tap: close to, not exactly,
parallel to `W` (a few degrees for small maps; "valid" padding has no such effect).

Noise comes from a stateless generator seeded by `(seed, layer, counter, replica)`, so a run
resumed from a checkpoint draws exactly the noise the uninterrupted run would have drawn.
Under a `tf.distribute` strategy every replica draws `n / replicas` noise samples, the
weight-gradients are summed across replicas, and every replica applies the same update: all
replicas keep the same `B`.
"""

import math

import tensorflow as tf

from keras_wt import layers as layers_lib
from keras_wt._distribute import assign_on_every_replica

NOISE_DISTRIBUTIONS = ("normal", "uniform")
# Philox, named explicitly: XLA's default choice on CPU (ThreeFry) draws ~30x slower.
_RNG = "philox"


def mirror_gradient(layer, x):
    """`∇_W(½‖f_W(x)‖²) / P` of `layer`'s linear op at its current kernel, for noise `x`.

    `P` is the number of positions at which the op applies the kernel to each sample (1 for
    Dense on vectors, the output's spatial size for a convolution), so that the step is an
    average over every (sample, position) pair and one mirror learning rate serves Dense and
    convolutions alike: `B → (σ²/λ)·W` for both.
    """
    kernel = tf.convert_to_tensor(layer.kernel.value)
    with tf.GradientTape() as tape:
        tape.watch(kernel)
        y = layer.linear(tf.cast(x, kernel.dtype), kernel)
        energy = 0.5 * tf.reduce_sum(tf.square(y))
    positions = y.shape.num_elements() // (y.shape[0] * kernel.shape[-1])
    return tape.gradient(energy, kernel) / positions


def wm_layers(model):
    """The layers of `model` whose feedback kernel learns by mirroring."""
    return [
        layer
        for layer in layers_lib.feedback_layers(model)
        if layer.algorithm.learns_feedback == "mirror"
    ]


class WeightMirror:
    """Compiled mirror steps for a list of `wm` layers (built layers with known input shapes).

    Args:
        layers: the `wm` feedback layers, or a model (its `wm` layers are used).
        learning_rate: `η`, the mirror learning rate.
        noise_std: `σ`, the standard deviation of the noise.
        decay: `λ`, the mirror weight decay of `B`.
        batch_size: `n`, noise samples per layer and step (split over replicas).
        noise_distribution: `"normal"` (`N(0, σ²)`) or `"uniform"` (`U(−σ√3, σ√3)`, the same
            variance; the published code's noise in `[−a, a)` is `σ = a/√3`).
        seed: integer seed of the noise.
        jit_compile: compile the per-replica noise and weight-gradients with XLA.
        strategy: the `tf.distribute` strategy of the model's variables (default: current).
    """

    def __init__(
        self,
        layers,
        learning_rate,
        noise_std,
        decay=0.0,
        batch_size=128,
        noise_distribution="normal",
        seed=0,
        jit_compile=False,
        strategy=None,
    ):
        if not isinstance(layers, (list, tuple)):
            layers = wm_layers(layers)
        if not layers:
            raise ValueError(
                "Weight mirror needs at least one layer with feedback='wm'; found none."
            )
        for layer in layers:
            if layer.algorithm.learns_feedback != "mirror":
                raise ValueError(f"Layer {layer.name!r} has feedback={layer.feedback!r}, not 'wm'.")
            shape = layer.feedback_input_shape
            if shape is None or any(d is None for d in shape[1:]):
                raise ValueError(
                    f"Layer {layer.name!r} has input shape {shape}; mirror noise needs a fully "
                    "known input shape (apart from the batch). Build the model with a fixed "
                    "input size."
                )
        if noise_distribution not in NOISE_DISTRIBUTIONS:
            raise ValueError(
                f"noise_distribution={noise_distribution!r} is not one of {NOISE_DISTRIBUTIONS}"
            )
        if learning_rate < 0 or noise_std <= 0 or decay < 0 or batch_size < 1:
            raise ValueError(
                "Weight mirror needs learning_rate >= 0, noise_std > 0, decay >= 0 and "
                f"batch_size >= 1; got learning_rate={learning_rate}, noise_std={noise_std}, "
                f"decay={decay}, batch_size={batch_size}."
            )
        self.layers = list(layers)
        self.learning_rate = float(learning_rate)
        self.noise_std = float(noise_std)
        self.decay = float(decay)
        self.batch_size = int(batch_size)
        self.noise_distribution = noise_distribution
        self.seed = int(seed)
        self.strategy = strategy or tf.distribute.get_strategy()
        replicas = self.strategy.num_replicas_in_sync
        if self.batch_size % replicas:
            raise ValueError(
                f"Mirror batch_size={self.batch_size} must be divisible by the "
                f"{replicas} replicas of the distribution strategy."
            )
        self._local_batch = self.batch_size // replicas
        self._local_gradients = tf.function(self._gradients, jit_compile=jit_compile)
        self._compiled_noise = tf.function(self._noise, jit_compile=jit_compile)
        self._run = tf.function(self._distributed_step)

    def noise(self, layer_index, counter, replica=0):
        """The noise batch fed to layer `layer_index` at mirror step `counter` on `replica`
        (drawn exactly as the mirror step draws it: XLA's generator differs from TF's)."""
        return self._compiled_noise(layer_index, tf.constant(counter, tf.int64), tf.constant(replica, tf.int32))

    def _noise(self, layer_index, counter, replica):
        layer = self.layers[layer_index]
        shape = (self._local_batch,) + tuple(layer.feedback_input_shape[1:])
        seed = tf.stack(
            [
                tf.constant(self.seed, tf.int64) * 7919 + layer_index,
                tf.cast(counter, tf.int64),
            ]
        )
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int64))
        if self.noise_distribution == "normal":
            return tf.random.stateless_normal(shape, seed, stddev=self.noise_std, alg=_RNG)
        limit = self.noise_std * math.sqrt(3.0)
        return tf.random.stateless_uniform(shape, seed, minval=-limit, maxval=limit, alg=_RNG)

    def _gradients(self, counter, replica):
        return [
            mirror_gradient(layer, self._noise(i, counter, replica))
            for i, layer in enumerate(self.layers)
        ]

    def _replica_step(self, counter):
        context = tf.distribute.get_replica_context()
        gradients = self._local_gradients(counter, context.replica_id_in_sync_group)
        gradients = context.all_reduce("sum", gradients)
        feedbacks = [layer.feedback_kernel for layer in self.layers]
        updated = []
        for feedback, gradient in zip(feedbacks, gradients):
            b = tf.convert_to_tensor(feedback.value)
            updated.append(b + self.learning_rate * (gradient / self.batch_size - self.decay * b))
        assign_on_every_replica(self.strategy, feedbacks, updated)

    def _distributed_step(self, counter):
        self.strategy.run(self._replica_step, args=(counter,))

    def __call__(self, counter):
        """Runs one mirror step on every layer; `counter` (an int) seeds the noise."""
        self._run(tf.constant(counter, tf.int64))
