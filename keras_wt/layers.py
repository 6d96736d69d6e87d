"""Drop-in Keras layers whose error signal flows backwards through a feedback kernel `B`.

`keras_wt.layers.Dense`, `Conv1D` and `Conv2D` subclass the stock layers and take every stock
argument, plus:

* `feedback`: one of `keras_wt.ALGORITHMS` (`"bp"`, `"fa"`, `"ss"`, `"wm"`, `"kp"`).
* `feedback_initializer`: initializer of the stored `B` (`fa`, `wm`, `kp`). `None` (default)
  draws `B` from the same distribution as the kernel, independently of it.
* `feedback_scale`: for `ss`, the magnitude `s` in `B = sign(W)·s`; `None` means
  `sqrt(2 / fan_out)`.

The forward pass is the stock one. Only the gradient with respect to the layer's input changes
(DESIGN.md §1); the gradients of `W` and of the bias are the stock ones.
"""

import weakref

import keras
import tensorflow as tf
from keras.src.layers.convolutional.base_conv import BaseConv

from keras_wt import algorithms
from keras_wt import feedback as feedback_lib



class _KolenPollackGuard:
    """Kernel constraint of a `kp` layer: every Keras optimizer applies a variable's constraint
    after updating it, so an optimizer other than KolenPollack is caught the first time it
    updates the kernel (when the train step is traced), before B could silently stay fixed."""

    def __init__(self, layer, constraint):
        self.layer_name = layer.name
        self.constraint = constraint

    def __call__(self, kernel):
        if not feedback_lib.in_kolen_pollack_update():
            raise ValueError(
                f"Layer {self.layer_name!r} uses feedback='kp', but its kernel is being updated "
                "by an optimizer other than keras_wt.optimizers.KolenPollack, so its feedback "
                "kernel would never learn (silently degrading to feedback alignment). Compile "
                "the model with optimizer=keras_wt.optimizers.KolenPollack(<your optimizer>, "
                "weight_decay=...)."
            )
        return kernel if self.constraint is None else self.constraint(kernel)


def _independent_initializer(kernel_initializer):
    """A fresh, unseeded copy of `kernel_initializer`: B must never equal W by construction."""
    config = keras.initializers.serialize(kernel_initializer)
    if isinstance(config, dict) and isinstance(config.get("config"), dict):
        config["config"]["seed"] = None
    return keras.initializers.deserialize(config)


class FeedbackLayer:
    """Mixin adding the feedback kernel and the custom input gradient to a stock layer.

    Subclasses define `linear(x, kernel)`: the layer's map from its input to its output before
    bias and activation (a matmul or a convolution).
    """

    def _init_feedback(self, feedback, feedback_initializer, feedback_scale):
        self.algorithm = algorithms.get(feedback)
        self.feedback = self.algorithm.name
        self.feedback_initializer = (
            None
            if feedback_initializer is None
            else keras.initializers.get(feedback_initializer)
        )
        if feedback_scale is not None and (
            not isinstance(feedback_scale, (int, float)) or feedback_scale <= 0
        ):
            raise ValueError(
                f"feedback_scale={feedback_scale!r} must be a positive number or None"
            )
        self.feedback_scale = feedback_scale
        self.feedback_kernel = None
        # The input shape the layer was built with: mirror noise is drawn with this shape.
        self.feedback_input_shape = None

    def build(self, input_shape):
        super().build(input_shape)
        self.feedback_input_shape = tuple(input_shape)
        # The optimizer finds the layer of a kernel through this link (see KolenPollack).
        self._kernel._keras_wt_layer = weakref.ref(self)
        if self.algorithm.learns_feedback == "optimizer":
            self._kernel.constraint = _KolenPollackGuard(self, self._kernel.constraint)
        if self.algorithm.stores_feedback:
            initializer = self.feedback_initializer or _independent_initializer(
                self.kernel_initializer
            )
            self.feedback_kernel = self.add_weight(
                name="feedback_kernel",
                shape=self._kernel.shape,
                initializer=initializer,
                trainable=False,
                # Every replica computes the same update of B; this makes any assignment of
                # B in a replica context take one replica's value for all.
                aggregation="only_first_replica",
            )

    def feedback_tensor(self, kernel):
        """The tensor standing in for `kernel` in the input gradient (`None`: exact backprop)."""
        if feedback_lib.backprop_forced():
            return None
        return self.algorithm.feedback(self, kernel)

    def linear_with_feedback(self, inputs, kernel):
        """`self.linear(inputs, kernel)` with the algorithm's input gradient."""
        kernel = tf.convert_to_tensor(kernel)
        outputs = feedback_lib.linear_with_feedback(
            self.linear,
            inputs,
            kernel,
            self.feedback_tensor(kernel),
        )
        tap = feedback_lib.linear_tap()
        if tap is not None:
            outputs = tap(self, outputs)
        return outputs

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.built and self.feedback_kernel is not None:
            store["feedback_kernel"] = self.feedback_kernel

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.built and self.feedback_kernel is not None:
            self.feedback_kernel.assign(store["feedback_kernel"])

    def enable_lora(self, *args, **kwargs):
        raise NotImplementedError(
            f"LoRA is not supported on keras_wt feedback layers (layer {self.name!r}): the "
            "feedback kernel has the full kernel's shape."
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            feedback=self.feedback,
            feedback_initializer=(
                None
                if self.feedback_initializer is None
                else keras.initializers.serialize(self.feedback_initializer)
            ),
            feedback_scale=self.feedback_scale,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_wt")
class Dense(FeedbackLayer, keras.layers.Dense):
    """`keras.layers.Dense` whose input gradient is `dy·Bᵀ` (`B`: the feedback kernel).

    Args:
        units: as `keras.layers.Dense`; every stock argument is accepted.
        feedback: one of `keras_wt.ALGORITHMS`.
        feedback_initializer: initializer of `B` for `fa`, `wm`, `kp`; `None` draws it like the
            kernel, independently.
        feedback_scale: `s` of sign symmetry, `B = sign(W)·s`; `None` is `sqrt(2 / units)`.

    Example:

    >>> layer = keras_wt.layers.Dense(64, activation="relu", feedback="kp")
    >>> y = layer(np.zeros((8, 32), "float32"))
    >>> layer.feedback_kernel.shape
    (32, 64)
    """

    def __init__(
        self,
        units,
        feedback="bp",
        feedback_initializer=None,
        feedback_scale=None,
        **kwargs,
    ):
        super().__init__(units, **kwargs)
        self._init_feedback(feedback, feedback_initializer, feedback_scale)

    def linear(self, x, kernel):
        return keras.ops.matmul(x, kernel)

    def call(self, inputs, training=None):
        x = self.linear_with_feedback(inputs, self.kernel)
        if self.bias is not None:
            x = keras.ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


class _FeedbackConv(FeedbackLayer):
    """Convolutions: the stock `call` runs `convolution_op`, which gets the feedback gradient."""

    def linear(self, x, kernel):
        padding = self.padding
        if padding == "causal":
            x = keras.ops.pad(x, self._compute_causal_padding())
            padding = "valid"
        return keras.ops.conv(
            x,
            kernel,
            strides=list(self.strides),
            padding=padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    def convolution_op(self, inputs, kernel):
        return self.linear_with_feedback(inputs, kernel)

    # keras.layers.Conv1D.call bypasses convolution_op; the base class's call does not.
    call = BaseConv.call


@keras.saving.register_keras_serializable(package="keras_wt")
class Conv1D(_FeedbackConv, keras.layers.Conv1D):
    """`keras.layers.Conv1D` whose input gradient is the transposed convolution with `B`.

    Takes every stock argument (any padding, `"causal"` included, strides, dilation, groups)
    plus `feedback`, `feedback_initializer` and `feedback_scale` as `keras_wt.layers.Dense`.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        feedback="bp",
        feedback_initializer=None,
        feedback_scale=None,
        **kwargs,
    ):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_feedback(feedback, feedback_initializer, feedback_scale)


@keras.saving.register_keras_serializable(package="keras_wt")
class Conv2D(_FeedbackConv, keras.layers.Conv2D):
    """`keras.layers.Conv2D` whose input gradient is `conv2d_backprop_input(dy, B)`.

    Takes every stock argument plus `feedback`, `feedback_initializer` and `feedback_scale` as
    `keras_wt.layers.Dense`.

    Example:

    >>> layer = keras_wt.layers.Conv2D(32, 3, feedback="wm", feedback_initializer="he_normal")
    """

    def __init__(
        self,
        filters,
        kernel_size,
        feedback="bp",
        feedback_initializer=None,
        feedback_scale=None,
        **kwargs,
    ):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_feedback(feedback, feedback_initializer, feedback_scale)


FEEDBACK_LAYERS = (Dense, Conv1D, Conv2D)


def feedback_layers(model):
    """All keras_wt feedback layers of `model` (nested models included), in order."""
    return [layer for layer in model._flatten_layers() if isinstance(layer, FeedbackLayer)]
