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
"""

import contextlib
import functools
import threading

import keras
import tensorflow as tf

from keras_wt import _compat
from keras_wt import feedback as feedback_lib
from keras_wt import local
from keras_wt.layers.base import WithFeedback
from keras_wt.layers.base import _channel_axis
from keras_wt.layers.base import _Twin
from keras_wt.layers.convolutional import Conv1D
from keras_wt.layers.convolutional import Conv2D
from keras_wt.layers.convolutional import Conv3D
from keras_wt.layers.core import Dense

# The local-loss primitives that read the layer's input (keras_wt.local).
_READS_INPUT = ("amp", "null", "sparse")


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


def _notify_backward(x, callback):
    """`x`, calling `callback()` when its gradient is built (once per backward pass)."""

    @tf.custom_gradient
    def identity(x):
        def grad(dy):
            callback()
            return dy

        return tf.identity(x), grad

    return identity(x)


class _Sequence:
    """What a cell computes once per layer call (outside the time loop) for its projections:
    `W` (read in its own dtype; each step casts it, as the stock cell's per-step read does), `B`
    in the compute dtype (`None`: exact backprop), and at the end the local losses."""

    def __init__(self, cell, batch_size, owner):
        self.owner = owner
        self.batch_size = batch_size
        self.compute_dtype = cell.compute_dtype
        self.tapped = feedback_lib.linear_tap() is not None
        self.kernels = {}
        for projection in cell.projections:
            kernel = _compat.read_without_autocast(projection.kernel)
            feedback = None
            if projection.feedback_used:
                feedback = projection.feedback_tensor(tf.cast(kernel, self.compute_dtype))
            if feedback is not None and not self.tapped and (
                projection.feedback_learning == "mirror" or projection.feedback_state is not None
            ):
                # FeedbackLayer's own backward hook (advance `[seed, step]`, check for a
                # mirror), here once per backward pass, not once per time step.
                kernel = _notify_backward(kernel, projection._on_backward)
            self.kernels[projection] = (kernel, feedback)

    def step(self):
        return _Step(self)

    def add_local_losses(self):
        """`sa`/`ia` (and `wm` with a loss): each projection's local alignment loss, once per
        call, on noise of the projection's input shape (FeedbackLayer.linear_with_feedback)."""
        if self.tapped:
            return
        for projection, (kernel, feedback) in self.kernels.items():
            if projection.feedback_learning != "loss" or feedback is None:
                continue
            kernel = tf.cast(kernel, self.compute_dtype)
            coefficients = projection.local_loss_coefficients
            coefficients.setdefault("decay", 0.0)  # B's update waits for this read by data
            shape = [self.batch_size] + list(projection.feedback_input_shape[1:])
            x = projection._local_input(tf.zeros(tf.stack(shape), kernel.dtype))
            projection.add_loss(local.gradient_only(
                local.alignment_loss(projection, x, kernel, feedback, coefficients)
            ))


class _Step:
    """One time step: applies the projections with the sequence's `W` and `B`."""

    def __init__(self, sequence):
        self.sequence = sequence
        self.kernels = {}
        self.probes = {}

    def _kernel(self, projection):
        """`W` in the compute dtype for this step, and `B`."""
        if projection not in self.kernels:
            kernel, feedback = self.sequence.kernels[projection]
            self.kernels[projection] = (tf.cast(kernel, self.sequence.compute_dtype), feedback)
        return self.kernels[projection]

    def read_once(self, projection):
        """Where the stock cell splits a kernel it has read once for the step (LSTM's
        `implementation=1`), its pieces' weight gradients meet in one tensor per step before
        they are summed over the steps: eagerly, TensorFlow sums gradients in groups, and the
        same grouping keeps `bp` bit for bit."""
        kernel, feedback = self._kernel(projection)
        self.kernels[projection] = (tf.identity(kernel), feedback)

    def project(self, projection, x, start=None, stop=None):
        """The projection's op on `x` (restricted to the columns `start:stop` if given), with
        its input gradient through `B`."""
        kernel, feedback = self._kernel(projection)
        if start is None:
            op = projection.linear
        else:
            op = functools.partial(projection.columns, start=start, stop=stop)
        if not projection.feedback_used:
            y = op(tf.stop_gradient(x), kernel)
        else:
            y = feedback_lib.linear_with_feedback(op, x, kernel, feedback)
        if not self.sequence.tapped:
            return y
        tap = feedback_lib.linear_tap()
        if start is None:
            return tap(projection, y)
        # A measurement (keras_wt.alignment) takes the gradient with respect to the whole linear
        # output; the pieces the cell computes separately each add their slice of one zero probe
        # of that shape, whose gradient is the delta. The probe is `0·y` of the first piece,
        # padded: a tensor the measurement's tape records (a constant it would not).
        axis = projection.output_axis % len(y.shape)
        total = int(kernel.shape[-1])
        stop = total if stop is None else stop
        if projection not in self.probes:
            padding = [[0, 0]] * len(y.shape)
            padding[axis] = [start, total - stop]
            self.probes[projection] = tap(projection, tf.pad(0.0 * y, padding))
        index = [slice(None)] * len(y.shape)
        index[axis] = slice(start, stop)
        return y + self.probes[projection][tuple(index)]


def _check_feedback(layer):
    """The rules and options the recurrent layers refuse (see the module docstring)."""
    if layer.algorithm.direct:
        raise ValueError(
            f"feedback={layer.feedback!r} is not supported by the recurrent layers (layer "
            f"{layer.name!r}): direct feedback sends the output error to each layer's output, "
            "and with no error crossing the recurrent kernel (B_rec = 0) every error would stop "
            "at the time step it entered. Use another rule, or keep this layer on 'bp'."
        )
    reads_input = [p for p in layer.local_loss_coefficients if p in _READS_INPUT]
    if layer.feedback_learning == "loss" and layer.resolved_feedback_input == "real" and reads_input:
        raise ValueError(
            f"feedback_input='real' is not supported by the recurrent layers (layer "
            f"{layer.name!r}, feedback={layer.feedback!r}: the primitives {reads_input} read the "
            "input): the real inputs of its kernels, x_t and h_(t-1) at every time step, exist "
            "only inside the time loop, and the local loss is added once per call, outside it. "
            "Use feedback_input='noise'."
        )


class _FeedbackCell(_Twin, WithFeedback):
    """A stock cell whose kernels are `FeedbackLayer` projections (module docstring).

    `feedback_prefix` names the projections `<prefix>_input` and `<prefix>_recurrent`: the twin
    layers set it to their own name; otherwise it is the cell's path when it is built (e.g.
    `bidirectional_forward_rnn_lstm_cell` for a cell in `Bidirectional(RNN(cell))`), saved in its
    config so that a loaded model has the same names.

    Subclasses define `_projection_layers(input_shape, names, common)` (the input and recurrent
    projections, unbuilt, the bias shape and initializer), the projections' input shapes, and
    `_step_call(step, inputs, states, training)` (the stock call, with `step.project(...)` for
    every product by a kernel).
    """

    def __init__(self, *args, feedback_prefix=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.feedback_prefix = feedback_prefix

    def _init_feedback(self, *args, **kwargs):
        super()._init_feedback(*args, **kwargs)
        _check_feedback(self)
        # The open sequence of each thread (each replica of a MirroredStrategy runs its own).
        object.__setattr__(self, "_open", threading.local())

    def get_config(self):
        config = super().get_config()
        if self.feedback_prefix is not None:
            config["feedback_prefix"] = self.feedback_prefix
        return config

    # --- weights -----------------------------------------------------------------------------

    def build(self, input_shape):
        if self.feedback_prefix is None:
            self.feedback_prefix = (self.path or self.name).replace("/", "_")
        prefix = self.feedback_prefix
        common = dict(dtype=self.dtype_policy, **self.feedback_config())
        inputs, recurrent, bias_shape, bias_initializer = self._projection_layers(
            input_shape, (f"{prefix}_input", f"{prefix}_recurrent"), common
        )
        self.input_projection = inputs
        self.recurrent_projection = recurrent
        self.input_projection.build(self._input_projection_shape(input_shape))
        self.recurrent_projection.build(self._recurrent_projection_shape(input_shape))
        self.bias_layer = None
        if self.use_bias:
            self.bias_layer = _Bias(
                bias_shape, bias_initializer, self.bias_regularizer, self.bias_constraint,
                dtype=self.dtype_policy, name=f"{prefix}_bias",
            )
            self.bias_layer.build()

    @property
    def projections(self):
        return (self.input_projection, self.recurrent_projection)

    @property
    def kernel(self):
        return self.input_projection.kernel

    @property
    def recurrent_kernel(self):
        return self.recurrent_projection.kernel

    @property
    def bias(self):
        return None if self.bias_layer is None else self.bias_layer.bias

    def _projection_kwargs(self, which):
        """The stock cell's initializer, regularizer and constraint of kernel `which`."""
        return dict(
            kernel_initializer=getattr(self, f"{which}_initializer"),
            kernel_regularizer=getattr(self, f"{which}_regularizer"),
            kernel_constraint=getattr(self, f"{which}_constraint"),
        )

    # --- one sequence per layer call ---------------------------------------------------------

    def _sequence(self):
        return getattr(self._open, "sequence", None)

    def open_sequence(self, batch_size, owner):
        """Reads `W` and `B` of both projections for the coming time steps (outside the loop)."""
        sequence = _Sequence(self, batch_size, owner)
        self._open.sequence = sequence
        return sequence

    def close_sequence(self):
        """Ends the sequence: adds the local losses (outside the loop)."""
        sequence = self._sequence()
        self._open.sequence = None
        if sequence is not None:
            sequence.add_local_losses()

    @contextlib.contextmanager
    def sequence_scope(self, batch_size, owner):
        """Opens a sequence for the duration of a layer call (closed even on an error)."""
        self.open_sequence(batch_size, owner)
        try:
            yield
        except BaseException:
            self._open.sequence = None
            raise
        self.close_sequence()

    # `keras.layers.RNN.call` asks a DropoutRNNCell for its masks once before its time loop
    # (`_maybe_config_dropout_masks`) and resets them once after it: a stock RNN (or
    # Bidirectional, StackedRNNCells) around a twin cell opens and closes its sequence there.
    # The cells below take their masks from `_stock_dropout_mask`, so these run only then.
    def get_dropout_mask(self, step_input):
        sequence = self._sequence()
        if sequence is None or sequence.owner != "layer":
            self.open_sequence(tf.shape(step_input)[0], "hook")
        return self._stock_dropout_mask(step_input)

    def reset_dropout_mask(self):
        super().reset_dropout_mask()
        sequence = self._sequence()
        if sequence is not None and sequence.owner == "hook":
            self.close_sequence()

    def _stock_dropout_mask(self, step_input):
        return super().get_dropout_mask(step_input)

    def call(self, inputs, states, training=False):
        sequence = self._sequence()
        if sequence is not None:
            return self._step_call(sequence.step(), inputs, states, training)
        # Called on its own: the call is the sequence.
        with self.sequence_scope(tf.shape(inputs)[0], "call"):
            return self._step_call(self._sequence().step(), inputs, states, training)


def _check_cudnn(use_cudnn, name):
    if use_cudnn not in ("auto", False):
        raise ValueError(
            f"{name} takes use_cudnn='auto' or False (got {use_cudnn!r}): cuDNN's fused kernel "
            "computes the whole sequence without calling the cell, so its error would flow "
            "through W. The feedback twin always runs the cell (use_cudnn=False)."
        )


class _FeedbackRNN(_Twin, WithFeedback):
    """A stock recurrent layer whose cell is the feedback twin of its stock cell."""

    _cell_class = None

    def _init_feedback(self, *args, **kwargs):
        super()._init_feedback(*args, **kwargs)
        _check_feedback(self)
        # The stock constructor made a stock cell (not built: no weights yet); the twin takes
        # its place with the same config plus the feedback arguments.
        stock = self.cell
        config = stock.get_config()
        config.update(self.feedback_config())
        for key in ("implementation", "rank"):  # constructor arguments the stock config lacks
            if hasattr(stock, key):
                config[key] = getattr(stock, key)
        cell = self._cell_class.from_config(config)
        _compat.replace_sublayer(self, "cell", cell)
        cell.feedback_prefix = self.name

    def call(self, sequences, initial_state=None, mask=None, training=False):
        with self.cell.sequence_scope(tf.shape(sequences)[0], "layer"):
            return super().call(
                sequences, initial_state=initial_state, mask=mask, training=training
            )


# --- SimpleRNN ---------------------------------------------------------------------------------


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


# --- LSTM --------------------------------------------------------------------------------------


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


# --- GRU ---------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_wt")
class GRUCell(_FeedbackCell, keras.layers.GRUCell):
    """`keras.layers.GRUCell` whose error crosses its kernels through feedback kernels.

    `dx_t = dz_t·B_inᵀ`; the recurrent error crosses `B_rec` where the stock cell multiplies
    by the recurrent kernel: `h_{t−1}` for every gate with `reset_after=True`; with
    `reset_after=False`, `h_{t−1}` for the update and reset gates and `r⊙h_{t−1}` for the
    candidate (one op on `[h, r⊙h]`, see the module docstring). The gates keep their exact
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


# --- ConvLSTM ----------------------------------------------------------------------------------


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
