"""`SimpleRNNCell` and `SimpleRNN`: the feedback twins (`keras_wt.layers.recurrent`'s docstring)."""

import keras

from keras_wt.layers.recurrent.base import _FeedbackCell
from keras_wt.layers.recurrent.base import _FeedbackRNN
from keras_wt.layers.recurrent.projections import _DenseProjection


@keras.saving.register_keras_serializable(package="keras_wt")
class SimpleRNNCell(_FeedbackCell, keras.layers.SimpleRNNCell):
    """`keras.layers.SimpleRNNCell` whose error crosses its kernels through feedback kernels:
    `h_t = act(x_t·W_in + b + h_{t−1}·W_rec)`, `dx_t = dz_t·B_inᵀ`, `dh_{t−1} = dz_t·B_recᵀ`.

    Takes every stock argument plus `feedback`, `feedback_initializer`, `feedback_scale`,
    `feedback_input` and `feedback_loss` as `keras_wt.layers.Dense`, passed to both projections
    (`cell.input_projection`, `cell.recurrent_projection`).

    Example:

    >>> rnn = keras.layers.RNN(keras_wt.layers.SimpleRNNCell(8, feedback="kp"))
    """

    def _projection_layers(self, input_shape, names, common):
        return (
            _DenseProjection(self.units, use_bias=False, name=names[0],
                             **self._projection_kwargs("kernel"), **common),
            _DenseProjection(self.units, use_bias=False, name=names[1],
                             **self._projection_kwargs("recurrent"), **common),
            (self.units,), self.bias_initializer,
        )

    def _input_projection_shape(self, input_shape):
        return (None, input_shape[-1])

    def _recurrent_projection_shape(self, input_shape):
        return (None, self.units)

    def _step_call(self, step, sequence, states, training):
        prev_output = states[0] if isinstance(states, (list, tuple)) else states
        dp_mask = self._stock_dropout_mask(sequence)
        rec_dp_mask = self.get_recurrent_dropout_mask(prev_output)
        if training and dp_mask is not None:
            sequence = sequence * dp_mask
        h = step.project(self.input_projection, sequence)
        if self.bias is not None:
            h = keras.ops.add(h, self.bias)
        if training and rec_dp_mask is not None:
            prev_output = prev_output * rec_dp_mask
        output = h + step.project(self.recurrent_projection, prev_output)
        if self.activation is not None:
            output = self.activation(output)
        new_state = [output] if isinstance(states, (list, tuple)) else output
        return output, new_state


@keras.saving.register_keras_serializable(package="keras_wt")
class SimpleRNN(_FeedbackRNN, keras.layers.SimpleRNN):
    """`keras.layers.SimpleRNN` whose cell is a `keras_wt.layers.SimpleRNNCell`: the error
    crosses the input kernel through `B_in` and each time step through `B_rec`.

    Takes every stock argument plus the feedback arguments of `keras_wt.layers.Dense`. The
    projections are named `<name>_input` and `<name>_recurrent`.

    Example:

    >>> layer = keras_wt.layers.SimpleRNN(16, feedback="fa")
    """

    _cell_class = SimpleRNNCell
