"""Backups that a killed run resumes from, written so that a kill at any instant leaves one intact,
and checked when read so that a damaged one is never trained on.

Keras's `BackupAndRestore` overwrites one weights file in place and then, separately, a file with
the epoch: a kill during the first write leaves a truncated file that every restart fails on,
and a kill between the two makes the resumed run train an epoch twice; nothing checks what it
reads back, so a damaged file is loaded as it is.

Writing. `AtomicBackup` writes each backup as a new file under a temporary name, flushes it to
disk, records its SHA-256, renames it (`keras_wt.app.runs.replace_file`), and only then replaces the
manifest (`manifest.json`, written the same way) that names it. At every instant the manifest
names complete files. On storage without an atomic rename (GCS) the manifest is still written
last, after the file it names is complete. The manifest (format 2):

    {"format": 2, "epochs": 3, "iterations": 9, "weights": "epoch-0003.weights.h5",
     "sha256": "...", "steps_per_epoch": 3,
     "previous": [{"epochs": 2, "iterations": 6, "weights": "epoch-0002.weights.h5",
                   "sha256": "..."}, ...]}

names the newest backup (the epochs completed, the optimizer's step count, the file's checksum)
and the older ones kept, newest first. Backups older than the previous one are deleted last,
after the new manifest is in place (every epoch's is kept with `keep=True`): the previous backup
stays until a newer one is complete and recorded, and stays after that as the fallback.

Reading. `restore` checks the newest backup before it continues from it: its step count is
`epochs × steps_per_epoch`, its file has the recorded checksum, and the step count the file holds
is the recorded one. A backup that fails is reported (a warning naming the file and what is wrong
with it) and the previous one is tried, and so on. A manifest that is missing or unreadable is
recovered from the backup files themselves, newest first, each loaded and checked against
`epochs × steps_per_epoch` (their checksums cannot be checked; the warning says so). When no
backup passes, `BackupError` names every file and why: a damaged backup never makes a run start
over or continue from wrong weights.

    backup = AtomicBackup("run/backup", steps_per_epoch=469)
    epochs_done = backup.restore(model)          # 0 when there is no backup yet
    model.fit(data, epochs=10, initial_epoch=epochs_done, callbacks=[..., backup])

Put it last among the callbacks, so that a backup is written after everything else an epoch
writes (a run killed before it redoes the epoch).
"""

import hashlib
import json
import logging
import math
import os
import re

import keras
import numpy as np
import tensorflow as tf

from keras_wt.app import runs

logger = logging.getLogger("keras_wt")

MANIFEST = "manifest.json"
FORMAT = 2
_WEIGHTS = re.compile(r"epoch-(\d{4,})\.weights\.h5")


class BackupError(runs.RunError):
    """No backup of a run can be trusted: the message names each file and what is wrong."""


def _weights_name(epochs):
    return f"epoch-{epochs:04d}.weights.h5"


def sha256(path):
    """The SHA-256 (hex) of a local or `gs://` file."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def _reserve(path, size):
    """Allocates `size` bytes for `path` and deletes it again: a disk too full for a backup of
    that size fails here with an `OSError` (no space, or a file-size limit) and not inside HDF5,
    which does not survive a failed write (h5py ignores the errors and the process then crashes
    with a segmentation fault)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (no room for a backup of about {size:,} bytes)",
                      path) from None
    finally:
        os.close(fd)
        os.remove(path)


def _entry(epochs, iterations, weights, checksum):
    return {"epochs": epochs, "iterations": iterations, "weights": weights, "sha256": checksum}


class AtomicBackup(keras.callbacks.Callback):
    """Backs up the model's weights (`W`, feedback kernels `B`, batch-norm statistics) and its
    optimizer's state (momentum, step count, so also the learning-rate schedule's position and
    the weight mirror's noise) at the end of every epoch, crash-safely and checked (module
    docstring).

    Args:
        backup_dir: the folder of the backups (local or `gs://`).
        keep: keep every epoch's backup (`epoch-NNNN.weights.h5`: per-epoch checkpoints),
            instead of the latest two.
        steps_per_epoch: the optimizer steps of an epoch, which `restore` checks every backup's
            step count against (`None`: not checked, and a missing manifest cannot be recovered).
    """

    def __init__(self, backup_dir, keep=False, steps_per_epoch=None):
        super().__init__()
        self.backup_dir = backup_dir
        self.keep = keep
        self.steps_per_epoch = steps_per_epoch

    @property
    def manifest_path(self):
        return os.path.join(self.backup_dir, MANIFEST)

    def _path(self, name):
        return os.path.join(self.backup_dir, name)

    def manifest(self):
        """The manifest (module docstring), or `None` without a backup.

        Raises:
            BackupError: the manifest is there but unreadable.
        """
        if not tf.io.gfile.exists(self.manifest_path):
            return None
        try:
            with tf.io.gfile.GFile(self.manifest_path) as f:
                manifest = json.load(f)
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
            for entry in [manifest] + list(manifest.get("previous", [])):
                int(entry["epochs"]), int(entry["iterations"]), str(entry["weights"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise BackupError(f"{self.manifest_path} is damaged ({type(e).__name__}: {e})")
        return manifest

    def _backup_files(self):
        """`{epochs: file name}` of the backup files in the folder."""
        if not tf.io.gfile.isdir(self.backup_dir):
            return {}
        found = (_WEIGHTS.fullmatch(name) for name in tf.io.gfile.listdir(self.backup_dir))
        return {int(m.group(1)): m.group(0) for m in found if m}

    def _candidates(self):
        """`(backups to try, newest first; what is wrong with the manifest, or None)`."""
        try:
            manifest, problem = self.manifest(), None
        except BackupError as e:
            manifest, problem = None, str(e)
        if manifest is not None:
            newest = _entry(manifest["epochs"], manifest["iterations"], manifest["weights"],
                            manifest.get("sha256"))
            return [newest] + list(manifest.get("previous", [])), None
        files = self._backup_files()
        if not files:
            return [], problem  # no backup yet, or a damaged manifest and nothing else
        spe = self.steps_per_epoch
        return [_entry(e, None if spe is None else e * spe, files[e], None)
                for e in sorted(files, reverse=True)], problem or f"{self.manifest_path} is missing"

    def _check(self, model, entry):
        """Loads backup `entry` into `model`; returns what is wrong with it, or `None`."""
        epochs, iterations, name = int(entry["epochs"]), entry["iterations"], entry["weights"]
        spe = self.steps_per_epoch
        if iterations is None:
            return "its step count cannot be checked (steps_per_epoch unknown)"
        iterations = int(iterations)
        if spe is not None and iterations != epochs * spe:
            return (f"its record says {iterations} steps after {epochs} epochs, not "
                    f"{epochs} × {spe} = {epochs * spe}")
        path = self._path(name)
        if not tf.io.gfile.exists(path):
            return "the file is missing"
        if entry.get("sha256") and sha256(path) != entry["sha256"]:
            return "its checksum differs from the one recorded when it was written (damaged)"
        try:
            model.load_weights(path)
        except Exception as e:  # h5py's errors for a truncated or altered file vary by version
            first_line = (str(e).splitlines() or [""])[0]
            return f"it cannot be loaded ({type(e).__name__}: {first_line:.200})"
        loaded = int(model.optimizer.iterations.numpy())
        if loaded != iterations:
            return f"it holds step {loaded}, not the {iterations} recorded"
        return None

    def restore(self, model):
        """Loads the newest backup that passes its checks (module docstring) into `model`
        (built, compiled) and returns the number of epochs it completed (0, and `model`
        unchanged, when there is no backup).

        Raises:
            BackupError: there are backups, but none passes its checks.
        """
        self.set_model(model)
        candidates, problem = self._candidates()
        if not candidates and problem is None:
            return 0
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        failures = [problem] if problem else []
        for entry in candidates:
            wrong = self._check(model, entry)
            if wrong is None:
                if failures:
                    unchecked = "" if entry.get("sha256") else (
                        "; its checksum is unknown (no manifest), its step count agrees")
                    logger.warning("Backup %s: %s. Resuming from %s (epoch %d) instead%s.",
                                   self.backup_dir, "; ".join(failures), entry["weights"],
                                   entry["epochs"], unchecked)
                return int(entry["epochs"])
            failures.append(f"{entry['weights']}: {wrong}")
        raise BackupError(
            f"No usable backup in {self.backup_dir}: " + "; ".join(failures or ["no files"])
            + ". Refusing to resume (it would start over or continue from wrong weights): "
            "restore the backup folder, or start a new run."
        )

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1)

    def _expected_size(self):
        """About the size of the next backup file: the newest one's, or (none yet) the bytes of
        the variables plus HDF5's overhead, with a margin."""
        files = self._backup_files()
        if files:
            size = tf.io.gfile.stat(self._path(files[max(files)])).length
        else:
            variables = list(self.model.weights) + list(self.model.optimizer.variables)
            size = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
            size += 4096 * len(variables)
        return int(size * 1.1) + (1 << 16)

    def save(self, epochs):
        """Backs up the model after `epochs` completed epochs."""
        tf.io.gfile.makedirs(self.backup_dir)
        older = [e for e in self._candidates()[0] if int(e["epochs"]) < epochs]
        name = _weights_name(epochs)
        final = self._path(name)
        local = runs.is_local(final)
        tmp = self._path(f"tmp-{name}") if local else final
        if local:
            _reserve(tmp, self._expected_size())
        self.model.save_weights(tmp, overwrite=True)
        checksum = sha256(tmp)
        if local:
            runs.replace_file(tmp, final)
        kept = older if self.keep else older[:1]
        manifest = dict(
            format=FORMAT,
            **_entry(epochs, int(self.model.optimizer.iterations.numpy()), name, checksum),
            steps_per_epoch=self.steps_per_epoch, previous=kept,
        )
        runs.write_text(self.manifest_path, json.dumps(manifest, indent=1))
        if not self.keep:  # older backups, listed or not (a manifest of an older format)
            names = {e["weights"] for e in [manifest] + kept}
            for done, stale in self._backup_files().items():
                if done < epochs and stale not in names:
                    tf.io.gfile.remove(self._path(stale))
