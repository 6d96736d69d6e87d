"""Convolutions: `Conv1D/2D/3D`, their transposes, depthwise and separable convolutions.

The input gradient of each is its linear op's own vector-Jacobian product with `B` in place of
the kernel: the transposed convolution for a convolution, the convolution for a transposed one,
the depthwise transposed convolution for a depthwise one. A separable convolution is a depthwise
then a pointwise `FeedbackLayer`, each with its own `B`.
"""

import math

import keras

from keras_wt.layers.arguments import WithFeedback
from keras_wt.layers.arguments import _Twin
from keras_wt.layers.base import FeedbackLayer
from keras_wt.layers.base import _add_bias_and_activate
from keras_wt.layers.base import _channel_axis
from keras_wt.layers.base import _independent_initializer


class _FeedbackConv(_Twin, FeedbackLayer):
    """Convolutions (`Conv1D/2D/3D`): the input gradient is the transposed convolution with B."""

    def linear(self, x, kernel):
        padding = self.padding
        if padding == "causal":
            # Conv1D only: pad the past by the kernel's dilated extent, then convolve "valid".
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            time_axis = 1 if self.data_format == "channels_last" else 2
            pad = [[0, 0], [0, 0], [0, 0]]
            pad[time_axis] = [left, 0]
            x = keras.ops.pad(x, pad)
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

    def call(self, inputs):
        outputs = self.linear_with_feedback(inputs, self.kernel)
        return _add_bias_and_activate(self, outputs, _channel_axis(self))


class _FeedbackConvTranspose(_Twin, FeedbackLayer):
    """Transposed convolutions: the input gradient is the (forward) convolution of `dy` with B.

    The kernel is laid out `(k1, …, kn, filters, in_channels)` as in Keras, so each input unit
    feeds `k1·…·kn·filters` outputs (sign symmetry's `fan_out`).
    """

    def linear(self, x, kernel):
        return keras.ops.conv_transpose(
            x,
            kernel,
            strides=list(self.strides),
            padding=self.padding,
            output_padding=self.output_padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    def call(self, inputs):
        outputs = self.linear_with_feedback(inputs, self.kernel)
        return _add_bias_and_activate(self, outputs, _channel_axis(self))

    @property
    def feedback_fan_out(self):
        return math.prod(self.kernel_size) * self.filters


class _FeedbackDepthwiseConv(_Twin, FeedbackLayer):
    """Depthwise convolutions: the input gradient is the depthwise transposed convolution with
    B (each channel's error flows back through its own `B[..., c, :]` only). The kernel is
    `(k1, …, kn, in_channels, depth_multiplier)`: `fan_out = k1·…·kn·depth_multiplier`."""

    def linear(self, x, kernel):
        return keras.ops.depthwise_conv(
            x,
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )

    def call(self, inputs):
        outputs = self.linear_with_feedback(inputs, self.kernel)
        return _add_bias_and_activate(self, outputs, _channel_axis(self))

    def default_feedback_initializer(self):
        return _independent_initializer(self.depthwise_initializer)


_CONV_DOC = """`keras.layers.{name}` whose input gradient {gradient}.

    Takes every stock argument plus `feedback`, `feedback_initializer` and `feedback_scale` as
    `keras_wt.layers.Dense`. {extra}
    """


def _doc(name, gradient, extra=""):
    return _CONV_DOC.format(name=name, gradient=gradient, extra=extra)


@keras.saving.register_keras_serializable(package="keras_wt")
class Conv1D(_FeedbackConv, keras.layers.Conv1D):
    __doc__ = _doc(
        "Conv1D",
        "is the transposed convolution with `B`",
        'Any padding, `"causal"` included, strides, dilation and groups.',
    )


@keras.saving.register_keras_serializable(package="keras_wt")
class Conv2D(_FeedbackConv, keras.layers.Conv2D):
    __doc__ = _doc(
        "Conv2D",
        "is `conv2d_backprop_input(dy, B)`",
        """Example:

    >>> layer = keras_wt.layers.Conv2D(32, 3, feedback="wm", feedback_initializer="he_normal")
    """,
    )


@keras.saving.register_keras_serializable(package="keras_wt")
class Conv3D(_FeedbackConv, keras.layers.Conv3D):
    __doc__ = _doc("Conv3D", "is `conv3d_backprop_input(dy, B)`")


@keras.saving.register_keras_serializable(package="keras_wt")
class Conv1DTranspose(_FeedbackConvTranspose, keras.layers.Conv1DTranspose):
    __doc__ = _doc("Conv1DTranspose", "is the convolution of `dy` with `B`")


@keras.saving.register_keras_serializable(package="keras_wt")
class Conv2DTranspose(_FeedbackConvTranspose, keras.layers.Conv2DTranspose):
    __doc__ = _doc("Conv2DTranspose", "is the convolution of `dy` with `B`")


@keras.saving.register_keras_serializable(package="keras_wt")
class Conv3DTranspose(_FeedbackConvTranspose, keras.layers.Conv3DTranspose):
    __doc__ = _doc("Conv3DTranspose", "is the convolution of `dy` with `B`")


@keras.saving.register_keras_serializable(package="keras_wt")
class DepthwiseConv1D(_FeedbackDepthwiseConv, keras.layers.DepthwiseConv1D):
    __doc__ = _doc("DepthwiseConv1D", "is the depthwise transposed convolution with `B`")


@keras.saving.register_keras_serializable(package="keras_wt")
class DepthwiseConv2D(_FeedbackDepthwiseConv, keras.layers.DepthwiseConv2D):
    __doc__ = _doc("DepthwiseConv2D", "is the depthwise transposed convolution with `B`")


class _FeedbackSeparableConv(_Twin, WithFeedback):
    """A separable convolution as what it computes: a depthwise convolution, then a 1×1
    convolution (with the bias), each a `FeedbackLayer` with its own `B`. The error flows back
    through the pointwise `B`, then through the depthwise `B`.

    `layer.depthwise_conv` and `layer.pointwise_conv` are those sublayers (named
    `<name>_depthwise` and `<name>_pointwise`); `depthwise_kernel`, `pointwise_kernel` and
    `bias` are their weights, as on the stock layer, and `layer.weights` without the feedback
    kernels is `[depthwise_kernel, pointwise_kernel, bias]`, the stock order.
    """

    _depthwise_class = None
    _pointwise_class = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        common = dict(data_format=self.data_format, dtype=self.dtype_policy)
        common.update(self.feedback_config())
        self.depthwise_conv = self._depthwise_class(
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            depth_multiplier=self.depth_multiplier,
            dilation_rate=self.dilation_rate,
            use_bias=False,
            depthwise_initializer=self.depthwise_initializer,
            depthwise_regularizer=self.depthwise_regularizer,
            depthwise_constraint=self.depthwise_constraint,
            name=f"{self.name}_depthwise",
            **common,
        )
        self.pointwise_conv = self._pointwise_class(
            self.filters,
            1,
            use_bias=self.use_bias,
            kernel_initializer=self.pointwise_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.pointwise_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.pointwise_constraint,
            bias_constraint=self.bias_constraint,
            name=f"{self.name}_pointwise",
            **common,
        )

    def build(self, input_shape):
        self.compute_output_shape(input_shape)  # the stock checks of the input shape
        channel_axis = _channel_axis(self)
        self.input_spec = keras.layers.InputSpec(
            min_ndim=self.rank + 2, axes={channel_axis: input_shape[channel_axis]}
        )
        self.depthwise_conv.build(input_shape)
        self.pointwise_conv.build(self.depthwise_conv.compute_output_shape(input_shape))

    def call(self, inputs):
        outputs = self.pointwise_conv(self.depthwise_conv(inputs))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    @property
    def depthwise_kernel(self):
        return self.depthwise_conv.kernel

    @property
    def pointwise_kernel(self):
        return self.pointwise_conv.kernel

    @property
    def bias(self):
        return self.pointwise_conv.bias


@keras.saving.register_keras_serializable(package="keras_wt")
class SeparableConv1D(_FeedbackSeparableConv, keras.layers.SeparableConv1D):
    __doc__ = _FeedbackSeparableConv.__doc__.replace(
        "A separable", "`keras.layers.SeparableConv1D` with feedback kernels: a separable", 1
    )
    _depthwise_class = DepthwiseConv1D
    _pointwise_class = Conv1D


@keras.saving.register_keras_serializable(package="keras_wt")
class SeparableConv2D(_FeedbackSeparableConv, keras.layers.SeparableConv2D):
    __doc__ = _FeedbackSeparableConv.__doc__.replace(
        "A separable", "`keras.layers.SeparableConv2D` with feedback kernels: a separable", 1
    )
    _depthwise_class = DepthwiseConv2D
    _pointwise_class = Conv2D
