"""The feedback kernel `B` and the custom input gradient, as mixins of the stock layers.

`WithFeedback` (`keras_wt.layers.arguments`) holds the feedback arguments every keras_wt layer
takes (`FEEDBACK_ARGUMENTS`); `FeedbackLayer` adds, to a stock layer with one kernel `W` and one
linear op `linear(x, kernel)`, the feedback kernel `B` (W's shape) and the input gradient through
it (DESIGN.md §1). Every family module (`core`, `convolutional`, `attention`, ...) builds its
twins from these.
"""

import random
import warnings
import weakref

import keras
from keras import ops

from keras_wt import _compat
from keras_wt import algorithms
from keras_wt import backend
from keras_wt import feedback as feedback_lib
from keras_wt import learners
from keras_wt import local
from keras_wt.algorithms import Learning
from keras_wt.layers.arguments import WithFeedback
from keras_wt.layers.shapes import mirror_input_shape


class _KolenPollackGuard:
    """Kernel constraint of a `kp` layer: every Keras optimizer applies a variable's constraint
    after updating it, so an optimizer other than KolenPollack is caught the first time it
    updates the kernel (when the train step is traced), before B could silently stay fixed.
    It wraps the kernel's own constraint, which it applies after the check.

    (`keras_wt.optimizers.KolenPollack` finds the `kp` kernels and their layers through
    `keras_wt.learners.layer_of_kernel`, not through this constraint.)
    """

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


def _independent_initializer(kernel_initializer, **config_updates):
    """A fresh, unseeded copy of `kernel_initializer`: B must never equal W by construction."""
    config = keras.initializers.serialize(kernel_initializer)
    if isinstance(config, dict) and isinstance(config.get("config"), dict):
        config["config"]["seed"] = None
        config["config"].update(config_updates)
    return keras.initializers.deserialize(config)


class FeedbackLayer(WithFeedback):
    """Mixin adding the feedback kernel and the custom input gradient to a stock layer.

    Subclasses define `linear(x, kernel)`: the layer's map from its input to its output before
    bias and activation (a matmul, an einsum or a convolution), and call
    `self.linear_with_feedback(inputs, self.kernel)` in `call`.

    `feedback_used=False` (set by `keras_wt.unused_feedback.drop_unused_feedback` on a layer
    below which no weight needs an error, e.g. the first layer of a model; saved in the config):
    the layer stores no `B`, sends no error down (its input is read through `stop_gradient`, so
    no input gradient is computed), and no optimizer or mirror touches its feedback.
    """

    def __init__(self, *args, feedback_used=True, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(feedback_used, bool):
            raise ValueError(f"feedback_used={feedback_used!r} must be True or False")
        self.feedback_used = feedback_used

    def _init_feedback(self, *args, **kwargs):
        super()._init_feedback(*args, **kwargs)
        self.feedback_kernel = None
        # `[seed, step]` of the algorithms that draw random numbers per step (`brsf`, noise
        # inputs of local losses); the step advances at every backward pass.
        self.feedback_state = None
        # The input shape the layer was built with (dimensions unknown at build time filled in
        # by the first call): mirror noise is drawn with this shape.
        self.feedback_input_shape = None
        # {graph: {id(replica context): (context, [tensors])}}: the values of a mirror-learned
        # `B` known in each function being traced (`read_feedback_kernel`, `feedback_values`),
        # forgotten with the graph. A plain attribute, past Keras's and TF's attribute tracking.
        object.__setattr__(self, "_traced_feedback", weakref.WeakKeyDictionary())

    def build(self, input_shape):
        super().build(input_shape)
        self.build_feedback(input_shape)

    def build_feedback(self, input_shape):
        """Creates what feedback adds to the built stock layer: `B` (when the algorithm stores
        one and `feedback_used`), the Kolen–Pollack guard on the kernel and its registration
        (`keras_wt.learners.register_kernel`, how the KolenPollack optimizer finds it), the
        per-step state, and `feedback_input_shape`.

        Called by `build` after the stock build, and by `keras_wt.convert` on a built stock
        layer that it turns into this class in place (`keras_wt.nested`), with the shape the
        stock layer was built with.
        """
        self.feedback_input_shape = tuple(input_shape)
        kernel = self.kernel
        if self.algorithm.learns_feedback == Learning.OPTIMIZER:
            kernel.constraint = _KolenPollackGuard(self, kernel.constraint)
            learners.register_kernel(self)
        if self.algorithm.stores_feedback and self.feedback_used:
            self.feedback_kernel = self.add_weight(
                name="feedback_kernel",
                shape=kernel.shape,
                initializer=self.feedback_initializer or self.default_feedback_initializer(),
                # A B that learns from a local loss is updated by the model's optimizer; a
                # Kolen-Pollack B is trainable where only the optimizer's trainable variables
                # keep what it assigns (JAX: KolenPollack._apply_stateless writes it).
                trainable=self.feedback_learning == Learning.LOSS or (
                    self.feedback_learning == Learning.OPTIMIZER and backend.STATELESS),
                # Every replica computes the same update of B; this makes any assignment of
                # B in a replica context take one replica's value for all.
                aggregation="only_first_replica",
                # Read at full precision (`read_feedback_kernel`); the rules cast it.
                autocast=False,
            )
        if self.algorithm.steps and self.feedback_used:
            self.feedback_state = self.add_weight(
                name="feedback_state",
                shape=(2,),
                dtype="int64",
                initializer=keras.initializers.Constant([random.getrandbits(31), 0]),
                trainable=False,
                aggregation="only_first_replica",
            )

    def read_feedback_kernel(self):
        """`B`'s value (in `B`'s own dtype), read for one call of the layer.

        Inside a traced function the reads of a `B` that learns by mirroring are kept, per
        graph and replica, for the mirror step that ends the same training step
        (`feedback_values`): that step computes `B`'s new value from these very tensors, so its
        assignment waits for them by data. Ordered only by an automatic control edge, the
        assignment sometimes ran before the forward pass's read (about 1 run in 10 on CPU, with
        several steps per call): the error went down through the `B` of the step after.
        """
        value = backend.read_value(self.feedback_kernel)
        if self.feedback_learning == Learning.MIRROR and backend.in_graph():
            self._traced_values(create=True).append(value)
        return value

    def feedback_values(self):
        """The tensors holding `B`'s current value in the function and replica being traced:
        the layer's reads of `B` there, or the value a mirror step assigned there last (`[]`:
        none, read the variable)."""
        if not backend.in_graph():
            return []
        return list(self._traced_values())

    def set_feedback_value(self, value):
        """Records `value`, just assigned to `B` in the function being traced, as `B`'s value
        there (what `feedback_values` returns until the next read)."""
        if backend.in_graph():
            self._traced_values(create=True)[:] = [value]

    def _traced_values(self, create=False):
        # Per graph being traced and per replica: each replica of a MirroredStrategy traces
        # the step in its own context (and thread), into the same graph.
        graph = backend.trace_key()
        context = backend.replica_context()
        by_context = self._traced_feedback.get(graph)
        if by_context is None:
            if not create:
                return []
            by_context = self._traced_feedback[graph] = {}
        kept = by_context.get(id(context))
        if kept is None or kept[0] is not context:
            if not create:
                return []
            kept = by_context[id(context)] = (context, [])
        return kept[1]

    @property
    def mirror_input_shape(self):
        """The shape of one sample of the weight mirror's noise (`keras_wt.mirror`): the layer's
        input shape without the batch axis, its unknown dimensions resolved as
        `keras_wt.layers.shapes.mirror_input_shape` says (raises a `ValueError` where they
        cannot be)."""
        return mirror_input_shape(self)

    def feedback_seed(self):
        """The `[seed, step]` of this step's random draws (a stateless RNG seed)."""
        return backend.read_value(self.feedback_state)

    def default_feedback_initializer(self):
        """The initializer of `B` when `feedback_initializer` is `None`: the kernel's, unseeded."""
        return _independent_initializer(self.kernel_initializer)

    @property
    def feedback_fan_out(self):
        """How many outputs each input unit feeds through the kernel (sign symmetry's scale):
        `out` for Dense, `k1·…·kn·c_out` for a convolution."""
        return algorithms.fan_out(self.kernel.shape)

    def feedback_tensor(self, kernel):
        """The tensor standing in for `kernel` in the input gradient (`None`: exact backprop)."""
        if feedback_lib.backprop_forced():
            return None
        return self.algorithm.feedback(self, kernel)

    def linear_with_feedback(self, inputs, kernel):
        """`self.linear(inputs, kernel)` with the algorithm's input gradient."""
        shape = tuple(inputs.shape)
        if None in self.feedback_input_shape[1:] and None not in shape[1:]:
            # A layer built without knowing every dimension (the output projection of an
            # attention layer is built for any sequence length) learns it from its first call.
            self.feedback_input_shape = (None,) + shape[1:]
        kernel = backend.read_value(kernel)
        # A measurement (keras_wt.alignment) is not a training step: decided here, since its
        # backward pass runs after the tap is closed.
        tap = feedback_lib.linear_tap()
        feedback = None
        if self.feedback_used:
            feedback = self.feedback_tensor(kernel)
            on_backward = self._on_backward if tap is None else None
            outputs = feedback_lib.linear_with_feedback(
                self.linear,
                inputs,
                kernel,
                feedback,
                on_backward=None if backend.STATELESS else on_backward,
            )
        else:  # no error is sent below this layer: none is computed
            outputs = self.linear(ops.stop_gradient(inputs), kernel)
        if tap is not None:
            outputs = tap(self, outputs)
        elif (self.feedback_learning == Learning.LOSS and self.feedback_used
              and not feedback_lib.backprop_forced()):
            # Zero-valued, with B's gradient: the model's optimizer applies it and the reported
            # losses stay the task's (keras_wt.local.gradient_only). The model's optimizer
            # updates B in place, possibly while the backward pass still reads this step's B:
            # without an order between them ~1 step in 8 (CPU) sent its error through the
            # updated B. So the loss reads B through the very tensor the backward pass uses,
            # and B's gradient always reads that tensor's value (`decay`, with coefficient 0
            # unless given: the same gradient, exactly), so B's update waits for it by data.
            coefficients = self.local_loss_coefficients
            coefficients.setdefault("decay", 0.0)
            self.add_loss(local.gradient_only(local.alignment_loss(
                self, self._local_input(inputs), kernel, feedback, coefficients,
            )))
        if self.feedback_used and on_backward is not None and backend.STATELESS:
            self._on_backward_in_forward(feedback)
        return outputs

    def _on_backward_in_forward(self, feedback):
        """Where a backward pass cannot assign variables (JAX: Keras's trainer returns only what
        the forward pass and the optimizer assign), what `_on_backward` does runs at the end of
        a training call's forward pass instead, after every read of this step's `[seed, step]`:
        the same sequence of seeds, one per training step."""
        if feedback is not None and _compat.in_training_call():
            self._on_backward()

    def _local_input(self, inputs):
        """What `B`'s local loss sees: the layer's input, or standard normal noise of its shape
        drawn from `feedback_state` (`feedback_input="noise"`; under a distribution strategy,
        from the state and the replica: every replica draws its own share of the noise)."""
        if self.resolved_feedback_input == "noise":
            seed = self.feedback_seed()
            replica = backend.replica_context()
            if replica is not None and replica.num_replicas_in_sync > 1:
                # Each replica draws its own share of the noise batch.
                seed = backend.fold_in(seed, replica.replica_id_in_sync_group)
            noise = backend.stateless_normal(ops.shape(inputs), seed)
            return ops.cast(noise, inputs.dtype)
        return inputs

    def _on_backward(self):
        self._check_feedback_learner()
        if self.feedback_state is not None:
            self.feedback_state.assign_add(ops.convert_to_tensor([0, 1], "int64"))

    def _check_feedback_learner(self):
        """Warns when an error is sent down through a `B` that should learn by mirroring but
        that no weight mirror trains (none is attached to the layer: `keras_wt.learners`), so it
        would stay at its random start (feedback alignment). Measuring deltas
        (`keras_wt.alignment`) is not training and is not checked."""
        if (
            self.feedback_learning == Learning.MIRROR
            and learners.learner_of(self) is None
            and feedback_lib.linear_tap() is None
        ):
            warnings.warn(
                f"Layer {self.name!r} has feedback={self.feedback!r}, but no weight mirror trains "
                "its feedback kernel, so it stays at its random start and the layer trains as "
                "feedback alignment. Pass keras_wt.callbacks.MirrorCallback(...) to fit (before "
                "other callbacks), or step a keras_wt.mirror.WeightMirror in your training loop.",
                UserWarning,
                stacklevel=2,
            )

    def get_config(self):
        config = super().get_config()
        if not self.feedback_used:  # written only when set, so other configs stay as they were
            config["feedback_used"] = False
        return config

    def _forward_variables(self):
        return [self.kernel] + ([] if self.bias is None else [self.bias])

    # Saved as the stock Dense/Conv/EinsumDense save theirs ("0": kernel, "1": bias), plus
    # "feedback_kernel"; LoRA and quantization, which change that layout, are refused above.
    def save_own_variables(self, store):
        if not self.built:
            return
        for i, variable in enumerate(self._forward_variables()):
            store[str(i)] = variable
        for name, variable in self.feedback_variables():
            store[name] = variable

    def feedback_variables(self):
        """`[(name, variable)]` of the layer's feedback variables (`feedback_kernel`,
        `feedback_state`): what the stock twin does not have."""
        return [(name, variable) for name, variable in (
            ("feedback_kernel", self.feedback_kernel), ("feedback_state", self.feedback_state)
        ) if variable is not None]

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._forward_variables()
        expected = [str(i) for i in range(len(variables))]
        expected += [name for name, _ in self.feedback_variables()]
        keys = sorted(store.keys())
        if not self.feedback_used:
            # Saved before its feedback was dropped as unused (keras_wt.unused_feedback): a B
            # (or a per-step state) that no gradient uses is left behind; the rest must match.
            keys = [k for k in keys if k not in ("feedback_kernel", "feedback_state")]
        if keys != sorted(expected):
            raise ValueError(
                f"Layer {self.name!r} (feedback={self.feedback!r}) expected the variables "
                f"{expected} but the file has {sorted(store.keys())}: was it saved with another "
                "feedback algorithm? Load it with that one, then keras_wt.convert it."
            )
        variables += [variable for _, variable in self.feedback_variables()]
        for key, variable in zip(expected, variables):
            variable.assign(store[key])


def _add_bias_and_activate(layer, outputs, channel_axis=None):
    """The stock tail of every layer: `+ bias` (along `channel_axis`), then the activation."""
    if layer.bias is not None:
        bias = layer.bias
        if channel_axis is not None:
            shape = [1] * len(outputs.shape)
            shape[channel_axis] = bias.shape[0]
            bias = keras.ops.reshape(bias, tuple(shape))
        outputs = keras.ops.add(outputs, bias)
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs


def _channel_axis(layer):
    return -1 if layer.data_format == "channels_last" else 1


def stock_weights(layer):
    """`layer.weights` without the feedback kernels: the weights its stock twin has, in the
    stock twin's order (for a stock layer, all its weights)."""
    feedback = {
        id(variable)
        for sublayer in _compat.flatten_layers(layer)
        if isinstance(sublayer, FeedbackLayer)
        for _, variable in sublayer.feedback_variables()
    }
    return [weight for weight in getattr(layer, "weights", ()) if id(weight) not in feedback]
