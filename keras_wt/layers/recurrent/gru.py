"""`GRUCell` and `GRU`: the feedback twins (`keras_wt.layers.recurrent`'s docstring)."""

import keras

from keras_wt.layers.recurrent.base import _FeedbackCell
from keras_wt.layers.recurrent.base import _FeedbackRNN
from keras_wt.layers.recurrent.base import _check_cudnn
from keras_wt.layers.recurrent.projections import _DenseProjection
from keras_wt.layers.recurrent.projections import _StackedProjection


@keras.saving.register_keras_serializable(package="keras_wt")
class GRUCell(_FeedbackCell, keras.layers.GRUCell):
    """`keras.layers.GRUCell` whose error crosses its kernels through feedback kernels.

    `dx_t = dz_t·B_inᵀ`; the recurrent error crosses `B_rec` where the stock cell multiplies
    by the recurrent kernel: `h_{t−1}` for every gate with `reset_after=True`; with
    `reset_after=False`, `h_{t−1}` for the update and reset gates and `r⊙h_{t−1}` for the
    candidate (one op on `[h, r⊙h]`, see the package docstring). The gates keep their exact
    gradients.

    Takes every stock argument plus the feedback arguments of `keras_wt.layers.Dense`.

    Example:

    >>> rnn = keras.layers.RNN(keras_wt.layers.GRUCell(8, feedback="fa"))
    """

    def _projection_layers(self, input_shape, names, common):
        units = 3 * self.units
        if self.reset_after:
            recurrent = _DenseProjection(units, use_bias=False, name=names[1],
                                         **self._projection_kwargs("recurrent"), **common)
        else:
            recurrent = _StackedProjection(units, use_bias=False, name=names[1],
                                           split=2 * self.units,
                                           **self._projection_kwargs("recurrent"), **common)
        return (
            _DenseProjection(units, use_bias=False, name=names[0],
                             **self._projection_kwargs("kernel"), **common),
            recurrent,
            (units,) if not self.reset_after else (2, units), self.bias_initializer,
        )

    def _input_projection_shape(self, input_shape):
        return (None, input_shape[-1])

    def _recurrent_projection_shape(self, input_shape):
        return (None, self.units) if self.reset_after else (None, 2, self.units)

    def _step_call(self, step, inputs, states, training):
        h_tm1 = states[0] if keras.tree.is_nested(states) else states
        u = self.units
        inputs_, recurrent = self.input_projection, self.recurrent_projection
        if self.use_bias:
            if not self.reset_after:
                input_bias, recurrent_bias = self.bias, None
            else:
                input_bias, recurrent_bias = (
                    keras.ops.squeeze(e, axis=0)
                    for e in keras.ops.split(self.bias, self.bias.shape[0], axis=0)
                )

        if self.implementation == 1:
            if training and 0.0 < self.dropout < 1.0:
                dp_mask = self._stock_dropout_mask(inputs)
                inputs_z, inputs_r, inputs_h = (inputs * dp_mask[k] for k in range(3))
            else:
                inputs_z = inputs_r = inputs_h = inputs
            x_z = step.project(inputs_, inputs_z, 0, u)
            x_r = step.project(inputs_, inputs_r, u, 2 * u)
            x_h = step.project(inputs_, inputs_h, 2 * u, 3 * u)
            if self.use_bias:
                x_z += input_bias[:u]
                x_r += input_bias[u:2 * u]
                x_h += input_bias[2 * u:]
            if training and 0.0 < self.recurrent_dropout < 1.0:
                rec_dp_mask = self.get_recurrent_dropout_mask(h_tm1)
                h_tm1_z, h_tm1_r, h_tm1_h = (h_tm1 * rec_dp_mask[k] for k in range(3))
            else:
                h_tm1_z = h_tm1_r = h_tm1_h = h_tm1
            recurrent_z = step.project(recurrent, h_tm1_z, 0, u)
            recurrent_r = step.project(recurrent, h_tm1_r, u, 2 * u)
            if self.reset_after and self.use_bias:
                recurrent_z += recurrent_bias[:u]
                recurrent_r += recurrent_bias[u:2 * u]
            z = self.recurrent_activation(x_z + recurrent_z)
            r = self.recurrent_activation(x_r + recurrent_r)
            if self.reset_after:
                recurrent_h = step.project(recurrent, h_tm1_h, 2 * u, 3 * u)
                if self.use_bias:
                    recurrent_h += recurrent_bias[2 * u:]
                recurrent_h = r * recurrent_h
            else:
                recurrent_h = step.project(recurrent, r * h_tm1_h, 2 * u, 3 * u)
            hh = self.activation(x_h + recurrent_h)
        else:
            if training and 0.0 < self.dropout < 1.0:
                dp_mask = self._stock_dropout_mask(inputs)
                inputs = inputs * dp_mask
            matrix_x = step.project(inputs_, inputs)
            if self.use_bias:
                matrix_x = keras.ops.add(matrix_x, input_bias)
            x_z, x_r, x_h = keras.ops.split(matrix_x, 3, axis=-1)
            if self.reset_after:
                matrix_inner = step.project(recurrent, h_tm1)
                if self.use_bias:
                    matrix_inner += recurrent_bias
            else:
                matrix_inner = step.project(recurrent, h_tm1, 0, 2 * u)
            recurrent_z = matrix_inner[:, :u]
            recurrent_r = matrix_inner[:, u:2 * u]
            recurrent_h = matrix_inner[:, 2 * u:]
            z = self.recurrent_activation(x_z + recurrent_z)
            r = self.recurrent_activation(x_r + recurrent_r)
            if self.reset_after:
                recurrent_h = r * recurrent_h
            else:
                recurrent_h = step.project(recurrent, r * h_tm1, 2 * u, 3 * u)
            hh = self.activation(x_h + recurrent_h)
        h = z * h_tm1 + (1 - z) * hh
        new_state = [h] if keras.tree.is_nested(states) else h
        return h, new_state


@keras.saving.register_keras_serializable(package="keras_wt")
class GRU(_FeedbackRNN, keras.layers.GRU):
    """`keras.layers.GRU` whose cell is a `keras_wt.layers.GRUCell`: the error crosses the
    input kernel through `B_in` and each time step through `B_rec`.

    Takes every stock argument plus the feedback arguments of `keras_wt.layers.Dense`; it
    always runs its cell (`use_cudnn` may be `"auto"` or `False`). The projections are named
    `<name>_input` and `<name>_recurrent`.

    Example:

    >>> layer = keras_wt.layers.GRU(64, feedback="wm")
    """

    _cell_class = GRUCell

    def __init__(self, *args, use_cudnn="auto", **kwargs):
        _check_cudnn(use_cudnn, "keras_wt.layers.GRU")
        super().__init__(*args, use_cudnn=False, **kwargs)
