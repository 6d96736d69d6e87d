"""The machinery every recurrent twin shares: a sequence's state (`_Sequence`, `_Step`: the
kernels read once per sequence, the local losses, the backward notification), the twin cell
(`_FeedbackCell`: its projections and bias, the sequence it opens and closes) and the twin layer
(`_FeedbackRNN`: the twin cell in place of the stock one), and the rules they refuse
(`keras_wt.layers.recurrent`'s docstring)."""

import contextlib
import functools
import threading

from keras import ops

from keras_wt import _compat
from keras_wt import backend
from keras_wt import feedback as feedback_lib
from keras_wt import local
from keras_wt.algorithms import Learning
from keras_wt.layers.arguments import WithFeedback
from keras_wt.layers.arguments import _Twin
from keras_wt.layers.recurrent.projections import _Bias


# The local-loss primitives that read the layer's input (keras_wt.local).
_READS_INPUT = ("amp", "null", "sparse")


def _notify_backward(x, callback):
    """`x`, calling `callback()` when its gradient is built (once per backward pass)."""

    @backend.custom_gradient
    def identity(x):
        def grad(dy):
            callback()
            return dy

        return backend.identity(x), grad

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
        self.forward_hooks = []
        for projection in cell.projections:
            kernel = _compat.read_without_autocast(projection.kernel)
            feedback = None
            if projection.feedback_used:
                feedback = projection.feedback_tensor(ops.cast(kernel, self.compute_dtype))
            if feedback is not None and not self.tapped and (
                projection.feedback_learning == Learning.MIRROR
                or projection.feedback_state is not None
            ):
                # FeedbackLayer's own backward hook (advance `[seed, step]`, check for a
                # mirror), here once per backward pass, not once per time step.
                if not backend.STATELESS:
                    kernel = _notify_backward(kernel, projection._on_backward)
                else:  # at the end of the forward pass (FeedbackLayer._on_backward_in_forward)
                    self.forward_hooks.append(projection)
            self.kernels[projection] = (kernel, feedback)

    def step(self):
        return _Step(self)

    def add_local_losses(self):
        """`sa`/`ia` (and `wm` with a loss): each projection's local alignment loss, once per
        call, on noise of the projection's input shape (FeedbackLayer.linear_with_feedback);
        then the backward hooks that run in the forward pass (JAX)."""
        if self.tapped:
            return
        self._add_local_losses()
        for projection in self.forward_hooks:
            projection._on_backward_in_forward(self.kernels[projection][1])

    def _add_local_losses(self):
        for projection, (kernel, feedback) in self.kernels.items():
            if projection.feedback_learning != Learning.LOSS or feedback is None:
                continue
            kernel = ops.cast(kernel, self.compute_dtype)
            coefficients = projection.local_loss_coefficients
            coefficients.setdefault("decay", 0.0)  # B's update waits for this read by data
            shape = [self.batch_size] + list(projection.feedback_input_shape[1:])
            x = projection._local_input(ops.zeros(shape, kernel.dtype))
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
            self.kernels[projection] = (ops.cast(kernel, self.sequence.compute_dtype), feedback)
        return self.kernels[projection]

    def read_once(self, projection):
        """Where the stock cell splits a kernel it has read once for the step (LSTM's
        `implementation=1`), its pieces' weight gradients meet in one tensor per step before
        they are summed over the steps: eagerly, TensorFlow sums gradients in groups, and the
        same grouping keeps `bp` bit for bit (`backend.identity`)."""
        kernel, feedback = self._kernel(projection)
        self.kernels[projection] = (backend.identity(kernel), feedback)

    def project(self, projection, x, start=None, stop=None):
        """The projection's op on `x` (restricted to the columns `start:stop` if given), with
        its input gradient through `B`."""
        kernel, feedback = self._kernel(projection)
        if start is None:
            op = projection.linear
        else:
            op = functools.partial(projection.columns, start=start, stop=stop)
        if not projection.feedback_used:
            y = op(ops.stop_gradient(x), kernel)
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
            self.probes[projection] = tap(projection, ops.pad(0.0 * y, padding))
        index = [slice(None)] * len(y.shape)
        index[axis] = slice(start, stop)
        return y + self.probes[projection][tuple(index)]


def _check_feedback(layer):
    """The rules and options the recurrent layers refuse (see `keras_wt.layers.recurrent`'s
    docstring)."""
    if layer.algorithm.direct:
        raise ValueError(
            f"feedback={layer.feedback!r} is not supported by the recurrent layers (layer "
            f"{layer.name!r}): direct feedback sends the output error to each layer's output, "
            "and with no error crossing the recurrent kernel (B_rec = 0) every error would stop "
            "at the time step it entered. Use another rule, or keep this layer on 'bp'."
        )
    reads_input = [p for p in layer.local_loss_coefficients if p in _READS_INPUT]
    if (layer.feedback_learning == Learning.LOSS and layer.resolved_feedback_input == "real"
            and reads_input):
        raise ValueError(
            f"feedback_input='real' is not supported by the recurrent layers (layer "
            f"{layer.name!r}, feedback={layer.feedback!r}: the primitives {reads_input} read the "
            "input): the real inputs of its kernels, x_t and h_(t-1) at every time step, exist "
            "only inside the time loop, and the local loss is added once per call, outside it. "
            "Use feedback_input='noise'."
        )


class _FeedbackCell(_Twin, WithFeedback):
    """A stock cell whose kernels are `FeedbackLayer` projections (the package docstring).

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
            self.open_sequence(ops.shape(step_input)[0], "hook")
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
        with self.sequence_scope(ops.shape(inputs)[0], "call"):
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
        with self.cell.sequence_scope(ops.shape(sequences)[0], "layer"):
            return super().call(
                sequences, initial_state=initial_state, mask=mask, training=training
            )
