"""The Kolen–Pollack optimizer: identical updates and identical decay for W and B."""

import keras
from keras import ops

from keras_wt import _compat
from keras_wt import backend
from keras_wt import feedback as feedback_lib
from keras_wt import learners
from keras_wt.algorithms import Learning


class _Pairs:
    """Holds the `(W, B)` pairs of a `KolenPollack` optimizer out of Keras's attribute tracking:
    they are the model's variables, not optimizer state to save (a plain object is not
    tracked; a tuple of variables would be)."""

    pairs = ()
    kernels = ()


def _kp_kernels(var_list):
    """`[(W, layer)]`: the kernels among `var_list` of layers with `feedback="kp"`, and their
    layers, found in the registry where each `kp` layer records its kernel when it builds its
    feedback (`keras_wt.learners.layer_of_kernel`)."""
    found = []
    for variable in var_list:
        layer = learners.layer_of_kernel(variable)
        algorithm = getattr(layer, "algorithm", None)
        if algorithm is not None and algorithm.learns_feedback == Learning.OPTIMIZER:
            found.append((variable, layer))
    return found


@keras.saving.register_keras_serializable(package="keras_wt")
class KolenPollack(keras.optimizers.Optimizer):
    """Wraps any Keras optimizer so that Kolen–Pollack feedback kernels learn.

    For every layer with `feedback="kp"`, the forward kernel `W` and the feedback kernel `B`
    receive the identical update and the identical decoupled weight decay (DESIGN.md §2):

        W ← W − lr·u(g) − lr·λ·W
        B ← B − lr·u(g) − lr·λ·B

    where `u(g)` is whatever the wrapped optimizer makes of `g = ∂L/∂W` (SGD, momentum, Adam,
    any learning-rate schedule). Hence `B − W` shrinks by exactly `(1 − lr_t·λ)` at every step
    and the two kernels converge whatever the data.

    The wrapped optimizer updates every trainable variable as usual; only the kernels of
    `kp` layers are decayed (biases, batch norm and the kernels of other layers are not: give
    those a regularizer if you want one). `B` receives `u(g)` by copying `W`'s update, so no
    second optimizer state is kept for `B`: the persistent memory is exactly the wrapped
    optimizer's. `(1 − lr·λ)(B − W)` is kept in `B`'s own storage while `W` is updated, so a
    step holds no extra kernel-sized tensor beyond the one being written. A `kp` layer without a
    `B` (`feedback_used=False`, see `keras_wt.unused_feedback`) has its `W` decayed as usual.

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap. It must not apply weight decay of
            its own (that decay would reach `W` but not `B`); use `weight_decay` here instead.
        weight_decay: `λ`, the decoupled decay of `W` and `B` of `kp` layers, scaled by the
            current learning rate.
        name: optional name.

    Example:

    >>> optimizer = keras_wt.optimizers.KolenPollack(
    ...     keras.optimizers.SGD(0.1, momentum=0.9), weight_decay=1e-4)
    >>> model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    """

    def __init__(self, optimizer, weight_decay=0.0, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"KolenPollack does not take {sorted(kwargs)}: set them on the wrapped optimizer."
            )
        optimizer = keras.optimizers.get(optimizer)
        if isinstance(optimizer, KolenPollack):
            raise ValueError("KolenPollack cannot wrap another KolenPollack optimizer.")
        if getattr(optimizer, "weight_decay", None):
            raise ValueError(
                f"The wrapped optimizer {optimizer.name!r} has weight_decay="
                f"{optimizer.weight_decay}; its decay would reach W but not B. Pass "
                "weight_decay to KolenPollack instead and none to the wrapped optimizer."
            )
        if getattr(optimizer, "use_ema", False):
            raise ValueError(
                "KolenPollack does not support use_ema=True on the wrapped optimizer: at the end "
                "of fit Keras replaces W by its moving average but leaves B, which breaks B − W "
                "shrinking by (1 − lr·λ) per step. Average W and B yourself if you need it."
            )
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise ValueError(
                "KolenPollack does not support gradient_accumulation_steps on the wrapped "
                "optimizer (the decay of W and B would run on every micro-step); accumulate "
                "with a larger batch instead."
            )
        weight_decay = float(weight_decay or 0.0)
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.kp_weight_decay = weight_decay
        self._kp = _Pairs()

    def build(self, var_list):
        pairs, kernels = [], []
        for variable, layer in _kp_kernels(var_list):
            kernels.append(variable)
            if layer.feedback_kernel is not None:
                pairs.append((variable, layer.feedback_kernel))
        # (On JAX each B is trainable, `_apply_stateless`, but the wrapped optimizer keeps no
        # state for it: B copies W's update, as here.)
        feedbacks = {id(b) for _, b in pairs}
        self.inner_optimizer.build([v for v in var_list if id(v) not in feedbacks])
        self._kp.pairs = tuple(pairs)
        self._kp.kernels = tuple(kernels)
        super().build(var_list)

    @property
    def kp_pairs(self):
        """The `(W, B)` variable pairs this optimizer keeps in step."""
        return list(self._kp.pairs)

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        if trainable_variables is None:
            trainable_variables = _compat.built_variables(self)
        if not self._kp.kernels:
            # Refused at the first update, not when built: Keras also builds the optimizer of a
            # model it clones (`keras_wt.strip`, `convert`) or loads, which must still work.
            raise ValueError(
                f"KolenPollack was given {len(trainable_variables)} variables to train, and none "
                "is the kernel of a layer with feedback='kp': it would train the model as its "
                "wrapped optimizer does, with exact backprop or fixed feedback, without a word. "
                "Convert the model first (keras_wt.convert(model, 'kp')), or build it from "
                "keras_wt.layers with feedback='kp'; for other rules compile with the plain "
                "optimizer."
            )
        grads = list(grads)
        updated = {id(v) for v, g in zip(trainable_variables, grads) if g is not None}
        pairs = [(w, b) for w, b in self._kp.pairs if id(w) in updated]
        kernels = [w for w in self._kp.kernels if id(w) in updated]

        if backend.STATELESS:
            self._apply_stateless(grads, trainable_variables, pairs, kernels)
            return
        strategy = _compat.optimizer_strategy(self)
        # The learning rate of this step, read before the wrapped optimizer advances.
        lr = ops.cast(self.inner_optimizer.learning_rate, "float32")
        shrink = 1.0 - lr * self.kp_weight_decay
        feedbacks = [b for _, b in pairs]
        # Nothing below needs the gradients, so without this edge the graph executor runs it as
        # soon as W and B can be read, during the backward pass: every assignment then copies a
        # kernel that the backward pass still reads, while the activations are alive (ResNet-18:
        # a step's peak memory 1.30x stock Keras's with it, 0.93x without).
        # One barrier op waits for every gradient, and what must follow them waits for the
        # barrier: n + n control edges, not n·n (an edge from every gradient to every op of the
        # update made the first trace of a 150-convolution chain 5x fa's, DESIGN.md §2).
        gradients_done = backend.barrier([g for g in grads if g is not None], "kp_gradients_done")
        # B ← (1 − lr·λ)(B_t − W_t), written into B's own storage: no second kernel-sized
        # tensor stays alive while W is updated.
        with keras.name_scope("kp_difference"), backend.control_dependencies(gradients_done):
            differences = [
                ops.cast(shrink, b.dtype)
                * (backend.read_value(b.value) - backend.read_value(w.value))
                for w, b in pairs
            ]
        if pairs:
            backend.assign_on_every_replica(strategy, feedbacks, differences)
        # W is updated only after B − W is computed. Automatic control dependencies order the
        # *reads* of W before its updates, but a read may alias W's buffer, which the wrapped
        # optimizer then updates in place: without this edge the subtraction sometimes ran after
        # the update (under CPU load), B_t − W_{t+1} replaced B_t − W_t and B skipped the step.
        # (The barrier waits for every difference and, through them or directly, every gradient.)
        differences_done = backend.barrier(differences + gradients_done, "kp_differences_done")
        with backend.control_dependencies(differences_done):
            if self.kp_weight_decay and kernels:
                backend.assign_on_every_replica(strategy, kernels, [
                    ops.cast(shrink, w.dtype) * backend.read_value(w.value) for w in kernels
                ])
            with feedback_lib.kolen_pollack_update():
                self.inner_optimizer.apply(grads, trainable_variables)
        if pairs:
            # B_{t+1} = W_{t+1} + (1 − lr·λ)(B_t − W_t)  ≡  B_t − lr·u(g) − lr·λ·B_t: the same
            # sum, rounded as before. The reads of B and W follow their assignments above
            # (automatic control dependencies order the operations on each variable).
            backend.assign_on_every_replica(
                strategy,
                feedbacks,
                [backend.read_value(w.value) + backend.read_value(b.value) for w, b in pairs],
            )

    def _apply_stateless(self, grads, trainable_variables, pairs, kernels):
        """The same update where only the optimizer's trainable variables keep what it assigns
        (JAX, `keras_wt.backend.STATELESS`): there each `B` of a pair is a trainable variable,
        which this optimizer assigns and the wrapped one never sees (B's own gradient is
        ignored). The arithmetic is `apply`'s: `B_{t+1} = W_{t+1} + (1 − lr·λ)(B_t − W_t)`.
        (JAX orders by data: no edges are needed.)"""
        feedbacks = {id(b) for _, b in pairs}
        kept = [(g, v) for g, v in zip(grads, trainable_variables) if id(v) not in feedbacks]
        lr = ops.cast(self.inner_optimizer.learning_rate, "float32")
        shrink = 1.0 - lr * self.kp_weight_decay
        differences = [ops.cast(shrink, b.dtype) * (b.value - w.value) for w, b in pairs]
        if self.kp_weight_decay:
            for w in kernels:
                w.assign(ops.cast(shrink, w.dtype) * w.value)
        with feedback_lib.kolen_pollack_update():
            self.inner_optimizer.apply([g for g, _ in kept], [v for _, v in kept])
        for (w, b), difference in zip(pairs, differences):
            b.assign(w.value + difference)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def variables(self):
        return super().variables + self.inner_optimizer.variables

    # The wrapped optimizer saves and loads its own state as a child object of this one.
    def save_own_variables(self, store):
        for i, variable in enumerate(super().variables):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        for i, variable in enumerate(super().variables):
            variable.assign(store[str(i)])

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "weight_decay": self.kp_weight_decay,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(optimizer, **config)
