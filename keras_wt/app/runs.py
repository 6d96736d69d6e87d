"""The run folder: what a training run writes, and how to find and read runs again.

`keras_wt.app.training.train` writes one folder per run; `keras-wt-train` places it at
`<save_dir>/<dataset>/<algo>-V<i>/` (`i` = 0, 1, ...; nothing is overwritten), the TPU trainer at
its `--model_dir`. `keras-wt-plot` reads these folders. Epochs are numbered from 1 everywhere.

    experiment_config.json  the command-line flags, the `TrainConfig` (`"train_config"`, flat:
                            `TrainConfig.record`) and what was derived from them (`"derived"`:
                            versions, machine, converted units)
    log.txt                 the run's log, one summary line per evaluated epoch
    results.json            {"epoch_<e>": {...}} for every evaluated epoch e (1-based): `loss`,
                            `accuracy`, `test_loss`, `test_accuracy` (accuracies in percent),
                            `weight_angles`, `delta_angles` ({layer: degrees}), `seconds`, ...
    history.csv             every epoch's logs (Keras's CSVLogger)
    tensorboard/            Keras's TensorBoard callback (train/ and validation/)
    backup/                 keras_wt.app.backup.AtomicBackup: manifest.json and epoch-NNNN.weights.h5,
                            the state a resumed run continues from (every epoch's, when kept)
    model.keras             the trained model
    diverged.json           only if the run diverged (`keras_wt.app.callbacks.StopOnDivergence`):
                            where and why ({epoch, batch, loss, reason}); a resumed run refuses to
                            continue it while it is there
    run.lock                the lock of the process writing the run (`RunLock`; its pid)

Every epoch appears exactly once in `results.json`, `history.csv` and the TensorBoard events,
also after a kill and any number of resumptions: an epoch's records are written before its backup,
and a resumed run first cuts them back to the epochs its backup holds (`keras_wt.app.resume`).
`log.txt` keeps everything, with a line where each resumption starts.

Files that a kill must not leave half written (`experiment_config.json`, `results.json`,
`diverged.json`, `model.keras`, the backups) are written under a temporary name, flushed to disk
and renamed over the old one, and the folder is flushed after the rename (`replace_file`), so a
kill or a power cut leaves either the old or the new file.

Paths may be local or `gs://...` (read and written through `tf.io.gfile` where that matters; GCS
has no atomic rename and no lock: there, run one writer per folder yourself).
"""

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil

CONFIG_FILE = "experiment_config.json"
RESULTS_FILE = "results.json"
LOG_FILE = "log.txt"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.keras"
TENSORBOARD_DIR = "tensorboard"
BACKUP_DIR = "backup"
DIVERGED_FILE = "diverged.json"
LOCK_FILE = "run.lock"
# What a run folder holds before its run has trained anything (`is_unstarted`).
SETUP_FILES = (CONFIG_FILE, LOG_FILE, LOCK_FILE)


class RunError(RuntimeError):
    """A run folder that cannot be written or continued as asked: held by another process, a
    backup that is damaged or missing, records that contradict each other. The message says what
    was found and what to do; the command lines print it as one line and exit with status 1."""


class RunLocked(RunError):
    """Another process holds the run folder's lock (`RunLock`)."""


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def is_local(path):
    """Whether `path` is on a local file system (not `gs://...`)."""
    return "://" not in os.fspath(path)


def sync_dir(path):
    """Flushes a local folder's entries (a rename or a new file in it) to disk."""
    if not is_local(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(tmp, path):
    """Moves the complete local file `tmp` to `path` so that a kill or a power cut at any instant
    leaves either the old `path` or the new one: flushes `tmp`'s data to disk, renames it
    (atomic), then flushes the folder, which holds the rename."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(os.path.dirname(path) or ".")


def write_text(path, text):
    """Writes `text` to `path`: locally through a temporary file and `replace_file`; on GCS in
    one write (the object appears complete or not at all)."""
    if not is_local(path):
        with _gfile().GFile(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    replace_file(tmp, path)


def write_json(path, data):
    """Writes `data` to `path` as JSON (`write_text`); non-finite numbers become `null`."""
    write_text(path, json.dumps(_finite(data), indent=2, allow_nan=False))


def read_text(path):
    """The text of a local or `gs://` file, its line endings as written."""
    if not is_local(path):
        with _gfile().GFile(path) as f:
            return f.read()
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def read_json(path):
    return json.loads(read_text(path))


def exists(path):
    return os.path.exists(path) if is_local(path) else _gfile().exists(path)


def _finite(data):
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def epoch_key(epoch):
    """The `results.json` key of epoch `epoch` (1-based)."""
    return f"epoch_{epoch}"


def key_epoch(key):
    """The epoch (1-based) of a `results.json` key."""
    return int(key.split("_", 1)[1])


def run_dirs(save_dir, dataset, algo=None):
    """Run folders `<save_dir>/<dataset>/<algo>-V<i>`, sorted by algorithm then `i`."""
    root = os.path.join(save_dir, dataset)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = re.fullmatch(r"(\w+)-V(\d+)", name)
        if match and (algo is None or match.group(1) == algo):
            found.append((match.group(1), int(match.group(2)), os.path.join(root, name)))
    return [path for _, _, path in sorted(found)]


def run_version(run_dir):
    """`i` of a run folder `.../<algo>-V<i>`."""
    return int(run_dir.rstrip("/").rsplit("-V", 1)[1])


def new_run_dir(save_dir, dataset, algo):
    """Creates and returns `<save_dir>/<dataset>/<algo>-V<i>` with the first free `i`."""
    root = os.path.join(save_dir, dataset)
    os.makedirs(root, exist_ok=True)
    i = 0
    while True:
        path = os.path.join(root, f"{algo}-V{i}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            i += 1


def load_results(run_dir):
    """`(config, results)` of a run folder; `results` is `{}` when nothing was evaluated yet."""
    config = read_json(os.path.join(run_dir, CONFIG_FILE))
    path = os.path.join(run_dir, RESULTS_FILE)
    results = read_json(path) if exists(path) else {}
    return config, results


def read_config(run_dir):
    """The saved `experiment_config.json` of `run_dir`, or `None` when it has none.

    Raises:
        RunError: the file is there but not a JSON object (damaged).
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not exists(path):
        return None
    try:
        config = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        config = e
    if not isinstance(config, dict):
        raise RunError(
            f"{path} is damaged ({config!r:.80}): the run's settings cannot be read. Restore the "
            "file, or start a new run."
        )
    return config


def results_entry(logs):
    """The `results.json` entry of one epoch's `logs` (Keras's, or a row of `history.csv`, where
    `NA` marks a value the epoch did not have): every number, `val_<m>` as `test_<m>`, and the
    alignment keys `<kind>/<layer>` grouped as `<kind>s: {layer: value}` (`weight_angles`,
    `delta_angles`, ...)."""
    entry = {}
    for key, value in logs.items():
        if key == "epoch" or value in ("NA", "", None):
            continue
        value = float(value)
        if "/" in key:
            kind, layer = key.split("/", 1)
            entry.setdefault(f"{kind}s", {})[layer] = value
        elif key.startswith("val_"):
            entry[f"test_{key[4:]}"] = value
        else:
            entry[key] = value
    return entry


def is_unstarted(run_dir):
    """Whether `run_dir` holds nothing its run produced yet: at most its configuration, its log
    and its lock (a run stopped while it set up: loading data, building the model)."""
    return os.path.isdir(run_dir) and all(
        name in SETUP_FILES or name.endswith(".tmp") for name in os.listdir(run_dir)
    )


class RunLock:
    """One writer per run folder: an exclusive `fcntl.flock` on `<run_dir>/run.lock`, held from
    `__enter__` to `__exit__` (or until the process ends: the kernel releases a dead process's
    lock, so a killed run leaves no stale lock). The file holds the holder's pid.

        with runs.RunLock(run_dir):
            ...  # train it, resume it, or claim it for a sweep

    Reentrant within a process (a sweep that claims a run, then trains it in the same process,
    takes it twice; the lock is released when the outermost `with` ends). The file is never
    deleted: a process that deleted it could leave two holders of two different files. A `gs://`
    folder is not locked (GCS has no locks).

    Raises:
        RunLocked: another process holds the lock; the message names its pid.
    """

    _held = {}  # real path of a lock file -> [open file, depth], for this process

    def __init__(self, run_dir):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)

    def __enter__(self):
        self._key = key = os.path.realpath(self.path) if is_local(self.path) else None
        if key is None:
            return self
        if key in self._held:
            self._held[key][1] += 1
            return self
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid = f"process {holder.split()[0]}" if holder else "another process"
            raise RunLocked(
                f"{self.run_dir} is being written by {pid} (it holds {self.path}); one run "
                "folder takes one writer. Wait until that process ends, or stop it, then run "
                "this again."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._held[key] = [f, 1]
        return self

    def __exit__(self, *exc):
        key = self._key
        if key is None:
            return
        held = self._held[key]
        held[1] -= 1
        if not held[1]:
            del self._held[key]
            held[0].close()  # releases the flock


def remove_unstarted(run_dir):
    """Deletes `run_dir` if it is unstarted (`is_unstarted`), holding its lock while it does (so
    never a folder another process is writing). Only for a folder this process created."""
    with contextlib.suppress(RunLocked), RunLock(run_dir):
        if is_unstarted(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
