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
import numpy as np
import tensorflow as tf

from keras_wt import _compat
from keras_wt import algorithms
from keras_wt import feedback as feedback_lib
from keras_wt import local
from keras_wt.layers.arguments import WithFeedback


class _KolenPollackGuard:
    """Kernel constraint of a `kp` layer: every Keras optimizer applies a variable's constraint
    after updating it, so an optimizer other than KolenPollack is caught the first time it
    updates the kernel (when the train step is traced), before B could silently stay fixed.

    It is also how `keras_wt.optimizers.KolenPollack.build`, which is given variables and no
    model, finds the `kp` kernels among them and their layers (`layer`: a weak reference, so the
    constraint keeps no layer alive): Keras's own `variable.constraint`, set in `build`.
    """

    def __init__(self, layer, constraint):
        self.layer_name = layer.name
        self.layer = weakref.ref(layer)
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
        # What trains B when the optimizer does not: `keras_wt.mirror.WeightMirror` sets itself
        # here. A layer whose B learns by mirroring warns when its backward pass is built
        # without one (`_check_feedback_learner`).
        self.feedback_learner = None
        # {graph: {id(replica context): (context, [tensors])}}: the values of a mirror-learned
        # `B` known in each function being traced (`read_feedback_kernel`, `feedback_values`),
        # forgotten with the graph. A plain attribute, past Keras's and TF's attribute tracking.
        object.__setattr__(self, "_traced_feedback", weakref.WeakKeyDictionary())

    def build(self, input_shape):
        super().build(input_shape)
        self.build_feedback(input_shape)

    def build_feedback(self, input_shape):
        """Creates what feedback adds to the built stock layer: `B` (when the algorithm stores
        one and `feedback_used`), the Kolen–Pollack guard on the kernel, the per-step state,
        and `feedback_input_shape`.

        Called by `build` after the stock build, and by `keras_wt.convert` on a built stock
        layer that it turns into this class in place (`keras_wt.nested`), with the shape the
        stock layer was built with.
        """
        self.feedback_input_shape = tuple(input_shape)
        kernel = self.kernel
        if self.algorithm.learns_feedback == "optimizer":
            kernel.constraint = _KolenPollackGuard(self, kernel.constraint)
        if self.algorithm.stores_feedback and self.feedback_used:
            self.feedback_kernel = self.add_weight(
                name="feedback_kernel",
                shape=kernel.shape,
                initializer=self.feedback_initializer or self.default_feedback_initializer(),
                # A B that learns from a local loss is updated by the model's optimizer.
                trainable=self.feedback_learning == "loss",
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
        value = tf.convert_to_tensor(self.feedback_kernel.value)
        if self.feedback_learning == "mirror" and tf.inside_function():
            self._traced_values(create=True).append(value)
        return value

    def feedback_values(self):
        """The tensors holding `B`'s current value in the function and replica being traced:
        the layer's reads of `B` there, or the value a mirror step assigned there last (`[]`:
        none, read the variable)."""
        if not tf.inside_function():
            return []
        return list(self._traced_values())

    def set_feedback_value(self, value):
        """Records `value`, just assigned to `B` in the function being traced, as `B`'s value
        there (what `feedback_values` returns until the next read)."""
        if tf.inside_function():
            self._traced_values(create=True)[:] = [value]

    def _traced_values(self, create=False):
        # Per graph being traced and per replica: each replica of a MirroredStrategy traces
        # the step in its own context (and thread), into the same graph.
        graph = tf.compat.v1.get_default_graph()
        context = tf.distribute.get_replica_context()
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
        input shape without the batch axis (`feedback_input_shape[1:]`), exactly, where every
        dimension is known.

        A dimension still unknown (`None`: the sequence length of a keras-hub Transformer) is 1
        when the layer's linear op maps the slices of its input along that axis independently,
        each with the same kernel: every axis but the last for `Dense`, the input axes that reach
        the output without meeting the kernel for `EinsumDense`. The mirror's step is then the
        same average whatever the length, since its link counts `C` come from the same shape.
        Which axes qualify is found from `linear` itself (on random inputs, the output of a
        length-2 input must be the outputs of its two slices, side by side), so no layer type
        needs code of its own.

        Raises:
            ValueError: an unknown dimension that the linear op mixes (a convolution's spatial
                axes): the noise needs its size.
        """
        shape = self.feedback_input_shape
        if shape is None:
            raise ValueError(
                f"Layer {self.name!r} is not built: the weight mirror's noise has the shape of its "
                "input. Call the model on a batch first (the build() of a subclassed model does "
                "not build the layers it holds; a call does)."
            )
        shape = tuple(shape[1:])
        unknown = [axis for axis, size in enumerate(shape) if size is None]
        for axis in unknown:
            if not _slices_independent(self, shape, axis):
                raise ValueError(
                    f"Layer {self.name!r} has input shape {tuple(self.feedback_input_shape)}: the "
                    f"weight mirror's noise needs the size of axis {axis + 1}, which the layer's "
                    "linear op mixes across positions (the spatial axes of a convolution). Give "
                    "the model a fixed input size (e.g. keras.Input((32, 32, 3)))."
                )
        return tuple(1 if size is None else size for size in shape)

    def feedback_seed(self):
        """The `[seed, step]` of this step's random draws (a stateless RNG seed)."""
        return tf.convert_to_tensor(self.feedback_state.value)

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
        kernel = tf.convert_to_tensor(kernel)
        # A measurement (keras_wt.alignment) is not a training step: decided here, since its
        # backward pass runs after the tap is closed.
        tap = feedback_lib.linear_tap()
        feedback = None
        if self.feedback_used:
            feedback = self.feedback_tensor(kernel)
            outputs = feedback_lib.linear_with_feedback(
                self.linear,
                inputs,
                kernel,
                feedback,
                on_backward=self._on_backward if tap is None else None,
            )
        else:  # no error is sent below this layer: none is computed
            outputs = self.linear(tf.stop_gradient(inputs), kernel)
        if tap is not None:
            outputs = tap(self, outputs)
        elif (self.feedback_learning == "loss" and self.feedback_used
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
        return outputs

    def _local_input(self, inputs):
        """What `B`'s local loss sees: the layer's input, or standard normal noise of its shape
        drawn from `feedback_state` (`feedback_input="noise"`; under `tf.distribute`, from the
        state and the replica: every replica draws its own share of the noise)."""
        if self.resolved_feedback_input == "noise":
            seed = self.feedback_seed()
            replica = tf.distribute.get_replica_context()
            if replica is not None and replica.num_replicas_in_sync > 1:
                # Each replica draws its own share of the noise batch.
                seed = tf.random.experimental.stateless_fold_in(
                    seed, replica.replica_id_in_sync_group
                )
            noise = algorithms.stateless_normal(tf.shape(inputs), seed)
            return tf.cast(noise, inputs.dtype)
        return inputs

    def _on_backward(self):
        self._check_feedback_learner()
        if self.feedback_state is not None:
            self.feedback_state.assign_add(tf.constant([0, 1], tf.int64))

    def _check_feedback_learner(self):
        """Warns when an error is sent down through a `B` that should learn by mirroring but
        that no weight mirror trains (it would stay at its random start: feedback alignment).
        Measuring deltas (`keras_wt.alignment`) is not training and is not checked."""
        if (
            self.feedback_learning == "mirror"
            and self.feedback_learner is None
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


def _slices_independent(layer, sample_shape, axis):
    """Whether `layer.linear` maps the slices of a sample along `axis` (of `sample_shape`, no
    batch axis) independently and alike: on a sample of length 2 there (1 on other unknown axes),
    its output is the outputs of the two slices, concatenated along the one output axis that has
    length 2 where a slice's has length 1. Inputs and kernel are Gaussian (so no sum cancels by
    chance), compared to float32 rounding. Computed eagerly, also while a function is traced."""
    rng = np.random.RandomState(0)
    shape = [1] + [1 if size is None else size for size in sample_shape]
    shape[axis + 1] = 2
    with tf.init_scope():
        x = tf.constant(rng.standard_normal(shape), tf.float32)
        kernel = tf.constant(rng.standard_normal(tuple(layer.kernel.shape)), tf.float32)
        try:
            whole = layer.linear(x, kernel)
            parts = [layer.linear(_slice(x, axis + 1, i), kernel) for i in range(2)]
        except (ValueError, tf.errors.OpError):  # e.g. a "valid" window wider than 2
            return False
        whole_shape, part_shape = tuple(whole.shape), tuple(parts[0].shape)
        if tuple(parts[1].shape) != part_shape or len(whole_shape) != len(part_shape):
            return False
        differ = [i for i, (a, b) in enumerate(zip(whole_shape, part_shape)) if a != b]
        if len(differ) != 1 or (whole_shape[differ[0]], part_shape[differ[0]]) != (2, 1):
            return False
        joined = tf.concat(parts, axis=differ[0])
        whole, joined = whole.numpy(), joined.numpy()
        return bool(np.allclose(whole, joined, rtol=1e-5, atol=1e-5 * np.abs(whole).max()))


def _slice(x, axis, index):
    """`x` restricted to `index` along `axis` (the axis kept, with length 1)."""
    return tf.gather(x, [index], axis=axis)


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
