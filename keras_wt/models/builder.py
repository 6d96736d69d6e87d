"""What every builder shares: `_Builder` makes the layers of one model (feedback,
initializers and their seeds, regularizer, dtype in one place); the batch norm of the
reference ResNets."""

import keras

from keras_wt import algorithms
from keras_wt import layers as wt_layers

# Batch norm of the reference ResNets (PyTorch's momentum 0.1 is Keras's 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _seed_for(seed, index):
    return (seed * 1_000_003 + index) % (2**31 - 1)


class _Builder:
    """Makes the layers of one model: feedback, initializers, regularizer and dtype in one place.

    Every layer gets its own initializer instances (an unseeded Keras initializer returns the
    same values at every call, so sharing one would make equal-shaped kernels equal). With
    `seed`, initializer `i` of the model is seeded with a number derived from `(seed, i)`: two
    builds with the same seed are identical, and no two kernels (nor a kernel and its feedback
    kernel) share a seed. The numbering does not depend on the algorithm, so the same seed gives
    the same forward weights for `bp`, `fa`, ... and the same `B` for `fa`, `wm` and `kp`.
    """

    def __init__(
        self,
        feedback,
        feedback_initializer=None,
        seed=None,
        dtype=None,
        l2=None,
        feedback_loss=None,
    ):
        self.algorithm = algorithms.get(feedback)
        self.feedback_loss = feedback_loss
        self.feedback_initializer = feedback_initializer
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} must be an integer or None")
        self.seed = seed
        self.dtype = dtype
        if l2 is not None and (
            isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0
        ):
            raise ValueError(f"l2={l2!r} must be a number >= 0 or None")
        self.l2 = l2
        self._count = 0

    def initializer(self, identifier):
        """A fresh instance of the initializer `identifier`, seeded as the class docstring says."""
        initializer = keras.initializers.get(identifier)
        if not isinstance(initializer, keras.initializers.Initializer):
            return initializer  # a plain function: nothing to copy or seed
        config = keras.initializers.serialize(initializer)
        inner = config.get("config") if isinstance(config, dict) else None
        if not isinstance(inner, dict) or "seed" not in inner:
            return keras.initializers.deserialize(config)  # deterministic (zeros, ones, ...)
        index, self._count = self._count, self._count + 1
        if self.seed is not None:
            inner["seed"] = _seed_for(self.seed, index)
        elif isinstance(inner["seed"], int):
            inner["seed"] = _seed_for(inner["seed"], index)
        else:
            inner["seed"] = None  # a new random default seed
        return keras.initializers.deserialize(config)

    def _feedback_kwargs(self, kernel_initializer):
        kwargs = {"feedback": self.algorithm.name}
        # Drawn for every algorithm, so that a seed gives the same W whatever the algorithm.
        feedback_initializer = self.initializer(
            kernel_initializer if self.feedback_initializer is None else self.feedback_initializer
        )
        if self.algorithm.stores_feedback:
            kwargs["feedback_initializer"] = feedback_initializer
        if self.feedback_loss is not None:
            kwargs["feedback_loss"] = self.feedback_loss  # validated by the layer
        return kwargs

    def _regularizer(self):
        # keras L2(l) adds l·‖W‖², whose gradient is 2l·W: l = l2 / 2 gives l2·W, the usual
        # coupled weight decay (OptimizerConfig.l2).
        if not self.l2:
            return None
        return keras.regularizers.L2(self.l2 / 2)

    def dense(self, units, name, kernel_initializer, bias_initializer="zeros", activation=None):
        return wt_layers.Dense(
            units,
            activation=activation,
            kernel_initializer=self.initializer(kernel_initializer),
            bias_initializer=self.initializer(bias_initializer),
            kernel_regularizer=self._regularizer(),
            dtype=self.dtype,
            name=name,
            **self._feedback_kwargs(kernel_initializer),
        )

    def conv(self, x, filters, kernel_size, strides, name, kernel_initializer, use_bias=False,
             activation=None):
        """A Conv2D on `x`. A strided convolution pads `(kernel_size − 1) // 2` on each side
        first (as PyTorch and the TPU ResNet do) instead of TensorFlow's asymmetric "same"."""
        if strides > 1 and kernel_size > 1:
            pad = (kernel_size - 1) // 2
            x = keras.layers.ZeroPadding2D(pad, dtype=self.dtype, name=f"{name}_pad")(x)
            padding = "valid"
        else:
            padding = "same"
        return wt_layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=use_bias,
            activation=activation,
            kernel_initializer=self.initializer(kernel_initializer),
            kernel_regularizer=self._regularizer(),
            dtype=self.dtype,
            name=name,
            **self._feedback_kwargs(kernel_initializer),
        )(x)

    def batch_norm(self, x, name, zero_gamma=False):
        return keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            gamma_initializer="zeros" if zero_gamma else "ones",
            dtype=self.dtype,
            name=name,
        )(x)

    def relu(self, x, name):
        return keras.layers.Activation("relu", dtype=self.dtype, name=name)(x)

    def head(self, x, num_classes, kernel_initializer, output_activation,
             bias_initializer="zeros"):
        """The classifier Dense and the `"predictions"` activation, in the variable dtype."""
        x = self.dense(num_classes, "classifier", kernel_initializer, bias_initializer)(x)
        policy = (
            keras.config.dtype_policy()
            if self.dtype is None
            else keras.dtype_policies.get(self.dtype)
        )
        return keras.layers.Activation(
            output_activation or "linear", dtype=policy.variable_dtype, name="predictions"
        )(x)
