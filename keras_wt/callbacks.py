"""Callbacks: mirror steps for the weight mirror, alignment angles into `logs`."""

import keras
import numpy as np
from keras import ops

from keras_wt import _compat
from keras_wt import alignment
from keras_wt import backend
from keras_wt import mirror as mirror_lib


def mirrors_in_train_step(in_train_step, every, replicas):
    """Whether a `MirrorCallback(in_train_step=..., every=...)` runs its mirror steps inside the
    training step on `replicas` replicas: asked for, and either a step after every batch or one
    replica. (`every > 1` needs a condition around the replicas' all-reduce, which
    `MirroredStrategy` cannot run inside a training step, as Keras's own
    `steps_per_execution > 1` cannot there, keras-team/keras#19246.)"""
    return bool(in_train_step) and (every == 1 or replicas == 1)


@keras.saving.register_keras_serializable(package="keras_wt")
class MirrorCallback(mirror_lib.MirrorSettings, keras.callbacks.Callback):
    """Runs weight-mirror steps on every `wm` layer between training steps.

    `steps` mirror steps run after every `every` training batches, and `warmup_steps` before
    the first training step (only when the optimizer has not taken a step yet, so a resumed
    run does not warm up twice). Each step draws noise of every layer's real input shape and applies
    `ΔB = η·∇_W(½‖f_W(x)‖²)⊘(n·C) − η·λ·B` (see `keras_wt.mirror`; `C` counts the real-input
    positions of each kernel entry, so `B → (σ²/λ)·W` with any padding). The noise is seeded by
    the optimizer's step count (warm-up steps use negative counters), so a run resumed from a
    checkpoint continues exactly.

    With `W` frozen, a layer's `B` settles at an angle `θ` from `W` with
    `tan θ ≈ √(d_in·η·λ / (2n))` (`keras_wt.mirror.residual_angle`; exactly `d_in + κ − 2` in
    place of `d_in` for Dense, `κ` the noise's fourth moment over `σ⁴`): a wide Dense layer needs a
    far bigger noise batch `n` than a convolution, which averages over many positions. So
    `batch_size` may differ per layer, or be `"auto"`: each layer gets the smallest `n` that
    reaches `target_angle`, at most `max_batch_size` (`keras_wt.mirror.auto_batch_size`).

    The settings are a `keras_wt.mirror.MirrorConfig` (`config`), or its fields as keyword
    arguments, which replace those of `config` when both are given (`learning_rate` and
    `noise_std` may be given by position); they read as attributes (`callback.every`). What they
    mean here:

    * `learning_rate` `η`, `noise_std` `σ`, `decay` `λ` (`B → (σ²/λ)·W` when `λ > 0`), `seed`
      and `noise_distribution` (`"rademacher"`, the default, `"normal"` or `"uniform"`, all of
      variance `σ²`):
      the mirror step (`keras_wt.mirror.WeightMirror`);
    * `every`, `steps`: `steps` mirror steps after every `every` training batches;
    * `batch_size`: noise samples per layer and step: an int; a dict `{key: n}` naming every
      `wm` layer (keys as `keras_wt.layers.feedback_keys`: the layer's name unless another
      feedback layer has it); a callable `layer -> n` (register it with
      `keras.saving.register_keras_serializable` for `get_config` to reload); or `"auto"`
      (needs `decay > 0`): each layer's smallest batch for the residual angle `target_angle`, at
      most `max_batch_size`. Each `n` is rounded up to a multiple of the strategy's replicas;
      `callback.mirror.batch_sizes` holds the results once training begins;
    * `warmup_steps`: mirror steps before the first training step (`"auto"`: ten lags
      `1/(η·λ)`, or three of the slowest layer if longer, `WeightMirror.resolved_warmup_steps`);
    * `in_train_step`: run the mirror steps inside the model's compiled training step, right
      after the optimizer's update (`True`, the default), or from this callback between calls
      of the training function (`False`). With `every > 1` under a strategy of several replicas
      they always run between calls (see below).

    Args:
        learning_rate, noise_std: `η` and `σ` (or in `config`).
        config: a `keras_wt.mirror.MirrorConfig`.
        jit_compile: compile the mirror computation with XLA.
        **settings: other fields of `MirrorConfig`.

    **Inside the training step** (`in_train_step=True`) `fit` runs, for its duration, a
    training function made from a `train_step` that, after the model's own, reads the step
    count `t = optimizer.iterations` and, when `t` is a multiple of `every`, runs the `steps`
    mirror steps of counters `(t/every − 1)·steps, …` (`WeightMirror.replica_step`). The noise,
    counters and updates are exactly those of the callback path with `steps_per_execution=1`,
    at no host round trip per mirror step; with `steps_per_execution > 1` every batch is still
    followed by its own mirror steps, so training does not depend on `steps_per_execution`.
    That function is made once per compiled model (a later `fit` reuses it); the model's own
    `train_step` and training function are untouched outside `fit`. Inside an XLA-compiled step
    (`compile(jit_compile=True)`) the mirror is compiled by XLA, as with `jit_compile=True`
    here: XLA's generator draws other noise than TensorFlow's, from the same distribution.
    With `every > 1` the step needs a condition around the mirror, and `MirroredStrategy`
    cannot run the replicas' all-reduce inside one (as it cannot run Keras's own
    `steps_per_execution > 1`, keras-team/keras#19246): under a strategy with several replicas
    such a run mirrors between calls.

    **Between calls** (`in_train_step=False`) Keras calls callbacks once per execution; with
    `steps_per_execution > 1` the mirror steps owed for the batches of that execution run
    together after it, as one compiled call (`WeightMirror.run`) with exactly the noise and
    updates of separate steps, after the weights of all those batches have moved.
    """

    def __init__(self, learning_rate=None, noise_std=None, *, config=None, jit_compile=False,
                 **settings):
        super().__init__()
        self.config = mirror_lib.MirrorConfig.of(
            config, learning_rate=learning_rate, noise_std=noise_std, **settings
        )
        self.jit_compile = jit_compile
        self.mirror = None
        self._iterations = None
        self._epoch_start = 0
        self._in_step = False
        self._train_functions = None  # (the model's own, the mirroring one) of a compilation
        self._call_expected = False
        self._warmup_owed = False  # warm-up steps of a model built at its first batch
        self._first_call = None  # the function that builds such a model (between calls)

    def set_model(self, model):
        if model is not self.model:
            self.mirror = None
            self._train_functions = None
        super().set_model(model)

    def _build(self):
        self.mirror = mirror_lib.WeightMirror(
            self.model,
            config=self.config,
            jit_compile=self._mirror_jit_compile(),
            strategy=_compat.model_strategy(self.model),
        )

    def _mirrors_in_train_step(self):
        return mirrors_in_train_step(
            self.in_train_step, self.every, _compat.model_strategy(self.model).num_replicas_in_sync
        )

    def _mirror_jit_compile(self):
        """Inside an XLA-compiled training step the mirror is compiled by XLA, whose random
        generator draws other numbers than TensorFlow's: the mirror is then built XLA-compiled,
        so `mirror.noise` and its calls outside the step (warm-up) draw what the step draws."""
        model = self.model
        in_xla_step = (
            self._mirrors_in_train_step()
            and bool(getattr(model, "jit_compile", False))
            and not getattr(model, "run_eagerly", False)
        )
        return bool(self.jit_compile) or in_xla_step

    def on_train_begin(self, logs=None):
        if self.mirror is None or self.mirror.jit_compile != self._mirror_jit_compile():
            self.mirror = None
            # A model that builds its layers at its first call (a subclassed model, without a
            # strategy) gets its mirror at its first batch (`_build_at_first_batch`); a model
            # without `wm` layers is refused here.
            if not _unbuilt(mirror_lib.wm_layers(self.model)):
                self._build()
        self._iterations = None
        self._warmup_owed = False
        self._in_step = self._mirrors_in_train_step()
        if backend.STATELESS and not self._in_step:
            raise ValueError(
                "MirrorCallback(in_train_step=False) cannot run on the JAX backend: during fit "
                "Keras's JAX trainer keeps the weights in the state it passes from step to step, "
                "not in the model's variables, so a mirror step between calls would read stale "
                "weights and its update of B would be lost. Use in_train_step=True (the default)."
            )
        if self._in_step:
            self._use_mirroring_train_function()
        elif self.mirror is None:
            self._build_before_first_call()

    def _build_at_first_batch(self, iterator):
        """Builds the model's unbuilt layers from the shapes of `iterator`'s batches (as Keras
        builds a model under a strategy: a symbolic call), then the mirror, and runs the warm-up
        steps owed: all before the first training step runs (and, inside the step, before it is
        traced, since the step's mirror steps need the mirror)."""
        if _unbuilt(mirror_lib.wm_layers(self.model)):
            _build_from_batches(self.model, iterator)
        self._build()
        if self._warmup_owed:
            self._warmup_owed = False
            self.mirror.run(-1, self.mirror.resolved_warmup_steps, stride=-1)  # -1, -2, ...

    def _build_before_first_call(self):
        """Between calls, for a model whose layers are built at its first call: the model's
        training function, for its next call only, builds them and the mirror first."""
        model = self.model
        if model.train_function is None:
            model.make_train_function()
        plain = model.train_function

        def first_call(iterator):
            model.train_function = plain
            self._first_call = None
            if self._call_expected:
                self._build_at_first_batch(iterator)
            return plain(iterator)

        self._first_call = (plain, first_call)
        model.train_function = first_call

    def _use_mirroring_train_function(self):
        """Gives the model, for this `fit`, a training function whose step ends with the mirror
        steps. It is built (and traced) once per compiled model and kept here, so a later `fit`
        of the same compiled model reuses it; `on_train_end` puts the plain one back."""
        model = self.model
        plain = model.train_function
        cached = self._train_functions
        if cached is not None and plain is cached[1]:  # left on the model by an aborted fit
            plain = cached[0]
        if plain is None:
            model.make_train_function()
            plain = model.train_function
        if cached is None or cached[0] is not plain:
            # The step reads the model through this local: on JAX a callback's `self.model`
            # syncs the trainer's state into the variables, which must not happen while the
            # step is traced (it would leave them stale for the rest of the epoch).
            mirroring = _compat.train_function_ending_with(
                model, lambda: self._mirror_after_step(model))

            def train_function(*args):  # (iterator), or (state, iterator) on JAX
                if not self._call_expected:
                    # Called by a fit without this callback (one that ran with it stopped on an
                    # exception, before on_train_end): no mirror steps there.
                    model.train_function = plain
                    return plain(*args)
                self._call_expected = False
                if self.mirror is None:  # layers built at the first call (before tracing)
                    self._build_at_first_batch(args[-1])
                return mirroring(*args)

            self._train_functions = (plain, train_function)
        model.train_function = self._train_functions[1]

    def on_train_batch_begin(self, batch, logs=None):
        self._call_expected = True

    def on_train_end(self, logs=None):
        if self._train_functions is not None and self.model.train_function is self._train_functions[1]:
            self.model.train_function = self._train_functions[0]
        if self._first_call is not None and self.model.train_function is self._first_call[1]:
            self.model.train_function = self._first_call[0]
        self._first_call = None

    def _mirror_after_step(self, model):
        """In the training step (a replica context), after the optimizer's update: the mirror
        steps owed. With `t` the step count after the update, the `steps` steps of counters
        `(t/every − 1)·steps + k` when `every` divides `t` (those `on_train_batch_end` runs)."""
        iterations = ops.cast(backend.read_value(model.optimizer.iterations), "int64")
        # B as the forward pass read it, taken here: a `tf.cond` branch is a graph of its own.
        values = self.mirror.known_values()

        def mirror():
            first = (iterations // self.every - 1) * self.steps
            current = values
            for k in range(self.steps):
                current = self.mirror.replica_step(first + k, current)

        if self.every == 1:
            mirror()
        else:  # one replica only (`_mirrors_in_train_step`)
            ops.cond(ops.equal(iterations % self.every, 0), mirror, lambda: None)

    def on_epoch_begin(self, epoch, logs=None):
        # One read of the step count per epoch, after every on_train_begin (BackupAndRestore's
        # restore too); within the epoch it advances with the batch index Keras passes.
        iterations = int(self.model.optimizer.iterations.numpy())
        if self._iterations is None and iterations == 0 and self.warmup_steps:
            if self.mirror is None:  # the model builds its layers at its first batch
                self._warmup_owed = True
            else:
                self.mirror.run(-1, self.mirror.resolved_warmup_steps, stride=-1)  # -1, -2, ...
        self._epoch_start = iterations
        self._iterations = iterations

    def on_train_batch_end(self, batch, logs=None):
        if self._in_step:
            return
        iterations = self._epoch_start + batch + 1
        # The steps owed since the last call (several with steps_per_execution > 1): event e
        # runs counters e·steps … e·steps + steps − 1, so they are consecutive; one call.
        first, last = self._iterations // self.every, iterations // self.every
        if last > first:
            self.mirror.run(first * self.steps, (last - first) * self.steps)
        self._iterations = iterations

    def get_config(self):
        return dict(self.config.get_config(), jit_compile=self.jit_compile)

    @classmethod
    def from_config(cls, config):
        """Also reads the keyword form saved before `MirrorConfig` (the same keys)."""
        config = dict(config)
        jit_compile = config.pop("jit_compile", False)
        return cls(config=mirror_lib.MirrorConfig.from_config(config), jit_compile=jit_compile)


def _unbuilt(layers):
    """The layers among `layers` not built yet (whose input shape is unknown)."""
    return [layer for layer in layers if layer.feedback_input_shape is None]


def _build_from_batches(model, iterator):
    """Builds `model`'s layers by calling it symbolically on inputs of the shapes and dtypes of
    the batches `iterator` yields (its `element_spec`), as Keras builds a model before `fit` under
    a strategy. A subclassed model's `build(input_shape)` does not build its sublayers: only a
    call does, which `fit` makes when it traces the training step, after `on_train_begin`."""
    spec = getattr(iterator, "element_spec", None)
    if spec is None:
        return
    x, _, _ = keras.utils.unpack_x_y_sample_weight(spec)

    def symbolic(spec):
        if backend.is_tensor_spec(spec):
            return keras.KerasTensor(tuple(spec.shape), spec.dtype.name)
        return spec

    with _compat.model_strategy(model).scope():
        model(keras.tree.map_structure(symbolic, x), training=False)


class AlignmentCallback(keras.callbacks.Callback):
    """Writes alignment measurements into `logs` at the end of epochs.

    Keys: `weight_angle/<key>`, `delta_angle/<key>`, `gradient_angle/<key>` (degrees) and
    `norm_ratio/<key>` (`‖B‖/‖W‖`), so History, CSVLogger and TensorBoard record them; `<key>` is
    the layer's name, or its path where feedback layers share a name
    (`keras_wt.layers.feedback_keys`). They are
    measured on the fixed `probe` batch every `every` epochs (first at the first epoch) and at
    the last epoch of `fit`, and are NaN in the epochs between, so every epoch has the same keys.
    Put it before the callbacks that read `logs` (`CSVLogger`, `TensorBoard`, `ModelCheckpoint`
    monitoring an angle): Keras calls callbacks in list order. With `probe=None` only the weight
    angles and norm ratios are written: they need no batch and no forward pass.

    Args:
        probe: a batch `(x, y)`, or `None`.
        every: measure every `every` epochs.
        loss: the loss of the deltas; defaults to the model's compiled loss.
    """

    def __init__(self, probe, every=1, loss=None):
        super().__init__()
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.probe = probe
        self.every = int(every)
        self.loss = loss
        self._keys = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        last = epoch + 1 == (self.params or {}).get("epochs")
        scheduled = epoch % self.every == 0 or last
        if scheduled or self._keys is None:  # measured once more to learn the keys
            if self.probe is None:
                metrics = alignment.weight_metrics(self.model)
            else:
                x, y = self.probe
                metrics = alignment.alignment_metrics(self.model, x, y, loss=self.loss)
            self._keys = list(metrics)
        if not scheduled:  # NaN whatever epoch `fit` started at (a resumed run's logs too)
            metrics = {key: np.nan for key in self._keys}
        logs.update(metrics)
