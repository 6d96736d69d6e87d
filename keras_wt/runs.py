"""The run folder: what a training run writes, and how to find and read runs again.

`keras_wt.training.train` writes one folder per run; `keras-wt-train` places it at
`<save_dir>/<dataset>/<algo>-V<i>/` (`i` = 0, 1, ...; nothing is overwritten), the TPU trainer at
its `--model_dir`. `keras-wt-plot` reads these folders. Epochs are numbered from 1 everywhere.

    experiment_config.json  the command-line flags, the `TrainConfig` (`"train_config"`) and what
                            was derived from them (`"derived"`: versions, machine, converted units)
    log.txt                 the run's log, one summary line per evaluated epoch
    results.json            {"epoch_<e>": {...}} for every evaluated epoch e (1-based): `loss`,
                            `accuracy`, `test_loss`, `test_accuracy` (accuracies in percent),
                            `weight_angles`, `delta_angles` ({layer: degrees}), `seconds`, ...
    history.csv             every epoch's logs (Keras's CSVLogger)
    tensorboard/            Keras's TensorBoard callback (train/ and validation/)
    backup/                 keras_wt.backup.AtomicBackup: manifest.json and epoch-NNNN.weights.h5,
                            the state a resumed run continues from (every epoch's, when kept)
    model.keras             the trained model
    diverged.json           only if the loss became NaN or infinite: where ({epoch, batch, loss});
                            a resumed run refuses to continue it while it is there

Paths may be local or `gs://...` (read and written through `tf.io.gfile` where that matters).
"""

import json
import math
import os
import re

CONFIG_FILE = "experiment_config.json"
RESULTS_FILE = "results.json"
LOG_FILE = "log.txt"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.keras"
TENSORBOARD_DIR = "tensorboard"
BACKUP_DIR = "backup"
DIVERGED_FILE = "diverged.json"


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def write_json(path, data):
    """Writes `data` to `path` as JSON; non-finite numbers become `null`. Local files are
    replaced atomically (written to a temporary name, then renamed)."""
    text = json.dumps(_finite(data), indent=2, allow_nan=False)
    if "://" in path:
        with _gfile().GFile(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path):
    if "://" in path:
        with _gfile().GFile(path) as f:
            return json.load(f)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def exists(path):
    return _gfile().exists(path) if "://" in path else os.path.exists(path)


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
