"""`ConvLSTMCell` and `ConvLSTM1D/2D/3D`: the feedback twins (`keras_wt.layers.recurrent`'s
docstring)."""

import keras

from keras_wt import _compat
from keras_wt.layers.recurrent.base import _FeedbackCell
from keras_wt.layers.recurrent.base import _FeedbackRNN
from keras_wt.layers.recurrent.projections import _CONV_PROJECTIONS
from keras_wt.layers.recurrent.projections import _UnitForgetBias


@keras.saving.register_keras_serializable(package="keras_wt")
class ConvLSTMCell(_FeedbackCell, _compat.conv_lstm_cell_class()):
    """The cell of `keras.layers.ConvLSTM1D/2D/3D` whose error crosses its kernels through
    feedback kernels: the input convolution's input gradient is the transposed convolution with
    `B_in`, the recurrent ("same", stride 1) convolution's is the transposed convolution with
    `B_rec`, at every step; the gates and the carry keep their exact gradients.

    Takes the stock cell's arguments (`rank`, `filters`, `kernel_size`, ...) plus the feedback
    arguments of `keras_wt.layers.Dense`, passed to both projections (`keras_wt.layers.Conv1D/2D/3D`
    with `4·filters` output channels, named `<layer>_input` and `<layer>_recurrent`).
    """

    def build(self, inputs_shape, states_shape=None):
        # The stock build's checks and attributes (its weights are the projections' here).
        if self.data_format == "channels_first":
            channel_axis, self.spatial_dims = 1, inputs_shape[2:]
        else:
            channel_axis, self.spatial_dims = -1, inputs_shape[1:-1]
        if None in self.spatial_dims or inputs_shape[channel_axis] is None:
            raise ValueError(
                "ConvLSTM layers need static spatial and channel dimensions; got input_shape="
                f"{inputs_shape}"
            )
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 3, shape=(None,) + tuple(inputs_shape[1:]))
        self.input_dim = inputs_shape[channel_axis]
        self.kernel_shape = self.kernel_size + (self.input_dim, self.filters * 4)
        super().build(inputs_shape)

    def _projection_layers(self, input_shape, names, common):
        conv = _CONV_PROJECTIONS[self.rank]
        shared = dict(data_format=self.data_format, use_bias=False, **common)
        bias_initializer = self.bias_initializer
        if self.unit_forget_bias:
            bias_initializer = _UnitForgetBias(self.bias_initializer, self.filters)
        return (
            conv(4 * self.filters, self.kernel_size, strides=self.strides, padding=self.padding,
                 dilation_rate=self.dilation_rate, name=names[0],
                 **self._projection_kwargs("kernel"), **shared),
            conv(4 * self.filters, self.kernel_size, strides=1, padding="same", name=names[1],
                 **self._projection_kwargs("recurrent"), **shared),
            (4 * self.filters,), bias_initializer,
        )

    def _input_projection_shape(self, input_shape):
        return (None,) + tuple(input_shape[1:])

    def _recurrent_projection_shape(self, input_shape):
        return (None,) + tuple(self.compute_output_shape(input_shape)[0][1:])

    def _step_call(self, step, inputs, states, training):
        h_tm1, c_tm1 = states[0], states[1]
        f = self.filters
        if training and 0.0 < self.dropout < 1.0:
            dp_mask = self._stock_dropout_mask(inputs)
            gate_inputs = [inputs * dp_mask[k] for k in range(4)]
        else:
            gate_inputs = [inputs] * 4
        if training and 0.0 < self.recurrent_dropout < 1.0:
            rec_dp_mask = self.get_recurrent_dropout_mask(h_tm1)
            gate_states = [h_tm1 * rec_dp_mask[k] for k in range(4)]
        else:
            gate_states = [h_tm1] * 4
        biases = keras.ops.split(self.bias, 4) if self.use_bias else [None] * 4
        # The stock cell splits each kernel once per step.
        step.read_once(self.input_projection)
        step.read_once(self.recurrent_projection)
        x_i, x_f, x_c, x_o = (
            self._add_bias(step.project(self.input_projection, x, k * f, (k + 1) * f), b)
            for k, (x, b) in enumerate(zip(gate_inputs, biases))
        )
        h_i, h_f, h_c, h_o = (
            step.project(self.recurrent_projection, h, k * f, (k + 1) * f)
            for k, h in enumerate(gate_states)
        )
        i = self.recurrent_activation(x_i + h_i)
        f_gate = self.recurrent_activation(x_f + h_f)
        c = f_gate * c_tm1 + i * self.activation(x_c + h_c)
        o = self.recurrent_activation(x_o + h_o)
        h = o * self.activation(c)
        return h, [h, c]

    def _add_bias(self, conv_out, b):
        # As the stock `input_conv`.
        if b is None:
            return conv_out
        if self.data_format == "channels_last":
            shape = (1,) * (self.rank + 1) + (self.filters,)
        else:
            shape = (1, self.filters) + (1,) * self.rank
        conv_out += keras.ops.reshape(b, shape)
        return conv_out


class _FeedbackConvLSTM(_FeedbackRNN):
    _cell_class = ConvLSTMCell

    def call(self, sequences, initial_state=None, mask=None, training=None):
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)


_CONV_LSTM_DOC = """`keras.layers.{name}` whose cell is a `keras_wt.layers.ConvLSTMCell`: the error
    crosses the input convolution through `B_in` and each time step's recurrent convolution
    through `B_rec`.

    Takes every stock argument plus the feedback arguments of `keras_wt.layers.Dense`. The
    projections are named `<name>_input` and `<name>_recurrent`.
    """


@keras.saving.register_keras_serializable(package="keras_wt")
class ConvLSTM1D(_FeedbackConvLSTM, keras.layers.ConvLSTM1D):
    __doc__ = _CONV_LSTM_DOC.format(name="ConvLSTM1D")


@keras.saving.register_keras_serializable(package="keras_wt")
class ConvLSTM2D(_FeedbackConvLSTM, keras.layers.ConvLSTM2D):
    __doc__ = _CONV_LSTM_DOC.format(name="ConvLSTM2D")


@keras.saving.register_keras_serializable(package="keras_wt")
class ConvLSTM3D(_FeedbackConvLSTM, keras.layers.ConvLSTM3D):
    __doc__ = _CONV_LSTM_DOC.format(name="ConvLSTM3D")
