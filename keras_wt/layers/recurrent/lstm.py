"""`LSTMCell` and `LSTM`: the feedback twins (`keras_wt.layers.recurrent`'s docstring)."""

import keras

from keras_wt.layers.recurrent.base import _FeedbackCell
from keras_wt.layers.recurrent.base import _FeedbackRNN
from keras_wt.layers.recurrent.base import _check_cudnn
from keras_wt.layers.recurrent.projections import _DenseProjection
from keras_wt.layers.recurrent.projections import _UnitForgetBias


@keras.saving.register_keras_serializable(package="keras_wt")
class LSTMCell(_FeedbackCell, keras.layers.LSTMCell):
    """`keras.layers.LSTMCell` whose error crosses its kernels through feedback kernels: with
    `z_t = x_t·W_in + h_{t−1}·W_rec + b` (the four gates' pre-activations),
    `dx_t = dz_t·B_inᵀ` and `dh_{t−1}` through `z_t` is `dz_t·B_recᵀ`; the gates and the carry
    keep their exact gradients.

    Takes every stock argument (`implementation` 1 and 2 included) plus the feedback arguments
    of `keras_wt.layers.Dense`, passed to both projections.

    Example:

    >>> rnn = keras.layers.RNN(keras_wt.layers.LSTMCell(8, feedback="wm"))
    """

    def _projection_layers(self, input_shape, names, common):
        units = 4 * self.units
        bias_initializer = self.bias_initializer
        if self.unit_forget_bias:
            bias_initializer = _UnitForgetBias(self.bias_initializer, self.units)
        return (
            _DenseProjection(units, use_bias=False, name=names[0],
                             **self._projection_kwargs("kernel"), **common),
            _DenseProjection(units, use_bias=False, name=names[1],
                             **self._projection_kwargs("recurrent"), **common),
            (units,), bias_initializer,
        )

    def _input_projection_shape(self, input_shape):
        return (None, input_shape[-1])

    def _recurrent_projection_shape(self, input_shape):
        return (None, self.units)

    def _step_call(self, step, inputs, states, training):
        h_tm1, c_tm1 = states[0], states[1]
        u = self.units
        inputs_, recurrent = self.input_projection, self.recurrent_projection
        if self.implementation == 1:
            if training and 0.0 < self.dropout < 1.0:
                dp_mask = self._stock_dropout_mask(inputs)
                gate_inputs = [inputs * dp_mask[k] for k in range(4)]
            else:
                gate_inputs = [inputs] * 4
            step.read_once(inputs_)  # the stock cell splits its kernel (one read per step)
            x_i, x_f, x_c, x_o = (
                step.project(inputs_, x, k * u, (k + 1) * u) for k, x in enumerate(gate_inputs)
            )
            if self.use_bias:
                b_i, b_f, b_c, b_o = keras.ops.split(self.bias, 4, axis=0)
                x_i += b_i
                x_f += b_f
                x_c += b_c
                x_o += b_o
            if training and 0.0 < self.recurrent_dropout < 1.0:
                rec_dp_mask = self.get_recurrent_dropout_mask(h_tm1)
                gate_states = [h_tm1 * rec_dp_mask[k] for k in range(4)]
            else:
                gate_states = [h_tm1] * 4
            i = self.recurrent_activation(x_i + step.project(recurrent, gate_states[0], 0, u))
            f = self.recurrent_activation(x_f + step.project(recurrent, gate_states[1], u, 2 * u))
            c = f * c_tm1 + i * self.activation(
                x_c + step.project(recurrent, gate_states[2], 2 * u, 3 * u)
            )
            o = self.recurrent_activation(x_o + step.project(recurrent, gate_states[3], 3 * u, 4 * u))
        else:
            if training and 0.0 < self.dropout < 1.0:
                dp_mask = self._stock_dropout_mask(inputs)
                inputs = inputs * dp_mask
            z = step.project(inputs_, inputs)
            z = keras.ops.add(z, step.project(recurrent, h_tm1))
            if self.use_bias:
                z = keras.ops.add(z, self.bias)
            z = keras.ops.split(z, 4, axis=1)
            c, o = self._compute_carry_and_output_fused(z, c_tm1)
        h = o * self.activation(c)
        return h, [h, c]


@keras.saving.register_keras_serializable(package="keras_wt")
class LSTM(_FeedbackRNN, keras.layers.LSTM):
    """`keras.layers.LSTM` whose cell is a `keras_wt.layers.LSTMCell`: the error crosses the
    input kernel through `B_in` and each time step through `B_rec`.

    Takes every stock argument plus the feedback arguments of `keras_wt.layers.Dense`. It always
    runs its cell (never cuDNN's fused kernel, which would bypass `B`): `use_cudnn` may be
    `"auto"` or `False`. The projections are named `<name>_input` and `<name>_recurrent`.

    Example:

    >>> layer = keras_wt.layers.LSTM(64, feedback="kp")
    >>> layer.cell.recurrent_projection.feedback_kernel.shape   # after building
    (64, 256)
    """

    _cell_class = LSTMCell

    def __init__(self, *args, use_cudnn="auto", **kwargs):
        _check_cudnn(use_cudnn, "keras_wt.layers.LSTM")
        super().__init__(*args, use_cudnn=False, **kwargs)
