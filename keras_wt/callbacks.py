"""Callbacks: mirror steps for the weight mirror, alignment angles into `logs`."""

import collections.abc

import keras
import numpy as np

from keras_wt import alignment
from keras_wt import mirror as mirror_lib


@keras.saving.register_keras_serializable(package="keras_wt")
class MirrorCallback(keras.callbacks.Callback):
    """Runs weight-mirror steps on every `wm` layer between training steps.

    `steps` mirror steps run after every `every` training batches, and `warmup_steps` before
    the first training step (only when the optimizer has not taken a step yet, so a resumed
    run does not warm up twice). Each step draws noise of every layer's real input shape and applies
    `ΔB = η·∇_W(½‖f_W(x)‖²)⊘(n·C) − η·λ·B` (see `keras_wt.mirror`; `C` counts the real-input
    positions of each kernel entry, so `B → (σ²/λ)·W` with any padding). The noise is seeded by
    the optimizer's step count (warm-up steps use negative counters), so a run resumed from a
    checkpoint continues exactly.

    With `W` frozen, a layer's `B` settles at an angle `θ` from `W` with
    `tan θ ≈ √(d_in·η·λ / (2n))` (`keras_wt.mirror.residual_angle`): a wide Dense layer needs a
    far bigger noise batch `n` than a convolution, which averages over many positions. So
    `batch_size` may differ per layer, or be `"auto"`: each layer gets the smallest `n` that
    reaches `target_angle`, at most `max_batch_size` (`keras_wt.mirror.auto_batch_size`).

    Args:
        learning_rate: `η`.
        noise_std: `σ` of the noise.
        decay: `λ`, the mirror decay of `B` (`B → (σ²/λ)·W` when `λ > 0`).
        every: mirror after every `every` training batches.
        steps: mirror steps each time.
        batch_size: noise samples per layer and step: an int; a dict `{layer_name: n}` naming
            every `wm` layer; a callable `layer -> n` (register it with
            `keras.saving.register_keras_serializable` for `get_config` to reload); or
            `"auto"` (needs `decay > 0`). Each `n` is rounded up to a multiple of the
            strategy's replicas; `callback.mirror.batch_sizes` holds the results once
            training begins.
        warmup_steps: mirror steps before the first training step.
        noise_distribution: `"normal"` or `"uniform"` (same variance `σ²`).
        seed: seed of the noise.
        jit_compile: compile the mirror computation with XLA.
        target_angle: for `batch_size="auto"`: the residual angle in degrees each layer's noise
            batch is sized for.
        max_batch_size: for `batch_size="auto"`: the cap on a layer's noise batch.

    With `steps_per_execution > 1` Keras calls callbacks once per execution; the mirror steps
    owed for the batches of that execution then run together, as one compiled call
    (`WeightMirror.run`) with exactly the noise and updates of separate steps.
    """

    def __init__(
        self,
        learning_rate,
        noise_std,
        decay=0.0,
        every=1,
        steps=1,
        batch_size=128,
        warmup_steps=0,
        noise_distribution="normal",
        seed=0,
        jit_compile=False,
        target_angle=5.0,
        max_batch_size=4096,
    ):
        super().__init__()
        if every < 1 or steps < 1 or warmup_steps < 0:
            raise ValueError(
                f"every={every} and steps={steps} must be >= 1 and warmup_steps={warmup_steps} >= 0"
            )
        self.learning_rate = learning_rate
        self.noise_std = noise_std
        self.decay = decay
        self.every = int(every)
        self.steps = int(steps)
        self.batch_size = mirror_lib.check_batch_size(batch_size)
        self.target_angle = float(target_angle)
        self.max_batch_size = int(max_batch_size)
        self.warmup_steps = int(warmup_steps)
        self.noise_distribution = noise_distribution
        self.seed = seed
        self.jit_compile = jit_compile
        self.mirror = None
        self._iterations = None
        self._epoch_start = 0

    def set_model(self, model):
        if model is not self._model:
            self.mirror = None
        super().set_model(model)

    def _build(self):
        self.mirror = mirror_lib.WeightMirror(
            self.model,
            learning_rate=self.learning_rate,
            noise_std=self.noise_std,
            decay=self.decay,
            batch_size=self.batch_size,
            noise_distribution=self.noise_distribution,
            seed=self.seed,
            jit_compile=self.jit_compile,
            strategy=self.model.distribute_strategy,
            target_angle=self.target_angle,
            max_batch_size=self.max_batch_size,
        )

    def on_train_begin(self, logs=None):
        if self.mirror is None:
            self._build()
        self._iterations = None

    def on_epoch_begin(self, epoch, logs=None):
        # One read of the step count per epoch, after every on_train_begin (BackupAndRestore's
        # restore too); within the epoch it advances with the batch index Keras passes.
        iterations = int(self.model.optimizer.iterations.numpy())
        if self._iterations is None and iterations == 0 and self.warmup_steps:
            self.mirror.run(-1, self.warmup_steps, stride=-1)  # counters -1, -2, ...
        self._epoch_start = iterations
        self._iterations = iterations

    def on_train_batch_end(self, batch, logs=None):
        iterations = self._epoch_start + batch + 1
        # The steps owed since the last call (several with steps_per_execution > 1): event e
        # runs counters e·steps … e·steps + steps − 1, so they are consecutive; one call.
        first, last = self._iterations // self.every, iterations // self.every
        if last > first:
            self.mirror.run(first * self.steps, (last - first) * self.steps)
        self._iterations = iterations

    def get_config(self):
        batch_size = self.batch_size
        if isinstance(batch_size, collections.abc.Mapping):
            batch_size = {name: int(n) for name, n in batch_size.items()}
        elif callable(batch_size):
            batch_size = keras.saving.serialize_keras_object(batch_size)
        return {
            "learning_rate": self.learning_rate,
            "noise_std": self.noise_std,
            "decay": self.decay,
            "every": self.every,
            "steps": self.steps,
            "batch_size": batch_size,
            "warmup_steps": self.warmup_steps,
            "noise_distribution": self.noise_distribution,
            "seed": self.seed,
            "jit_compile": self.jit_compile,
            "target_angle": self.target_angle,
            "max_batch_size": self.max_batch_size,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        batch_size = config.get("batch_size")
        # A serialized callable, not a {layer_name: int} map (whose values are all ints).
        if isinstance(batch_size, dict) and isinstance(batch_size.get("class_name"), str):
            config["batch_size"] = keras.saving.deserialize_keras_object(batch_size)
        return cls(**config)


class AlignmentCallback(keras.callbacks.Callback):
    """Writes alignment measurements into `logs` at the end of epochs.

    Keys: `weight_angle/<layer>`, `delta_angle/<layer>`, `gradient_angle/<layer>` (degrees) and
    `norm_ratio/<layer>` (`‖B‖/‖W‖`), so History, CSVLogger and TensorBoard record them. They are
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
        if epoch % self.every == 0 or last or self._keys is None:
            if self.probe is None:
                metrics = alignment.weight_metrics(self.model)
            else:
                x, y = self.probe
                metrics = alignment.alignment_metrics(self.model, x, y, loss=self.loss)
            self._keys = list(metrics)
        else:
            metrics = {key: np.nan for key in self._keys}
        logs.update(metrics)
