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

import logging
import os
import socket

import numpy as np
import tensorflow as tf

from keras_wt.app.data import files
from keras_wt.app.data.imagenet import imagenet  # noqa: F401  (the ImageNet loader)
from keras_wt.app.data.imagenet import write_imagenet_tfrecords  # noqa: F401
from keras_wt.app.data.info import NAMES  # noqa: F401
from keras_wt.app.data.info import DataError  # noqa: F401
from keras_wt.app.data.info import DatasetInfo  # noqa: F401
from keras_wt.app.data.info import info  # noqa: F401
from keras_wt.app.data.info import _check_name
from keras_wt.app.data.info import _check_split
from keras_wt.app.data.readers import read_idx  # noqa: F401
from keras_wt.app.data.readers import read_cifar_binary  # noqa: F401
from keras_wt.app.data.readers import read_cifar_pickle  # noqa: F401

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE

# Where TensorFlow Datasets downloads from; reached or not within the timeout before TFDS is
# asked for a dataset it has not prepared (its own retries take minutes offline).
TFDS_SOURCE = ("storage.googleapis.com", 443)
NETWORK_TIMEOUT_S = 3.0


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
    arrays, where = files._load_local(name, data_dir)
    if arrays is not None:
        return arrays
    try:
        arrays = _tfds_load(name, None if data_dir is None else os.fspath(data_dir))
    except Exception as e:  # ImportError, no network, a half-prepared TFDS directory, ...
        tfds_error = f"{type(e).__name__}: {e}"
    else:
        logger.info("Loaded %s with TensorFlow Datasets", name)
        return arrays
    places = "\n".join(f"  {d}{files._missing(name, d)}" for d in where)
    raise FileNotFoundError(
        f"Could not find dataset {name!r}. Looked for the files {files._expected_files(name)} in:\n"
        f"{places}\n"
        f"and TensorFlow Datasets (tfds.load({name!r}, data_dir={data_dir!r})) failed with "
        f"{tfds_error}.\n"
        f"To fix: {files._HOW_TO_GET[name]}, then put the files in one of the directories above "
        f"(or pass data_dir=, or set ${files.ENV_VAR}); or run once with a network so TensorFlow "
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
