"""Where the raw files of a small dataset are looked for (`data_dir`, `$KERAS_WT_DATA_DIR`,
`~/.keras/datasets`, `/usr/share/datasets`; see `keras_wt.app.data.datasets`), and what to say
when they are not there."""

import logging
import os

import numpy as np

from keras_wt.app.data import readers
from keras_wt.app.data.info import info

logger = logging.getLogger(__name__)

# Searched after `data_dir` (see `_default_roots`, which tests replace).
SYSTEM_DATA_DIR = "/usr/share/datasets"
ENV_VAR = "KERAS_WT_DATA_DIR"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"

_HOW_TO_GET = {
    "mnist": (
        "download the four .gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ "
        "(a mirror of http://yann.lecun.com/exdb/mnist/)"
    ),
    "fashion_mnist": (
        "`apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist/), "
        "or download the four .gz files from "
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    ),
    "cifar10": (
        "download https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz and unpack it "
        "(it makes cifar-10-batches-bin/)"
    ),
}


def _default_roots():
    """Roots after `data_dir`: `$KERAS_WT_DATA_DIR`, `~/.keras/datasets`, `SYSTEM_DATA_DIR`."""
    roots = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    roots.append(os.path.join(keras_home, "datasets"))
    roots.append(SYSTEM_DATA_DIR)
    return roots


def _candidate_dirs(name, data_dir):
    """Directories that may hold `name`'s raw files, in search order, without duplicates."""
    subdirs = [name, name.replace("_", "-")]
    if name == "cifar10":
        subdirs += ["cifar-10", "cifar-10-batches-bin", "cifar-10-batches-py"]
        subdirs += [os.path.join("cifar10", d) for d in subdirs[-2:]]
    dirs = []
    if data_dir is not None:
        # Only an explicit data_dir may hold the files directly; and when it is given it is the
        # only root: an incomplete data_dir is an error, never a silent fallback to another copy.
        dirs.append(os.fspath(data_dir))
    roots = [os.fspath(data_dir)] if data_dir is not None else _default_roots()
    for root in roots:
        dirs += [os.path.join(root, sub) for sub in subdirs]
    return list(dict.fromkeys(os.path.normpath(os.path.expanduser(d)) for d in dirs))


def _find(directory, basename, suffixes):
    for suffix in suffixes:
        path = os.path.join(directory, basename + suffix)
        if os.path.isfile(path):
            return path
    return None


def _find_idx(directory):
    """Returns {split: (images_path, labels_path)} if all four IDX files are here, else None."""
    found = {}
    for split, basenames in _IDX_FILES.items():
        paths = []
        for basename in basenames:
            # Some unpackers write "train-images.idx3-ubyte"; accept it too.
            dotted = basename.replace("-idx", ".idx")
            path = _find(directory, basename, (".gz", "")) or _find(directory, dotted, (".gz", ""))
            if path is None:
                return None
            paths.append(path)
        found[split] = tuple(paths)
    return found


def _find_cifar(directory):
    """Returns (reader, train_paths, test_path) if a complete CIFAR-10 set is here, else None."""
    for suffix, reader in ((".bin", readers.read_cifar_binary), ("", readers.read_cifar_pickle)):
        paths = [os.path.join(directory, b + suffix) for b in _CIFAR_TRAIN_BATCHES]
        test = os.path.join(directory, _CIFAR_TEST_BATCH + suffix)
        if all(os.path.isfile(p) for p in paths + [test]):
            return reader, paths, test
    return None


def _missing(name, directory):
    """`" (has ...; missing ...)"` for a directory that holds some of the files, else `""`."""
    if not os.path.isdir(directory):
        return ""
    if name == "cifar10":
        names = list(_CIFAR_TRAIN_BATCHES) + [_CIFAR_TEST_BATCH]
        present = [n for n in names if _find(directory, n, (".bin", ""))]
    else:
        names = [b for pair in _IDX_FILES.values() for b in pair]
        present = [n for n in names if _find(directory, n, (".gz", ""))
                   or _find(directory, n.replace("-idx", ".idx"), (".gz", ""))]
    if not present:
        return " (none of the files)"
    missing = [n for n in names if n not in present]
    return f" (has {', '.join(present)}; missing {', '.join(missing)})"


def _expected_files(name):
    if name == "cifar10":
        return (
            "data_batch_1.bin ... data_batch_5.bin and test_batch.bin (CIFAR-10 binary), or "
            "data_batch_1 ... data_batch_5 and test_batch (CIFAR-10 python)"
        )
    return ", ".join(f"{b}.gz" for pair in _IDX_FILES.values() for b in pair) + " (or un-gzipped)"


def _load_local(name, data_dir):
    """Returns ((x_train, y_train), (x_test, y_test), directory) or (None, tried_dirs)."""
    num_classes = info(name).num_classes
    tried = _candidate_dirs(name, data_dir)
    for directory in tried:
        if not os.path.isdir(directory):
            continue
        if name == "cifar10":
            found = _find_cifar(directory)
            if found is None:
                continue
            reader, train_paths, test_path = found

            def read(path):
                images, labels = reader(path)
                return images, readers.check_labels(labels, num_classes, path)

            parts = [read(p) for p in train_paths]
            train = (
                np.concatenate([x for x, _ in parts]),
                np.concatenate([y for _, y in parts]),
            )
            test = read(test_path)
        else:
            found = _find_idx(directory)
            if found is None:
                continue
            train = readers._read_idx_pair(*found["train"], num_classes)
            test = readers._read_idx_pair(*found["test"], num_classes)
        logger.info("Loaded %s from %s", name, directory)
        return (train, test), directory
    return None, tried
