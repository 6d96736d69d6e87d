"""Backups that a killed run resumes from, written so that a kill at any instant leaves one intact.

Keras's `BackupAndRestore` overwrites one weights file in place and then, separately, a file with
the epoch: a kill during the first write leaves a truncated file that every restart fails on,
and a kill between the two makes the resumed run train an epoch twice. `AtomicBackup` writes
each backup as a new file under a temporary name, flushes it to disk, renames it, and only then
replaces the manifest (`manifest.json`, itself written the same way) that names it together with
the epochs completed and the optimizer's step count; the previous backup is deleted last. At
every instant the manifest names a complete file. On storage without an atomic rename (GCS) the
manifest is still written last, after the file it names is complete. A restore checks the step
count it finds against the manifest and refuses a mismatch.

    backup = AtomicBackup("run/backup")
    epochs_done = backup.restore(model)          # 0 when there is no backup yet
    model.fit(data, epochs=10, initial_epoch=epochs_done, callbacks=[..., backup])

Put it last among the callbacks, so that a backup is written after everything else an epoch
writes (a run killed before it redoes the epoch).

Testing hook: the environment variable `KERAS_WT_FAULT="<point>:<epoch>"` kills the process
(SIGKILL) at that point of the backup of that epoch (1-based), and `"batch:<epoch>:<batch>"` after
that training batch (after the host call that ran it, with `steps_per_execution > 1`);
`FAULT_POINTS` lists the points. `tests/test_preemption.py` uses it.
"""

import json
import os
import signal

import keras
import tensorflow as tf

MANIFEST = "manifest.json"
FAULT_ENV = "KERAS_WT_FAULT"
# A kill halfway through writing the weights, after writing them (before the rename), halfway
# through writing the manifest, and after the manifest (before the old backup is deleted).
FAULT_POINTS = ("weights", "renamed", "manifest", "written")


def _weights_name(epochs):
    return f"epoch-{epochs:04d}.weights.h5"


def _fault(point):
    """Kills this process if `KERAS_WT_FAULT` names `point`."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _local(path):
    return "://" not in path


def _sync(path):
    """Flushes a local file's data to disk (what a rename must not overtake)."""
    if _local(path):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def _truncate_for_fault(path, point):
    """Under the testing hook, leaves `path` half written, as a kill during its write would."""
    if os.environ.get(FAULT_ENV) == point and _local(path):
        with open(path, "rb+") as f:
            f.truncate(os.path.getsize(path) // 2)
        _fault(point)


class AtomicBackup(keras.callbacks.Callback):
    """Backs up the model's weights (`W`, feedback kernels `B`, batch-norm statistics) and its
    optimizer's state (momentum, step count, so also the learning-rate schedule's position and
    the weight mirror's noise) at the end of every epoch, crash-safely (module docstring).

    Args:
        backup_dir: the folder of the backups (local or `gs://`).
        keep: keep every epoch's backup (`epoch-NNNN.weights.h5`: per-epoch checkpoints),
            instead of only the latest.
    """

    def __init__(self, backup_dir, keep=False):
        super().__init__()
        self.backup_dir = backup_dir
        self.keep = keep
        self._epoch = 0

    @property
    def manifest_path(self):
        return os.path.join(self.backup_dir, MANIFEST)

    def manifest(self):
        """The manifest `{"epochs", "iterations", "weights"}`, or `None` without a backup."""
        if not tf.io.gfile.exists(self.manifest_path):
            return None
        with tf.io.gfile.GFile(self.manifest_path) as f:
            return json.load(f)

    def restore(self, model):
        """Loads the latest complete backup into `model` (built, compiled) and returns the
        number of epochs it completed (0, and `model` unchanged, when there is none).

        Raises:
            ValueError: the backup's step count disagrees with its manifest.
        """
        self.set_model(model)
        manifest = self.manifest()
        if manifest is None:
            return 0
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(self.backup_dir, manifest["weights"]))
        iterations = int(optimizer.iterations.numpy())
        if iterations != manifest["iterations"]:
            raise ValueError(
                f"The backup {manifest['weights']} in {self.backup_dir} holds step {iterations}, "
                f"but its manifest records {manifest['iterations']} steps after "
                f"{manifest['epochs']} epochs: it does not belong to this run or was altered. "
                "Refusing to resume from it."
            )
        return int(manifest["epochs"])

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._batches_done = 0

    def on_train_batch_end(self, batch, logs=None):
        # With steps_per_execution > 1 Keras reports only an execution's last batch: the fault
        # of any batch it ran fires after it.
        for done in range(getattr(self, "_batches_done", batch) + 1, batch + 2):
            _fault(f"batch:{self._epoch + 1}:{done}")
        self._batches_done = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1)

    def save(self, epochs):
        """Backs up the model after `epochs` completed epochs."""
        tf.io.gfile.makedirs(self.backup_dir)
        previous = self.manifest()
        name = _weights_name(epochs)
        final = os.path.join(self.backup_dir, name)
        tmp = os.path.join(self.backup_dir, f"tmp-{name}") if _local(final) else final
        self.model.save_weights(tmp, overwrite=True)
        _truncate_for_fault(tmp, f"weights:{epochs}")
        _sync(tmp)
        _fault(f"renamed:{epochs}")
        if tmp != final:
            os.replace(tmp, final)
        manifest = {
            "epochs": epochs,
            "iterations": int(self.model.optimizer.iterations.numpy()),
            "weights": name,
        }
        text = json.dumps(manifest)
        if _local(self.manifest_path):
            tmp_manifest = f"{self.manifest_path}.tmp"
            with open(tmp_manifest, "w", encoding="utf-8") as f:
                f.write(text)
            _truncate_for_fault(tmp_manifest, f"manifest:{epochs}")
            _sync(tmp_manifest)
            os.replace(tmp_manifest, self.manifest_path)
        else:
            with tf.io.gfile.GFile(self.manifest_path, "w") as f:
                f.write(text)
        _fault(f"written:{epochs}")
        if previous is not None and not self.keep and previous["weights"] != name:
            old = os.path.join(self.backup_dir, previous["weights"])
            if tf.io.gfile.exists(old):
                tf.io.gfile.remove(old)

