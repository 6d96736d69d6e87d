"""A recurrent cell's projections (its two `(W, B)` pairs, as `FeedbackLayer` twins that can
evaluate their op restricted to some output columns) and its bias sublayer."""

import keras

from keras_wt.layers.base import _channel_axis
from keras_wt.layers.convolutional import Conv1D
from keras_wt.layers.convolutional import Conv2D
from keras_wt.layers.convolutional import Conv3D
from keras_wt.layers.core import Dense


class _Projection:
    """Mixin of a cell's projection (before a `FeedbackLayer` twin): the op restricted to some
    output columns, which the stock cells evaluate for slices of their kernels."""

    # The axis of the op's output that the kernel's last axis (its columns) maps to.
    output_axis = -1

    def columns(self, x, kernel, start, stop):
        """The twin's op (matmul or convolution) of `x` with `kernel[..., start:stop]`."""
        return super().linear(x, kernel[..., start:stop])


class _DenseProjection(_Projection, Dense):
    """A cell kernel `(fan_in, gates·units)` applied by a matmul: `linear(x, K) = x·K`."""


class _ConvProjection(_Projection):
    """A ConvLSTM kernel `(k1, …, kn, c_in, gates·filters)` applied by a convolution."""

    @property
    def output_axis(self):
        return _channel_axis(self)


class _Conv1DProjection(_ConvProjection, Conv1D):
    pass


class _Conv2DProjection(_ConvProjection, Conv2D):
    pass


class _Conv3DProjection(_ConvProjection, Conv3D):
    pass


_CONV_PROJECTIONS = {1: _Conv1DProjection, 2: _Conv2DProjection, 3: _Conv3DProjection}


class _StackedProjection(_DenseProjection):
    """GRU's recurrent kernel with `reset_after=False`: one op on the stacked `[h, r⊙h]`,
    `linear(x, K) = [x[:, 0]·K[:, :2u], x[:, 1]·K[:, 2u:]]`, bilinear in `(x, K)`."""

    def __init__(self, *args, split=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.split = split

    def linear(self, x, kernel):
        return keras.ops.concatenate(
            [self.columns(x[:, 0], kernel, 0, self.split),
             self.columns(x[:, 1], kernel, self.split, None)],
            axis=-1,
        )


class _Bias(keras.layers.Layer):
    """Holds a cell's bias (after both kernels, in the stock weight order)."""

    def __init__(self, shape, initializer, regularizer=None, constraint=None, **kwargs):
        super().__init__(**kwargs)
        self.bias_shape = tuple(shape)
        self.initializer = initializer
        self.regularizer = regularizer
        self.constraint = constraint

    def build(self, input_shape=None):
        self.bias = self.add_weight(
            name="bias", shape=self.bias_shape, initializer=self.initializer,
            regularizer=self.regularizer, constraint=self.constraint,
        )


class _UnitForgetBias(keras.initializers.Initializer):
    """The stock LSTM bias with `unit_forget_bias=True`: `[init(u), ones(u), init(2u)]`."""

    def __init__(self, initializer, units):
        self.initializer = initializer
        self.units = units

    def __call__(self, shape, dtype=None):
        u = self.units
        return keras.ops.concatenate([
            self.initializer((u,), dtype=dtype),
            keras.initializers.get("ones")((u,), dtype=dtype),
            self.initializer((u * (shape[0] // u - 2),), dtype=dtype),
        ])
