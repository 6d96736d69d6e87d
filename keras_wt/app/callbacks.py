"""The callbacks of a run (`create_callbacks`): the weight mirror where a layer learns `B` by
mirroring, `AlignmentCallback`, `StopOnDivergence`, `ResultsRecorder` (`results.json` and the
summary line), `HistoryLogger` (`CSVLogger`), `EpochTensorBoard` (`TensorBoard`), and
`keras_wt.app.backup.AtomicBackup` last.
"""

import csv
import logging
import math
import os
import statistics
import time

import keras
import tensorflow as tf

from keras_wt import callbacks as callbacks_lib
from keras_wt import mirror as mirror_lib
from keras_wt import _compat
from keras_wt.app import backup as backup_lib
from keras_wt.app import resume
from keras_wt.app import runs
from keras_wt.app import strategies
from keras_wt.app.config import evaluated_epochs

logger = logging.getLogger("keras_wt")

# A run diverges when its training loss explodes while finite (StopOnDivergence): above
# EXPLOSION_FACTOR times the loss of a network that has learned nothing (`zero_logit_loss`) for
# EXPLOSION_STEPS consecutive steps, or for a whole shorter epoch after the first. Measured on the first epoch of
# every published configuration (Fashion-MNIST, seed 1111), the running mean Keras reports never
# comes near it: the ten MLP rules peak at 1.39 × 6.93 (kp, its first 7 steps) and end the epoch
# at 1.3-2.3; the convnet recipe's CNN peaks at 0.89 × 2.30 (fa) and is below 0.32 × after 105
# steps, its ResNet-20 at 1.00 × (its first 7 steps) and below 0.92 × after 63. A saturated
# network sits above it: the MLP at --learning_rate 1e6 (every sigmoid at 0 or 1, the loss at
# 16.12 = 2.33 × 6.93) stops at batch 105 of epoch 1.
EXPLOSION_FACTOR = 2.0
EXPLOSION_STEPS = 100


def create_mirror_callback(model, config, jit_compile=False):
    """The `MirrorCallback` of `config` (a `keras_wt.mirror.MirrorConfig`) that trains the
    feedback kernels of the layers of `model` that learn `B` by mirroring, or `None` when it has
    none.

    The mirror step is `ΔB = η·∇_W(½‖f_W(x)‖²) ⊘ (n·C) − η·λ·B` (`keras_wt.mirror`), averaged
    over the `n` noise samples and, per kernel entry, over the `C` positions at which it reads
    real input, so every layer's `B` tends to `(σ²/λ)·W`: with the trainer's recipe
    (`keras_wt.app.config.RECIPE_MIRROR`) `σ = λ = 1`, `W` itself, whose scale the error signal
    then keeps; `η = 0.05` covers 5% of the way per mirror step (about 20 steps to follow `W`).

    Args:
        model: a built model (fixed input size: the noise has each layer's input shape).
        config: the `MirrorConfig`.
        jit_compile: `MirrorCallback(jit_compile=...)`.
    """
    if not mirror_lib.wm_layers(model):
        return None
    return callbacks_lib.MirrorCallback(config=config, jit_compile=jit_compile)


class TrainingDiverged(FloatingPointError):
    """The run diverged (`StopOnDivergence`)."""


def zero_logit_loss(loss, num_classes):
    """The loss of a network that has learned nothing, all its logits 0 (every class equally
    likely): `num_classes·ln 2` for the summed sigmoid cross-entropy (each class at 1/2), `ln C`
    for the softmax cross-entropy (with or without label smoothing). Every trainer model starts
    near it."""
    if loss == "summed_sigmoid":
        return num_classes * math.log(2.0)
    return math.log(num_classes)


class StopOnDivergence(keras.callbacks.Callback):
    """Stops a run that diverged by raising `TrainingDiverged`, before the epoch is recorded or
    backed up (unlike Keras's `TerminateOnNaN`, which ends the epoch as if it had finished):

    * at the first batch whose loss or metric is NaN or infinite;
    * when the loss explodes while finite: the epoch's running mean of the training loss (what
      Keras reports after each batch) above `factor × reference` for `steps` consecutive training
      steps, or at the end of an epoch (shorter than that; not the first, whose mean holds the
      initial loss) whose mean loss is above it;
    * at the end of an epoch whose weights (`W`, `B`, batch-norm statistics), optimizer state or
      metrics (evaluation included) hold a NaN or an infinity.

    The angles of `AlignmentCallback` are measurements, not checked (an angle to a zero vector is
    undefined, `null`). With a `path`, writes `{epoch, batch, loss, reason}` there first
    (`diverged.json` of the run folder), which a resumed run refuses to continue.

    Args:
        path: where to record the divergence, or `None`.
        reference: the loss the explosion is measured against (`zero_logit_loss`), or `None`
            for no explosion check.
        factor, steps: the explosion rule (defaults `EXPLOSION_FACTOR`, `EXPLOSION_STEPS`).
    """

    def __init__(self, path=None, reference=None, factor=EXPLOSION_FACTOR, steps=EXPLOSION_STEPS):
        super().__init__()
        self.path = path
        self.limit = None if reference is None else factor * reference
        self.factor, self.steps = factor, steps
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._seen = self._above = 0

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        # With steps_per_execution > 1 Keras reports once per call: count every step it ran.
        steps, self._seen = batch + 1 - self._seen, batch + 1
        self._check_finite(logs, batch + 1)
        loss = logs.get("loss")
        if self.limit is None or loss is None:
            return
        self._above = self._above + steps if float(loss) > self.limit else 0
        if self._above >= self.steps:
            self._stop(batch + 1, loss, f"the training loss has stayed above {self.factor:g} × "
                       f"{self.limit / self.factor:.4g} (the loss of a network that learned "
                       f"nothing) for {self._above} steps: it exploded")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        batch = getattr(self, "_seen", 0)
        self._check_finite(logs, batch)
        bad = [v.path for v in list(self.model.weights) + list(self.model.optimizer.variables)
               if keras.backend.is_float_dtype(v.dtype)
               and not bool(keras.ops.all(keras.ops.isfinite(v)))]
        if bad:
            self._stop(batch, logs.get("loss"), "non-finite values in " + ", ".join(bad[:5])
                       + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
        loss = logs.get("loss")
        # Not the first epoch's mean: it holds the initial loss, which a network whose logits
        # start large (He-initialised convnets on few classes) begins well above the reference.
        if self.limit is not None and loss is not None and epoch and float(loss) > self.limit:
            self._stop(batch, loss, f"the epoch's mean training loss is above {self.factor:g} × "
                       f"{self.limit / self.factor:.4g} (the loss of a network that learned "
                       "nothing): it exploded")

    def _check_finite(self, logs, batch):
        for key, value in logs.items():
            if "/" not in key and not math.isfinite(float(value)):
                self._stop(batch, logs.get("loss"), f"{key} is {float(value)}")

    def _stop(self, batch, loss, reason):
        loss = None if loss is None else float(loss)
        record = {"epoch": self._epoch + 1, "batch": batch, "loss": str(loss), "reason": reason}
        if self.path:
            runs.write_json(self.path, record)
        raise TrainingDiverged(
            f"At batch {batch} of epoch {self._epoch + 1} (loss {loss}) the run diverged: "
            f"{reason}. Nothing of this epoch was recorded; lower the learning rate."
        )


class CallTimer(keras.callbacks.Callback):
    """Times the training calls of each epoch: `seconds_per_step` is the median, over the
    epoch's calls after its first (which traces and compiles the step), of the time from one
    call's end to the next one's (the call and every callback of it) per training step it ran;
    `None` before two calls have ended.

    With `stop_after_epoch`, ends the `fit` after its first epoch (`stop_training`, set last
    when it is the last callback), so that `fit` keeps its `epochs` (the progress bar's count,
    a callback's last epoch); `stopped` says whether another callback had ended it already.
    """

    def __init__(self, stop_after_epoch=False):
        super().__init__()
        self.stop_after_epoch = stop_after_epoch
        self.stopped = False

    def on_epoch_end(self, epoch, logs=None):
        if self.stop_after_epoch:
            self.stopped = bool(self.model.stop_training)
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._seen, self._last, self._per_step = 0, None, []

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        steps, self._seen = batch + 1 - self._seen, batch + 1
        if self._last is not None:
            self._per_step.append((now - self._last) / steps)
        self._last = now

    @property
    def seconds_per_step(self):
        per_step = getattr(self, "_per_step", None)
        return statistics.median(per_step) if per_step else None


class ResultsRecorder(keras.callbacks.Callback):
    """Logs one summary line per epoch (the console's only line of the epoch), and after every
    evaluated epoch (`evaluated_epochs`, whether or not it has test data) writes the epoch into
    `results.json`.

    An entry holds every number of the epoch's `logs` (`keras_wt.app.runs.results_entry`: `val_<m>`
    as `test_<m>`, and `<kind>/<layer>` (the alignment keys) grouped as `<kind>s: {layer: value}`
    (`weight_angles`, `delta_angles`, ...)), plus the epoch's `seconds`.

    Args:
        path: the `results.json` to write, or `None` to only log.
        epochs: the run's number of epochs.
        every: evaluate every this many epochs (`evaluated_epochs`).
        results: the entries of earlier epochs (when resuming).
    """

    def __init__(self, path, epochs, every=1, results=None):
        super().__init__()
        self.path = path
        self.epochs = epochs
        self.evaluated = set(evaluated_epochs(epochs, every))
        self.results = dict(results or {})
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        entry = runs.results_entry(logs)
        entry["seconds"] = time.perf_counter() - self._start
        if epoch + 1 not in self.evaluated:
            logger.info("epoch %d/%d (%.1fs): loss %.4f, accuracy %.2f%%", epoch + 1,
                        self.epochs, entry["seconds"], entry.get("loss", math.nan),
                        entry.get("accuracy", math.nan))
            return
        self.results[runs.epoch_key(epoch + 1)] = entry
        if self.path:
            runs.write_json(self.path, self.results)
        logger.info(
            "epoch %d/%d (%.1fs): loss %.4f, accuracy %.2f%%, test loss %.4f, test accuracy "
            "%.2f%%%s%s",
            epoch + 1, self.epochs, entry["seconds"], entry.get("loss", math.nan),
            entry.get("accuracy", math.nan), entry.get("test_loss", math.nan),
            entry.get("test_accuracy", math.nan),
            _format_angles("weight angles", entry.get("weight_angles")),
            _format_angles("delta angles", entry.get("delta_angles")),
        )


def _format_angles(title, angles):
    if not angles:
        return ""
    return f", {title} {{" + ", ".join(f"{k}: {v:.1f}°" for k, v in angles.items()) + "}"


class HistoryLogger(keras.callbacks.CSVLogger):
    """Keras's `CSVLogger`, appending to `history.csv` in the columns of the file's header when
    it has one: a resumed run's first epoch may log other keys than the run's first did (no
    evaluation, say), and its rows must line up with the header."""

    def __init__(self, filename):
        super().__init__(filename, append=True)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        header, _ = resume.read_history(self.filename)
        if header is not None:
            self.keys = next(csv.reader([header]))[1:]


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras's `TensorBoard`, its event files flushed at every epoch's end, so that an epoch's
    summaries are on disk before its backup is written (Keras's writers flush every two minutes
    and at the end of training: a kill would lose epochs that the backup holds)."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        _compat.flush_summary_writers(self)


def create_callbacks(
    model, config, strategy, probe=None, results=None, extra=(), mirror=None, steps_per_epoch=None,
):
    """The trainer's callbacks, in this order:

    1. for a model with layers that learn `B` by mirroring: the `MirrorCallback`
       (`create_mirror_callback`; it reads the optimizer's step count at every epoch's start,
       after any restore);
    2. `AlignmentCallback` (on `probe` for `alignment="full"`, probe-free for `"weights"`), so
       that what follows records its values; `StopOnDivergence` (a run that diverges stops with
       `TrainingDiverged`, the epoch not completed; the explosion rule against
       `zero_logit_loss` unless `config.divergence_check` is off);
    3. with a `model_dir` (on the chief only): `ResultsRecorder`, `HistoryLogger`
       (`CSVLogger`), `EpochTensorBoard` (`TensorBoard`);
    4. the `extra` callbacks;
    5. `keras_wt.app.backup.AtomicBackup` (`<model_dir>/backup`, kept after training, so re-running
       a finished command is a no-op; every epoch's with `keep_checkpoints`): last, so the
       backup of an epoch is written after everything else of that epoch; a run killed before
       it redoes the whole epoch.

    Non-chief workers of a multi-worker job back up to `<model_dir>/backup-<task>` and write
    nothing else. `mirror` is the run's `MirrorConfig` (`config.resolved_mirror`, its warm-up
    resolved; default `config.mirror`); `steps_per_epoch` is the optimizer steps of an epoch,
    which the backup checks.
    """
    result = []
    mirror = create_mirror_callback(
        model, config.mirror if mirror is None else mirror,
        # On TPUs the whole mirror step is compiled by TPUStrategy; elsewhere the per-replica
        # part is XLA-compiled when the training step is.
        jit_compile=config.strategy != "tpu" and bool(model.jit_compile),
    )
    if mirror is not None:
        result.append(mirror)
    if config.alignment != "none":
        if config.alignment == "full" and probe is None:
            raise ValueError("alignment='full' needs a probe batch (x, y).")
        result.append(callbacks_lib.AlignmentCallback(
            probe if config.alignment == "full" else None, every=config.eval_every
        ))
    diverged = config.model_dir and os.path.join(config.model_dir, runs.DIVERGED_FILE)
    reference = None
    if config.divergence_check:
        reference = zero_logit_loss(config.loss, config.data.resolved_num_classes)
    result.append(StopOnDivergence(
        diverged if strategies.is_chief(strategy) else None, reference=reference))
    if not config.model_dir:
        return result + [
            ResultsRecorder(None, config.epochs, config.eval_every, results)] + list(extra)
    if strategies.is_chief(strategy):
        tf.io.gfile.makedirs(config.model_dir)
        path = lambda name: os.path.join(config.model_dir, name)  # noqa: E731
        result += [
            ResultsRecorder(path(runs.RESULTS_FILE), config.epochs, config.eval_every, results),
            HistoryLogger(path(runs.HISTORY_FILE)),
            EpochTensorBoard(path(runs.TENSORBOARD_DIR), write_graph=False, profile_batch=0),
        ]
    return result + list(extra) + [create_backup(config, strategy, steps_per_epoch)]


def create_backup(config, strategy, steps_per_epoch=None):
    """`AtomicBackup` in `<model_dir>/backup` (`backup-<task>` on non-chief workers), keeping
    every epoch's backup on the chief with `keep_checkpoints`, checking `steps_per_epoch`
    optimizer steps per epoch."""
    name = runs.BACKUP_DIR
    chief = strategies.is_chief(strategy)
    if not chief:
        name = f"{name}-{strategies.task_name(strategy)}"
    return backup_lib.AtomicBackup(
        os.path.join(config.model_dir, name), keep=config.keep_checkpoints and chief,
        steps_per_epoch=steps_per_epoch,
    )


