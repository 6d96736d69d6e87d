"""What a run writes into its folder before it trains: `experiment_config.json` (its settings,
the flags and values derived from them, and the versions it ran with) and `log.txt` (a copy of
the `keras_wt` log while the run lasts); see `keras_wt.app.runs` for the folder's contract.
"""

import logging
import os
import platform

import keras
import tensorflow as tf

import keras_wt
from keras_wt.app import runs
from keras_wt.app.callbacks import TrainingDiverged
from keras_wt.app.config import RESUMABLE

logger = logging.getLogger("keras_wt")

# The keys of the flat `train_config` written before `TrainConfig` was composed of component
# configs, and the same settings' keys now (`TrainConfig.record`), so that a run saved then is
# compared when resumed. `weight_decay` and `mirror_warmup_steps` changed meaning (now
# `optimizer.l2`/`optimizer.decoupled_decay` and `mirror_warmup_one_pass`): not compared.
LEGACY_KEYS = {
    **{key: f"data.{key}" for key in (
        "dataset", "data_dir", "batch_size", "image_size", "num_classes", "use_synthetic_data",
        "train_examples", "eval_examples", "train_subset", "steps_per_epoch")},
    "model": "model.name", "model_options": "model.options", "dtype": "model.dtype",
    "keep_unused_feedback": "model.keep_unused_feedback",
    **{key: f"optimizer.{key}" for key in (
        "learning_rate", "schedule", "warmup_epochs", "decay_epochs", "momentum",
        "kp_decay_budget")},
    **{f"mirror_{key}": f"mirror.{key}" for key in (
        "learning_rate", "noise_std", "noise_distribution", "decay", "every", "steps",
        "batch_size", "target_angle", "max_batch_size", "in_train_step")},
}


def versions():
    return {
        "keras_wt_version": keras_wt.__version__,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}".replace("  ", " "),
    }


def record_config(config, flags, derived):
    """Writes `experiment_config.json` and returns whether the run folder held one already (a
    run being continued). A continued run must have the saved configuration, apart from
    `RESUMABLE` settings (else a `ValueError` names the differences), and must not have
    diverged (`TrainingDiverged`); a damaged configuration is a `keras_wt.app.runs.RunError`."""
    path = os.path.join(config.model_dir, runs.CONFIG_FILE)
    current = config.record()
    diverged = os.path.join(config.model_dir, runs.DIVERGED_FILE)
    if runs.exists(diverged):
        try:
            record = runs.read_json(diverged)
            where = (f" (loss {record['loss']} at batch {record['batch']} of epoch "
                     f"{record['epoch']}: {record.get('reason', 'not finite')})")
        except (ValueError, KeyError, TypeError):
            where = ""
        raise TrainingDiverged(
            f"{config.model_dir} diverged{where}; resuming it would diverge again. Delete "
            f"{diverged} to resume it anyway, or start a new run."
        )
    saved = runs.read_config(config.model_dir)
    if saved is not None:
        saved = {LEGACY_KEYS.get(k, k): v for k, v in saved.get("train_config", {}).items()}
        # A setting added after the run was saved is not compared (the run predates it).
        changed = sorted(
            k for k in current if k not in RESUMABLE and k in saved and saved[k] != current[k]
        )
        if changed:
            raise ValueError(
                f"{config.model_dir} holds a run with other settings; resuming it with "
                + ", ".join(f"{k}={current[k]!r} (saved: {saved.get(k)!r})" for k in changed)
                + f" would not continue it. Only {RESUMABLE} may change; use another directory."
            )
    tf.io.gfile.makedirs(config.model_dir)
    runs.write_json(path, dict(flags or {}, train_config=current,
                               derived=dict(derived or {}, **versions())))
    return saved is not None


class LogFile:
    """Copies the `keras_wt` log to `<model_dir>/log.txt` while a run lasts (local folders)."""

    def __init__(self, model_dir):
        self.path = None
        if model_dir and "://" not in model_dir:
            self.path = os.path.join(model_dir, runs.LOG_FILE)

    def __enter__(self):
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        self._handler = None
        if self.path:
            self._handler = logging.FileHandler(self.path, encoding="utf-8")
            self._handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(message)s")
            )
            logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()
        logger.setLevel(self._level)

    def note(self, message):
        """Writes an error line to `log.txt` only (the front end tells the console)."""
        if self._handler is not None:
            self._handler.handle(
                logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None))


