"""The one place datasets load: local raw files first, then TensorFlow Datasets, else a clear error.

Small image datasets (`"mnist"`, `"fashion_mnist"`, `"cifar10"`) are read from the raw files
their authors distribute, so nothing needs a network (DESIGN.md §5):

- MNIST and Fashion-MNIST: the four IDX files `train-images-idx3-ubyte.gz`,
  `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`
  (gzipped or not). `apt-get install dataset-fashion-mnist` puts Fashion-MNIST under
  `/usr/share/datasets/fashion-mnist/`, the offline default for demos.
- CIFAR-10: the binary batches `data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`
  (`cifar-10-binary.tar.gz`), or the Python pickles `data_batch_1` ... `test_batch`
  (`cifar-10-python.tar.gz`).

Files are looked for in `data_dir` itself and in `<data_dir>/<name>`, `<data_dir>/<name-with-dashes>`
(and for CIFAR-10 `cifar-10-batches-bin`, `cifar-10-batches-py`); when `data_dir` is given nowhere
else, so an incomplete `data_dir` is an error that lists what it has and what is missing. Without
it, the same subfolders of each root in `$KERAS_WT_DATA_DIR` (`os.pathsep`-separated), the Keras
download cache `~/.keras/datasets` and `/usr/share/datasets` are searched. Labels outside the
dataset's classes, images that are not uint8 and damaged files raise an error naming the file. When no complete set is found, TensorFlow
Datasets is tried (it downloads when a network is there); when that fails too, one
`FileNotFoundError` lists every place tried and the file names expected.

ImageNet is read by `imagenet()` from TFRecords in the standard `train-00000-of-01024`,
`validation-00000-of-00128` layout (`data_dir` may be a `gs://` path), falling back to the TFDS
`imagenet2012` builder.

Example:

```python
from keras_wt.app.data import datasets

train = datasets.load("fashion_mnist", "train", batch_size=128, flatten=True)
test = datasets.load("fashion_mnist", "test", batch_size=1000, flatten=True)
(x_train, y_train), (x_test, y_test) = datasets.load_numpy("fashion_mnist")
```
"""

import dataclasses
import gzip
import logging
import os
import pickle
import re
import socket

import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE

# Searched after `data_dir` (see `_default_roots`, which tests replace).
SYSTEM_DATA_DIR = "/usr/share/datasets"
ENV_VAR = "KERAS_WT_DATA_DIR"

# Where TensorFlow Datasets downloads from; reached or not within the timeout before TFDS is
# asked for a dataset it has not prepared (its own retries take minutes offline).
TFDS_SOURCE = ("storage.googleapis.com", 443)
NETWORK_TIMEOUT_S = 3.0

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """The data on disk cannot be trained on: a damaged or missing file, splits that disagree."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds.

    Attributes:
        name: the name `load` takes.
        num_classes: number of labels; labels are `0 .. num_classes - 1`.
        image_shape: `(height, width, channels)` of one image (ImageNet: the default crop).
        num_train: examples in the `"train"` split.
        num_test: examples in the held-out split (`"test"`; ImageNet: `"validation"`).
        splits: the split names `load` accepts.
    """

    name: str
    num_classes: int
    image_shape: tuple
    num_train: int
    num_test: int
    splits: tuple = ("train", "test")


_INFO = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), 60000, 10000),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), 60000, 10000),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), 50000, 10000),
    "imagenet": DatasetInfo(
        "imagenet", 1000, (224, 224, 3), 1281167, 50000, ("train", "validation")
    ),
}
NAMES = tuple(_INFO)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32

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

# The IDX element types: type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def info(name):
    """Returns the `DatasetInfo` (classes, image shape, split sizes) of dataset `name`."""
    return _INFO[_check_name(name)]


def _check_name(name):
    if name not in _INFO:
        raise ValueError(f"name={name!r} is not one of {NAMES}")
    return name


def _check_split(name, split):
    splits = _INFO[name].splits
    if split not in splits:
        raise ValueError(f"split={split!r} is not one of {splits} for dataset {name!r}")
    return split


# ------------------------------------------------------------------------------------------------
# Raw file readers


def _open(path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_bytes(path):
    """The (un-gzipped) bytes of `path`; a damaged gzip stream is a `ValueError` naming it."""
    try:
        with _open(path) as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise ValueError(f"{path} is damaged: {type(e).__name__}: {e}") from e


def read_idx(path):
    """Reads one IDX file (the MNIST format, gzipped or not) into a numpy array.

    The header is two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then
    each dimension as a big-endian uint32; the data follows, big-endian, row-major.

    Raises:
        ValueError: the file is not IDX, or its size disagrees with its header.
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: magic number {data[:4].hex() or 'missing'} does not "
            "start with 0000 followed by a type code in "
            f"{sorted(hex(code) for code in _IDX_DTYPES)}"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: its header announces {ndim} dimensions")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path} has {len(data)} bytes but its header (shape {shape}, {dtype}) needs "
            f"{expected}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _read_idx_pair(images_path, labels_path, num_classes):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{images_path} (shape {images.shape}) and {labels_path} (shape {labels.shape}) "
            "are not an (N, H, W) image file and its (N,) label file"
        )
    if images.dtype != np.uint8:
        # Casting would truncate (floats in [0, 1] become zeros): refuse instead of guessing.
        raise ValueError(
            f"{images_path} holds {images.dtype} pixels in [{images.min()}, {images.max()}]; "
            "MNIST-format images are uint8 in [0, 255]. Convert them (e.g. "
            "np.round(x * 255).astype(np.uint8) for floats in [0, 1]) and write the file again."
        )
    return images[..., np.newaxis], check_labels(labels, num_classes, labels_path)


def check_labels(labels, num_classes, source):
    """`labels` as int32 after checking every one is a class in `[0, num_classes)`; else a
    `ValueError` naming `source` and the first bad index."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source} holds {labels.dtype} labels; class labels are integers")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"{source} has {bad.size} labels outside [0, {num_classes}): the first is "
            f"{int(labels[bad[0]])} at index {int(bad[0])}"
        )
    return labels.astype(np.int32)


def _chw_records_to_hwc(flat):
    """(N, 3072) rows of red, green, blue 32x32 planes -> (N, 32, 32, 3) uint8 images."""
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def read_cifar_binary(path):
    """Reads a CIFAR-10 binary batch: 3073-byte records, a label byte then CHW pixels.

    Returns:
        `(images, labels)`: uint8 `(N, 32, 32, 3)` and int32 `(N,)`.
    """
    data = np.frombuffer(_read_bytes(path), dtype=np.uint8)
    if data.size % _CIFAR_RECORD_BYTES:
        raise ValueError(
            f"{path} has {data.size} bytes, not a multiple of the {_CIFAR_RECORD_BYTES}-byte "
            "CIFAR-10 record"
        )
    records = data.reshape(-1, _CIFAR_RECORD_BYTES)
    return _chw_records_to_hwc(records[:, 1:]), records[:, 0].astype(np.int32)


def read_cifar_pickle(path):
    """Reads a CIFAR-10 Python batch: a pickled dict with `b"data"` (N, 3072) and `b"labels"`.

    Unpickling runs code from the file: only read files from a source you trust.
    """
    with _open(path) as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(
            f"{path} holds data of shape {data.shape} and {len(labels)} labels, not "
            "(N, 3072) and N"
        )
    return _chw_records_to_hwc(data), labels


# ------------------------------------------------------------------------------------------------
# Where files are looked for


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
    for suffix, reader in ((".bin", read_cifar_binary), ("", read_cifar_pickle)):
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
                return images, check_labels(labels, num_classes, path)

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
            train = _read_idx_pair(*found["train"], num_classes)
            test = _read_idx_pair(*found["test"], num_classes)
        logger.info("Loaded %s from %s", name, directory)
        return (train, test), directory
    return None, tried


def _network_reaches(address, timeout=NETWORK_TIMEOUT_S):
    """Whether a TCP connection to `(host, port)` opens within `timeout` seconds."""
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError:
        return False
    return True


def _tfds_load(name, data_dir):
    """Loads both splits with TensorFlow Datasets as numpy arrays (downloads if it can).

    Raises `ConnectionError` at once when TFDS has not prepared the dataset and its download
    source cannot be reached, instead of letting TFDS retry for minutes."""
    import tensorflow_datasets as tfds

    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # "Variant folder ... has no dataset_info.json"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    finally:
        absl_log.setLevel(level)
    if not prepared and not _network_reaches(TFDS_SOURCE):
        raise ConnectionError(
            f"TFDS has no prepared copy in {builder.data_dir} and cannot reach its download "
            f"source {TFDS_SOURCE[0]} (no network?)"
        )
    splits = tfds.load(
        name, split=["train", "test"], data_dir=data_dir, batch_size=-1, as_supervised=True
    )
    return tuple(
        (np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int32))
        for x, y in tfds.as_numpy(splits)
    )


def load_numpy(name, data_dir=None):
    """Loads a small image dataset as numpy arrays.

    Args:
        name: `"mnist"`, `"fashion_mnist"` or `"cifar10"`.
        data_dir: a directory holding the raw files (directly or in a `<name>` subdirectory);
            also passed to TensorFlow Datasets if no raw files are found.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images `(N, H, W, C)` and int32 labels.

    Raises:
        FileNotFoundError: no raw files anywhere and TensorFlow Datasets failed; the message says
            where the files were looked for and how to get them.
    """
    name = _check_name(name)
    if name == "imagenet":
        raise ValueError(
            "ImageNet does not fit in numpy arrays; use keras_wt.app.data.datasets.imagenet(data_dir, ...) "
            "or load('imagenet', ...)"
        )
    arrays, where = _load_local(name, data_dir)
    if arrays is not None:
        return arrays
    try:
        arrays = _tfds_load(name, None if data_dir is None else os.fspath(data_dir))
    except Exception as e:  # ImportError, no network, a half-prepared TFDS directory, ...
        tfds_error = f"{type(e).__name__}: {e}"
    else:
        logger.info("Loaded %s with TensorFlow Datasets", name)
        return arrays
    places = "\n".join(f"  {d}{_missing(name, d)}" for d in where)
    raise FileNotFoundError(
        f"Could not find dataset {name!r}. Looked for the files {_expected_files(name)} in:\n"
        f"{places}\n"
        f"and TensorFlow Datasets (tfds.load({name!r}, data_dir={data_dir!r})) failed with "
        f"{tfds_error}.\n"
        f"To fix: {_HOW_TO_GET[name]}, then put the files in one of the directories above "
        f"(or pass data_dir=, or set ${ENV_VAR}); or run once with a network so TensorFlow "
        "Datasets can download it."
    )


# ------------------------------------------------------------------------------------------------
# tf.data pipelines


def load(
    name,
    split="train",
    data_dir=None,
    batch_size=None,
    shuffle=None,
    seed=None,
    flatten=False,
    one_hot=False,
    drop_remainder=False,
    **imagenet_kwargs,
):
    """Returns a `tf.data.Dataset` of `(image, label)` for one split of a dataset.

    Images are float32 in `[0, 1]` (uint8 divided by 255; ImageNet: normalised by the ImageNet
    mean and standard deviation, see `imagenet`); labels are int32 class indices, or float32
    one-hot vectors with `one_hot=True`. Images stay uint8 until the map that scales them, after
    batching.

    Args:
        name: one of `NAMES`: `"mnist"`, `"fashion_mnist"`, `"cifar10"`, `"imagenet"`.
        split: `"train"` or `"test"` (ImageNet: `"train"` or `"validation"`).
        data_dir: where the raw files are (see the module docstring).
        batch_size: batch size, or `None` for single examples.
        shuffle: shuffle the examples; default: only the `"train"` split.
        seed: seed of the shuffle.
        flatten: reshape each image to a vector of `H * W * C` values (for MLPs).
        one_hot: give labels as one-hot float32 vectors.
        drop_remainder: drop the last, smaller batch (needed on TPUs).
        **imagenet_kwargs: passed on to `imagenet` (e.g. `image_size`, `use_synthetic_data`);
            only for `name="imagenet"`.

    Example:

    >>> ds = load("fashion_mnist", "test", batch_size=256, flatten=True)  # doctest: +SKIP
    >>> ds.element_spec  # doctest: +SKIP
    (TensorSpec(shape=(None, 784), dtype=tf.float32, ...), TensorSpec(shape=(None,), ...))
    """
    name = _check_name(name)
    split = _check_split(name, split)
    num_classes = info(name).num_classes
    if name == "imagenet":
        ds = imagenet(
            data_dir,
            split,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_remainder=drop_remainder,
            **imagenet_kwargs,
        )
        return _finish(ds, flatten, one_hot, imagenet_kwargs.get("num_classes", num_classes))
    if imagenet_kwargs:
        raise TypeError(
            f"load() got arguments {sorted(imagenet_kwargs)} that only name='imagenet' takes"
        )
    train, test = load_numpy(name, data_dir)
    x, y = train if split == "train" else test
    if shuffle is None:
        shuffle = split == "train"
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda image, label: (tf.cast(image, tf.float32) / 255.0, label), AUTOTUNE)
    return _finish(ds, flatten, one_hot, num_classes).prefetch(AUTOTUNE)


def _finish(ds, flatten, one_hot, num_classes):
    """Flattens images and one-hot encodes labels, for batched or single examples."""
    if not (flatten or one_hot):
        return ds

    def fn(image, label):
        if flatten:
            size = int(np.prod(image.shape[-3:]))
            image = tf.reshape(image, tf.concat([tf.shape(image)[:-3], [size]], axis=0))
        if one_hot:
            label = tf.one_hot(label, num_classes, dtype=tf.float32)
        return image, label

    return ds.map(fn, AUTOTUNE)


# ------------------------------------------------------------------------------------------------
# ImageNet


_IMAGENET_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def _normalize(image):
    """float RGB in [0, 255] -> (image / 255 - mean) / std, per channel."""
    mean = tf.constant(IMAGENET_MEAN_RGB, tf.float32) * 255.0
    std = tf.constant(IMAGENET_STDDEV_RGB, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std


def _train_crop(image_bytes, image_size, seed):
    """Random-resized crop (area 8%-100%, aspect 3/4-4/3) decoded from the JPEG + random flip.

    `seed`: a stateless seed (shape `[2]`), drawn per example, so that the augmentation does not
    depend on the order in which parallel calls run."""
    shape = tf.image.extract_jpeg_shape(image_bytes)
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    # If no box is found in max_attempts, the op returns the whole image.
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=whole_image,
        seed=seed,
        min_object_covered=0.08,
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _eval_crop(image_bytes, image_size):
    """Resizes the shorter side to image_size * 256 / 224, then takes the central square crop."""
    image = tf.image.decode_jpeg(image_bytes, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    resize_min = float(round(image_size * 256 / 224))
    new_shape = tf.cast(tf.round(shape * resize_min / tf.reduce_min(shape)), tf.int32)
    new_shape = tf.maximum(new_shape, image_size)
    image = tf.image.resize(image, new_shape, method="bilinear")
    top, left = (new_shape[0] - image_size) // 2, (new_shape[1] - image_size) // 2
    image = image[top : top + image_size, left : left + image_size]
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _imagenet_files(data_dir, split):
    """The `<split>-*` files of `data_dir`; named `<split>-NNNNN-of-MMMMM`, all `MMMMM` of them
    must be there (else a `DataError` names how many are missing)."""
    if data_dir is None:
        return []
    files = sorted(tf.io.gfile.glob(os.path.join(os.fspath(data_dir), f"{split}-*")))
    shards = {re.fullmatch(rf"{split}-\d+-of-(\d+)", os.path.basename(f)) for f in files}
    if files and None not in shards and len({m.group(1) for m in shards}) == 1:
        declared = int(next(iter(shards)).group(1))
        if declared != len(files):
            raise DataError(
                f"{data_dir} holds {len(files)} {split}-*-of-{declared:05d} files, not the "
                f"{declared} their names declare: shards are missing or left over."
            )
    return files


def _count_pass(ds, expected, what):
    """`ds` (one pass over the records, `(image bytes, label)`), stopping with an
    `InvalidArgumentError` when the pass ends having read another number of examples than
    `expected` (a file cut short: TensorFlow reads a record cut inside its length field as the
    end of the file). The examples and their order are unchanged."""
    end = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(0, tf.int32), True))
    flagged = ds.map(lambda image, label: (image, label, False)).concatenate(end)

    def count(n, element):
        return n + tf.cast(tf.logical_not(element[2]), tf.int64), (*element, n)

    def check(image, label, last, n):
        template = what.replace("{", "{{").replace("}", "}}") + (
            f": one pass read {{}} examples, but {expected} are declared: a file is "
            "truncated, missing or extra (or declare the right number)")
        message = tf.strings.format(template, n)
        with tf.control_dependencies([
            tf.debugging.Assert(tf.logical_or(tf.logical_not(last), tf.equal(n, expected)),
                                [message])
        ]):
            return image, tf.identity(label), last

    ds = flagged.scan(tf.constant(0, tf.int64), count).map(check)
    return ds.filter(lambda image, label, last: tf.logical_not(last)).map(
        lambda image, label, last: (image, label))


def _tfds_imagenet(data_dir, split, training):
    """The TFDS `imagenet2012` split as (encoded JPEG, 0-based label); manual dir = data_dir."""
    import tensorflow_datasets as tfds

    download_config = tfds.download.DownloadConfig(manual_dir=data_dir)
    ds = tfds.load(
        "imagenet2012",
        split=split,
        shuffle_files=training,
        decoders={"image": tfds.decode.SkipDecoding()},
        download_and_prepare_kwargs={"download_config": download_config},
    )
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)), AUTOTUNE)


def imagenet(
    data_dir,
    split="train",
    batch_size=256,
    image_size=224,
    training=None,
    drop_remainder=True,
    use_synthetic_data=False,
    num_classes=1000,
    shuffle=None,
    shuffle_buffer=10000,
    cycle_length=16,
    seed=None,
    epoch=None,
    expected_examples=None,
):
    """Returns a `tf.data.Dataset` of preprocessed ImageNet `(image, label)` batches.

    Reads TFRecords named `train-*` / `validation-*` (the standard `train-00000-of-01024`
    layout) with the features `image/encoded` (JPEG) and `image/class/label` (int64, 1-based;
    returned 0-based as int32). Without such files it falls back to the TFDS `imagenet2012`
    builder with `data_dir` as its manual directory.

    Training preprocessing: a random crop of 8%-100% of the area with aspect ratio 3/4-4/3,
    decoded straight from the JPEG, resized to `image_size`, randomly flipped. Evaluation: resize
    the shorter side to `image_size * 256 / 224`, then the central `image_size` square. Both are
    normalised with the ImageNet mean and standard deviation (`IMAGENET_MEAN_RGB`,
    `IMAGENET_STDDEV_RGB`, on the [0, 1] scale).

    Args:
        data_dir: directory of the TFRecords; may be a `gs://` path.
        split: `"train"` or `"validation"`.
        batch_size: batch size, or `None` for single examples.
        image_size: side of the square output images.
        training: apply the training augmentation; default: `split == "train"`.
        drop_remainder: drop the last, smaller batch, giving static shapes (TPUs need it).
        use_synthetic_data: ignore `data_dir` and return an endless dataset of one constant batch
            of random images and labels of the right shapes (for measuring speed).
        num_classes: number of classes: the range of the synthetic labels, and of the files'
            labels (1..num_classes; one outside raises `InvalidArgumentError` naming the feature).
        shuffle: shuffle files and examples; default: `training`.
        shuffle_buffer: examples in the shuffle buffer.
        cycle_length: files read in parallel.
        seed: seed of the shuffles and the augmentation; with a seed the stream is the same in
            every run (a fixed order of files and examples, each example's crop and flip drawn
            from a stateless seed), without one parallel reads may reorder it for speed.
        epoch: with `shuffle`, one pass for this epoch (an int or an int64 tensor): its file
            order and augmentation drawn without state from `(seed, epoch)`, so every epoch's
            pass can be rebuilt alone (a resumed run). Default: `reshuffle_each_iteration`.
        expected_examples: the examples of one pass over the files; a pass that reads another
            number stops with an `InvalidArgumentError` saying so (a truncated or missing file).
            `None`: not counted.
    """
    split = _check_split("imagenet", split)
    training = split == "train" if training is None else training
    shuffle = training if shuffle is None else shuffle
    # With a seed the stream is reproducible (examples in a fixed order, augmentation seeded per
    # example); without one, parallel reads may reorder examples for speed.
    deterministic = seed is not None or not shuffle
    if use_synthetic_data:
        shape = [image_size, image_size, 3] if batch_size is None else [
            batch_size, image_size, image_size, 3
        ]
        images = tf.random.stateless_normal(shape, seed=[seed or 0, 1])
        labels = tf.random.stateless_uniform(
            shape[:-3], seed=[seed or 0, 2], maxval=num_classes, dtype=tf.int32
        )
        return tf.data.Dataset.from_tensors((images, labels)).repeat()

    files = _imagenet_files(data_dir, split)
    if files:
        ds = tf.data.Dataset.from_tensor_slices(files)
        if shuffle and epoch is not None:
            # The file order of this epoch's pass, drawn without state from (seed, epoch).
            key = tf.stack([tf.constant(seed or 0, tf.int64), tf.cast(epoch, tf.int64)])
            order = tf.argsort(tf.random.stateless_uniform([len(files)], seed=key))
            ds = tf.data.Dataset.from_tensor_slices(tf.gather(files, order))
        elif shuffle:
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=8 * 1024 * 1024),
            cycle_length=cycle_length,
            num_parallel_calls=AUTOTUNE,
            deterministic=deterministic,
        )

        def parse(record):
            example = tf.io.parse_single_example(record, _IMAGENET_FEATURES)
            label = tf.cast(example["image/class/label"], tf.int32) - 1
            # A label outside 1..num_classes would train silently (one-hot of zeros): stop there.
            with tf.control_dependencies([
                tf.debugging.assert_greater_equal(
                    label, 0, message=f"ImageNet feature 'image/class/label' below 1 in {data_dir}"),
                tf.debugging.assert_less(
                    label, num_classes, message=f"ImageNet feature 'image/class/label' above "
                    f"num_classes={num_classes} in {data_dir}"),
            ]):
                return example["image/encoded"], tf.identity(label)

        ds = ds.map(parse, AUTOTUNE)
        if expected_examples:
            ds = _count_pass(ds, expected_examples, f"ImageNet {split} files in {data_dir}")
        logger.info("Reading ImageNet %s from %d files in %s", split, len(files), data_dir)
    else:
        try:
            ds = _tfds_imagenet(data_dir, split, shuffle)
        except Exception as e:  # ImportError, no manual files, no network, ...
            pattern = os.path.join(os.fspath(data_dir), f"{split}-*") if data_dir else None
            raise FileNotFoundError(
                f"Could not find ImageNet {split!r}: no TFRecord files match {pattern!r} "
                f"(data_dir={data_dir!r}), and the TensorFlow Datasets builder 'imagenet2012' "
                f"(manual_dir={data_dir!r}) failed with {type(e).__name__}: {e}.\n"
                "To fix: put TFRecords named train-00000-of-01024 ... and "
                "validation-00000-of-00128 ... (features image/encoded, image/class/label "
                "1-based) in data_dir, e.g. made with the imagenet_to_gcs.py script of "
                "tensorflow/tpu; or put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                "data_dir for TensorFlow Datasets to prepare."
            ) from e
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    def preprocess(index, example):
        image_bytes, label = example
        if training:
            # A stateless seed per example (its position in the stream): the same crop whatever
            # the order in which the parallel map runs.
            key = tf.random.experimental.stateless_fold_in(
                tf.stack([tf.constant(seed or 0, tf.int64),
                          tf.cast(0 if epoch is None else epoch, tf.int64) + 3]), index)
            image = _train_crop(image_bytes, image_size, key)
        else:
            image = _eval_crop(image_bytes, image_size)
        return _normalize(image), label

    ds = ds.enumerate().map(preprocess, AUTOTUNE, deterministic=deterministic)
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(AUTOTUNE)


def write_imagenet_tfrecords(directory, images, labels, split="train", num_shards=1):
    """Writes images as JPEG TFRecords in the standard ImageNet layout (tests, small demos).

    Files are `<split>-00000-of-<num_shards>` ...; each example has `image/encoded` (JPEG),
    `image/format`, `image/height`, `image/width` and `image/class/label` = label + 1 (the
    standard files are 1-based; `imagenet` returns 0-based labels again).

    Args:
        directory: output directory (created; may be a `gs://` path).
        images: uint8 RGB images `(H, W, 3)`, as one array or a list of differently sized ones.
        labels: 0-based int labels, one per image.
        split: `"train"` or `"validation"`.
        num_shards: number of files; examples are split into contiguous, near-equal shards.

    Returns:
        The list of paths written.
    """
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    directory = os.fspath(directory)
    tf.io.gfile.makedirs(directory)

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    paths = []
    for shard, indices in enumerate(np.array_split(np.arange(len(images)), num_shards)):
        path = os.path.join(directory, f"{split}-{shard:05d}-of-{num_shards:05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for i in indices:
                image = np.asarray(images[i], dtype=np.uint8)
                encoded = tf.io.encode_jpeg(image, quality=95).numpy()
                example = tf.train.Example(
                    features=tf.train.Features(
                        feature={
                            "image/encoded": feature(encoded),
                            "image/format": feature(b"JPEG"),
                            "image/height": feature(image.shape[0]),
                            "image/width": feature(image.shape[1]),
                            "image/class/label": feature(int(labels[i]) + 1),
                        }
                    )
                )
                writer.write(example.SerializeToString())
        paths.append(path)
    return paths
