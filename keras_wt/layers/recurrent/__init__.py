"""Recurrent layers (`SimpleRNN`, `LSTM`, `GRU`, `ConvLSTM1D/2D/3D` and their cells) with a
feedback kernel for the input kernel and one for the recurrent kernel.

A recurrent cell multiplies two things by a kernel at every time step: the input `x_t` (by the
input kernel `W_in`) and the previous state `h_{t−1}` (by the recurrent kernel `W_rec`). In
stock Keras the error crosses both products backwards through the same kernels transposed, and
crosses *time* through `W_recᵀ`: weight transport twice over. Here, with `z_t` the pre-activation
of the gates,

    dx_t = dz_t · B_inᵀ          dh_{t−1} (through z_t) = dz_t · B_recᵀ

and the weight gradients `Σ_t x_tᵀ·dz_t` and `Σ_t h_{t−1}ᵀ·dz_t` are the stock ones. The gate
algebra (`σ`, `tanh`, `c_t = f⊙c_{t−1} + i⊙g`, GRU's reset gate) and the carry's path through
time keep their exact gradients: they hold no weight.

Each cell holds its two `(W, B)` pairs as `FeedbackLayer` sublayers, its *projections*
(`cell.input_projection`, `cell.recurrent_projection`, named `<layer>_input` and
`<layer>_recurrent`), and the bias in a third sublayer, so `stock_weights(cell)` is the stock
`[kernel, recurrent_kernel, bias]`. The mirror, Kolen–Pollack, the local losses and the
alignment metrics see the projections as they see any `FeedbackLayer`. Each projection's
`linear(x, kernel)` is one op bilinear in its input and kernel (a matmul, or a convolution for
`ConvLSTM`): the mirror draws noise of its input shape (`(n, input_dim)`, `(n, units)`) and its
link counts stay exact. GRU with `reset_after=False` applies its recurrent kernel to `h` for the
update and reset gates and to `r⊙h` for the candidate: its recurrent projection's op reads the
stacked input `[h, r⊙h]` (shape `(n, 2, units)`), the first row feeding the first `2·units`
columns, the second the last `units`.

The forward pass is the stock cell's, op for op (both `implementation`s, the dropout masks,
`reset_after`, `use_bias`): where the stock cell multiplies by a slice of a kernel, the twin
evaluates the projection's op restricted to those columns (`columns`), through the same
`(W, B)`, so outputs and (with `bp`) gradients are bit for bit the stock ones.

**One layer call, many time steps.** Keras runs the cell inside a `tf.while_loop`, once per
step. What a `FeedbackLayer` does once per call is done here once per *sequence*, outside the
loop: `W` and `B` are read (so the mirror finds the forward pass's read of `B` in the training
step's graph, and the loop captures one tensor instead of reading the variables at every step;
`W` is read in its own dtype and cast at every step, as the stock cell's per-step read is, so
under mixed precision the steps' weight gradients are summed in float32), `brsf`'s `B` is drawn
once (every step of a sequence uses the same `R_t`), the `[seed, step]` state advances once per
backward pass (on the gradient of `W`'s read, outside the loop: not while the kernel is frozen),
and the local loss of `sa`/`ia` is added once (`add_loss` cannot take a tensor from inside the
loop). The
local loss of a recurrent projection sees noise (one batch of the layer's batch size per call):
its real input, every step's `x_t` or `h_{t−1}`, exists only inside the loop, so
`feedback_input="real"` is refused for a loss that reads the input (`sa`'s default `self + decay`
does not). `dfa` is refused: its error reaches each layer's output directly, and `B_rec = 0`
would stop every error at the step it entered.

The sequence is opened and closed by the twin layers' `call`, and, for a twin cell inside a stock
`keras.layers.RNN` (or `StackedRNNCells`, `Bidirectional`), by the two methods `RNN.call` calls
on a `DropoutRNNCell` before and after its loop: `get_dropout_mask(first_step)` opens it and
`reset_dropout_mask()` closes it (`_FeedbackCell`). A cell called on its own opens and closes a
sequence around its call. The twins never take the fused cuDNN path (`use_cudnn=False`): it
computes the whole sequence without calling the cell.

One module per family, as in Keras: `simple_rnn`, `lstm`, `gru`, `conv_lstm`; what they share
in `base` (the sequence, `_FeedbackCell`, `_FeedbackRNN`) and `projections` (the cell's
`FeedbackLayer` projections and bias).
"""

from keras_wt.layers.recurrent.simple_rnn import SimpleRNN
from keras_wt.layers.recurrent.simple_rnn import SimpleRNNCell
from keras_wt.layers.recurrent.lstm import LSTM
from keras_wt.layers.recurrent.lstm import LSTMCell
from keras_wt.layers.recurrent.gru import GRU
from keras_wt.layers.recurrent.gru import GRUCell
from keras_wt.layers.recurrent.conv_lstm import ConvLSTM1D
from keras_wt.layers.recurrent.conv_lstm import ConvLSTM2D
from keras_wt.layers.recurrent.conv_lstm import ConvLSTM3D
from keras_wt.layers.recurrent.conv_lstm import ConvLSTMCell

__all__ = [
    "SimpleRNN", "SimpleRNNCell", "LSTM", "LSTMCell", "GRU", "GRUCell", "ConvLSTM1D",
    "ConvLSTM2D", "ConvLSTM3D", "ConvLSTMCell",
]
