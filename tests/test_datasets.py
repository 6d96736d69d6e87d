"""keras_wt.app.data.datasets: raw files parsed byte-exactly, scaling by /255, clear errors, ImageNet."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import tensorflow as tf

from keras_wt.app.data import augment
from keras_wt.app.data import datasets
from keras_wt.app.data import files as data_files
from keras_wt.app.data import imagenet as imagenet_lib


def no_tfds(*args, **kwargs):
    raise AssertionError("TensorFlow Datasets was called although local files exist")


@pytest.fixture
def offline(monkeypatch):
    """No search roots besides data_dir, and TensorFlow Datasets must never be reached."""
    monkeypatch.setattr(data_files, "_default_roots", lambda: [])
    monkeypatch.setattr(datasets, "_tfds_load", no_tfds)
    monkeypatch.setattr(imagenet_lib, "_tfds_imagenet", no_tfds)


def idx_bytes(array):
    """The IDX encoding of a uint8 array, written out field by field."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path, data, gz):
    path = str(path) + (".gz" if gz else "")
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return path


def make_idx_dataset(directory, gz_train=True, gz_test=False):
    """Writes tiny MNIST-format files with known pixels; returns the expected arrays."""
    os.makedirs(directory, exist_ok=True)
    x_train = ((np.arange(3 * 2 * 4) * 11) % 256).astype(np.uint8).reshape(3, 2, 4)
    x_train[0, 0, 0], x_train[2, 1, 3] = 255, 0
    y_train = np.array([7, 0, 9], np.uint8)
    x_test = np.array([[[1, 2, 3, 4], [250, 251, 252, 253]]], np.uint8)
    y_test = np.array([5], np.uint8)
    write(os.path.join(directory, "train-images-idx3-ubyte"), idx_bytes(x_train), gz_train)
    write(os.path.join(directory, "train-labels-idx1-ubyte"), idx_bytes(y_train), gz_train)
    write(os.path.join(directory, "t10k-images-idx3-ubyte"), idx_bytes(x_test), gz_test)
    write(os.path.join(directory, "t10k-labels-idx1-ubyte"), idx_bytes(y_test), gz_test)
    return (x_train[..., None], y_train), (x_test[..., None], y_test)


# ------------------------------------------------------------------------------------------------
# IDX


def test_idx_files_load_byte_exactly_gz_and_plain(tmp_path, offline):
    expected = make_idx_dataset(tmp_path / "mnist", gz_train=True, gz_test=False)
    (x_train, y_train), (x_test, y_test) = datasets.load_numpy("mnist", data_dir=tmp_path)
    for got, want in zip((x_train, y_train, x_test, y_test), (*expected[0], *expected[1])):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int32
    assert x_train[0, 0, 0, 0] == 255 and x_test[0, 1, 3, 0] == 253


def test_idx_files_directly_in_data_dir_and_dashed_subdir(tmp_path, offline):
    expected = make_idx_dataset(tmp_path / "direct", gz_train=False, gz_test=True)
    (x_train, _), _ = datasets.load_numpy("fashion_mnist", data_dir=tmp_path / "direct")
    np.testing.assert_array_equal(x_train, expected[0][0])
    # The Debian layout: <root>/fashion-mnist/ with the dash.
    expected = make_idx_dataset(tmp_path / "root" / "fashion-mnist")
    (_, y_train), _ = datasets.load_numpy("fashion_mnist", data_dir=tmp_path / "root")
    np.testing.assert_array_equal(y_train, expected[0][1])


def test_read_idx_rejects_bad_magic_and_wrong_size(tmp_path):
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01" + good[1:])
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good[:-1])
    with pytest.raises(ValueError, match="header"):
        datasets.read_idx(truncated)
    # Big-endian multi-byte elements (type 0x0B, int16) are decoded by value.
    int16 = tmp_path / "int16"
    int16.write_bytes(bytes([0, 0, 0x0B, 1]) + struct.pack(">I", 2) + struct.pack(">hh", -2, 300))
    np.testing.assert_array_equal(datasets.read_idx(int16), [-2, 300])


def test_load_scales_by_255_exactly_flattens_and_one_hots(tmp_path, offline):
    (x_train, y_train), _ = make_idx_dataset(tmp_path / "mnist")
    ds = datasets.load("mnist", "train", data_dir=tmp_path, batch_size=2, shuffle=False)
    batches = list(ds.as_numpy_iterator())
    assert [b[0].shape for b in batches] == [(2, 2, 4, 1), (1, 2, 4, 1)]
    images = np.concatenate([b[0] for b in batches])
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, x_train.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y_train)

    ds = datasets.load(
        "mnist", "train", data_dir=tmp_path, batch_size=2, shuffle=False, flatten=True,
        one_hot=True, drop_remainder=True,
    )
    (x, y), = list(ds.as_numpy_iterator())
    np.testing.assert_array_equal(x, x_train[:2].reshape(2, 8) / np.float32(255))
    np.testing.assert_array_equal(y, np.eye(10, dtype=np.float32)[y_train[:2]])

    single = next(iter(datasets.load("mnist", "test", data_dir=tmp_path, flatten=True)))
    assert single[0].shape == (8,)


def test_shuffle_with_seed_permutes_and_keeps_every_example(tmp_path, offline):
    (x_train, y_train), _ = make_idx_dataset(tmp_path / "mnist")
    ds = datasets.load("mnist", "train", data_dir=tmp_path, seed=3)
    pairs = sorted((int(y), x.tobytes()) for x, y in ds.as_numpy_iterator())
    want = sorted((int(y), (x / np.float32(255)).tobytes()) for x, y in zip(x_train, y_train))
    assert pairs == want


def test_unknown_name_and_split_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"'mnits'.*'mnist', 'fashion_mnist', 'cifar10'"):
        datasets.load_numpy("mnits")
    with pytest.raises(ValueError, match=r"split='val'.*\('train', 'test'\)"):
        datasets.load("mnist", "val")


def test_info():
    assert datasets.info("fashion_mnist") == datasets.DatasetInfo(
        "fashion_mnist", 10, (28, 28, 1), 60000, 10000
    )
    assert datasets.info("cifar10").image_shape == (32, 32, 3)
    assert datasets.info("imagenet").num_classes == 1000


# ------------------------------------------------------------------------------------------------
# CIFAR-10


def cifar_records(n, rng):
    """n images in CHW byte order with their labels; image 0 has a hand-made pixel."""
    chw = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    chw[0, :, 0, 1] = [1, 2, 3]  # red, green, blue of the pixel at row 0, column 1
    chw[0, :, 31, 0] = [200, 100, 50]  # ... and at row 31, column 0
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return chw, labels


def test_cifar_binary_batches_convert_chw_to_hwc(tmp_path, offline):
    rng = np.random.default_rng(0)
    directory = tmp_path / "cifar-10-batches-bin"
    directory.mkdir()
    written = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        chw, labels = cifar_records(2, rng)
        records = np.concatenate([labels[:, None], chw.reshape(2, 3072)], axis=1)
        (directory / f"{name}.bin").write_bytes(records.tobytes())
        written.append((chw, labels))
    (x_train, y_train), (x_test, y_test) = datasets.load_numpy("cifar10", data_dir=tmp_path)
    assert x_train.shape == (10, 32, 32, 3) and x_test.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(x_train[0, 0, 1], [1, 2, 3])
    np.testing.assert_array_equal(x_train[0, 31, 0], [200, 100, 50])
    np.testing.assert_array_equal(x_train[2, 0, 1], [1, 2, 3])  # first image of data_batch_2
    for c, h, w in [(0, 5, 7), (2, 31, 30), (1, 0, 31)]:
        assert x_train[9, h, w, c] == written[4][0][1, c, h, w]
    np.testing.assert_array_equal(y_train, np.concatenate([lab for _, lab in written[:5]]))
    np.testing.assert_array_equal(x_test, written[5][0].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y_test, written[5][1])


def test_cifar_python_pickles(tmp_path, offline):
    rng = np.random.default_rng(1)
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        chw, labels = cifar_records(1, rng)
        batch = {b"data": chw.reshape(1, 3072), b"labels": [int(labels[0])]}
        (directory / name).write_bytes(pickle.dumps(batch))
    ds = datasets.load("cifar10", "test", data_dir=tmp_path, batch_size=1)
    image, label = next(iter(ds))
    assert image.shape == (1, 32, 32, 3) and image.dtype == tf.float32
    np.testing.assert_array_equal(image[0, 0, 1].numpy(), np.float32([1, 2, 3]) / np.float32(255))
    assert int(label[0]) == int(labels[0])


# ------------------------------------------------------------------------------------------------
# Nothing found


def test_missing_files_raise_one_error_listing_every_place(tmp_path, monkeypatch):
    def tfds_fails(name, data_dir):
        raise ConnectionError("no network here")

    monkeypatch.setattr(data_files, "SYSTEM_DATA_DIR", str(tmp_path / "system"))
    monkeypatch.setenv("KERAS_WT_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(datasets, "_tfds_load", tfds_fails)
    empty = tmp_path / "empty"
    empty.mkdir()
    # An incomplete set (one file missing) is not enough.
    make_idx_dataset(tmp_path / "env" / "fashion_mnist")
    os.remove(tmp_path / "env" / "fashion_mnist" / "t10k-labels-idx1-ubyte")

    with pytest.raises(FileNotFoundError) as error:
        datasets.load_numpy("fashion_mnist")
    message = str(error.value)
    for place in [
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "keras" / "datasets" / "fashion_mnist",
        tmp_path / "keras" / "datasets" / "fashion-mnist",
        tmp_path / "system" / "fashion-mnist",
    ]:
        assert f"  {place}\n" in message
    # The incomplete copy says what it lacks.
    assert (f"  {tmp_path / 'env' / 'fashion_mnist'} (has train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte; missing t10k-labels-idx1-ubyte)\n"
            in message)
    for needed in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "apt-get install dataset-fashion-mnist",
        "ConnectionError: no network here",
        "KERAS_WT_DATA_DIR",
    ]:
        assert needed in message


def test_an_incomplete_data_dir_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    """With data_dir given, a complete copy elsewhere is not used instead of it."""
    monkeypatch.setattr(datasets, "_tfds_load", no_tfds)
    monkeypatch.setattr(data_files, "SYSTEM_DATA_DIR", str(tmp_path / "system"))
    make_idx_dataset(tmp_path / "system" / "fashion-mnist")
    assert datasets.load_numpy("fashion_mnist")[0][0].shape[0] > 0  # found without data_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        datasets.load_numpy("fashion_mnist", data_dir=empty)
    message = str(error.value)
    assert f"  {empty} (none of the files)\n" in message
    assert str(tmp_path / "system") not in message


def test_labels_outside_the_classes_name_the_file_and_index(tmp_path, offline):
    make_idx_dataset(tmp_path)  # train labels [7, 0, 9], gzipped
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.array([7, 200, 9])), gz=True)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz has 1 labels outside "
                                         r"\[0, 10\): the first is 200 at index 1"):
        datasets.load_numpy("mnist", data_dir=tmp_path)


def test_float_images_are_refused_not_truncated(tmp_path, offline):
    (x_train, _), _ = make_idx_dataset(tmp_path)
    images = x_train[..., 0].astype(np.float32) / 255.0
    header = struct.pack(">BBBB", 0, 0, 0x0D, 3) + struct.pack(">3I", *images.shape)
    write(tmp_path / "train-images-idx3-ubyte", header + images.astype(">f4").tobytes(), gz=True)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz holds float32 pixels in "
                                         r"\[0.0, 1.0\]; MNIST-format images are uint8"):
        datasets.load_numpy("mnist", data_dir=tmp_path)


def test_a_damaged_gzip_file_is_named(tmp_path, offline):
    make_idx_dataset(tmp_path)
    damaged = tmp_path / "train-labels-idx1-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:-12])  # cut off the end of the stream
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz is damaged"):
        datasets.load_numpy("mnist", data_dir=tmp_path)


def test_environment_root_is_searched(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_tfds_load", no_tfds)
    monkeypatch.setattr(data_files, "SYSTEM_DATA_DIR", str(tmp_path / "system"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("KERAS_WT_DATA_DIR", str(tmp_path / "env"))
    expected = make_idx_dataset(tmp_path / "env" / "mnist")
    _, (x_test, _) = datasets.load_numpy("mnist")
    np.testing.assert_array_equal(x_test, expected[1][0])


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="the Debian package dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(data_files, "_default_roots", lambda: [data_files.SYSTEM_DATA_DIR])
    (x_train, y_train), (x_test, y_test) = datasets.load_numpy("fashion_mnist")
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)


# ------------------------------------------------------------------------------------------------
# ImageNet

COLOURS = np.array(
    [
        [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255],
        [128, 128, 128], [255, 255, 255], [0, 0, 0], [200, 100, 50], [50, 100, 200],
        [100, 200, 50],
    ],
    np.uint8,
)


def normalised(colour):
    mean = np.float32(augment.IMAGENET_MEAN_RGB)
    std = np.float32(augment.IMAGENET_STDDEV_RGB)
    return (colour / np.float32(255) - mean) / std


@pytest.fixture
def imagenet_dir(tmp_path):
    """12 solid-colour 30x40 JPEGs, label i = colour i: 8 in 2 train shards, 4 in 1 validation."""
    images = np.broadcast_to(COLOURS[:, None, None, :], (12, 30, 40, 3))
    labels = np.arange(12)
    train = datasets.write_imagenet_tfrecords(tmp_path, images[:8], labels[:8], "train", 2)
    val = datasets.write_imagenet_tfrecords(tmp_path, images[8:], labels[8:], "validation", 1)
    assert [os.path.basename(p) for p in train + val] == [
        "train-00000-of-00002",
        "train-00001-of-00002",
        "validation-00000-of-00001",
    ]
    return tmp_path


def test_imagenet_tfrecords_store_one_based_labels(imagenet_dir):
    records = tf.data.TFRecordDataset(str(imagenet_dir / "validation-00000-of-00001"))
    stored = [
        tf.train.Example.FromString(r).features.feature["image/class/label"].int64_list.value[0]
        for r in records.as_numpy_iterator()
    ]
    assert stored == [9, 10, 11, 12]


def test_imagenet_train_pipeline(imagenet_dir, offline):
    ds = datasets.imagenet(imagenet_dir, "train", batch_size=4, image_size=32, seed=0)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 2
    labels = np.concatenate([y for _, y in batches])
    assert sorted(labels) == list(range(8))
    for images, y in batches:
        assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
        assert y.dtype == np.int32
        assert np.all(np.isfinite(images))
        # A crop of a solid colour, resized and flipped, is still that colour.
        for image, label in zip(images, y):
            np.testing.assert_allclose(
                image, np.broadcast_to(normalised(COLOURS[label]), image.shape), atol=0.06
            )


def test_imagenet_validation_pipeline_gives_normalised_colours(imagenet_dir, offline):
    ds = datasets.imagenet(
        imagenet_dir, "validation", batch_size=3, image_size=32, drop_remainder=False
    )
    batches = list(ds.as_numpy_iterator())
    assert [x.shape for x, _ in batches] == [(3, 32, 32, 3), (1, 32, 32, 3)]
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(labels, [8, 9, 10, 11])  # files read in order, 0-based
    for image, label in zip(images, labels):
        np.testing.assert_allclose(
            image, np.broadcast_to(normalised(COLOURS[label]), image.shape), atol=0.06
        )
    # Through load(), with one-hot labels over the 1000 classes.
    ds = datasets.load(
        "imagenet", "validation", data_dir=imagenet_dir, batch_size=2, one_hot=True, image_size=32
    )
    x, y = next(iter(ds))
    assert x.shape == (2, 32, 32, 3) and y.shape == (2, 1000)
    np.testing.assert_array_equal(np.argmax(y, axis=1), [8, 9])


def test_imagenet_eval_crop_is_central_after_shorter_side_resize():
    # 20 rows x 60 columns: left third red, middle third green, right third blue. The shorter
    # side (20) goes to round(16 * 256 / 224) = 18, so the width becomes 54 and the central 16
    # columns (19..34 of 54) fall inside the green third (18..35).
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, :20, 0] = image[:, 20:40, 1] = image[:, 40:, 2] = 255
    crop = augment.eval_crop(tf.io.encode_png(image), 16).numpy()
    assert crop.shape == (16, 16, 3)
    np.testing.assert_allclose(crop[:, 2:-2], np.broadcast_to([0, 255, 0], (16, 12, 3)), atol=1)


def test_imagenet_synthetic_data():
    ds = datasets.imagenet(
        None, "train", batch_size=4, image_size=32, use_synthetic_data=True, num_classes=7
    )
    (x1, y1), (x2, y2) = list(ds.take(2).as_numpy_iterator())
    assert x1.shape == (4, 32, 32, 3) and x1.dtype == np.float32
    assert y1.shape == (4,) and y1.dtype == np.int32
    assert np.all((0 <= y1) & (y1 < 7))
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_imagenet_missing_files_error(tmp_path, monkeypatch):
    def tfds_fails(data_dir, split, training):
        raise ConnectionError("no network here")

    monkeypatch.setattr(imagenet_lib, "_tfds_imagenet", tfds_fails)
    with pytest.raises(FileNotFoundError, match=r"validation-\*.*imagenet2012.*no network here"):
        datasets.imagenet(tmp_path, "validation", batch_size=2)


def test_tfds_is_not_asked_to_download_when_its_source_is_unreachable(tmp_path, monkeypatch):
    """Offline, TFDS would retry its download for minutes; the probe makes it fail at once."""
    import tensorflow_datasets as tfds

    def must_not_download(*args, **kwargs):
        raise AssertionError("tfds.load was called for a dataset it cannot download")

    reaches, probed = datasets._network_reaches, []
    monkeypatch.setattr(datasets, "_network_reaches", lambda address: probed.append(address))
    monkeypatch.setattr(tfds, "load", must_not_download)
    with pytest.raises(ConnectionError, match="cannot reach its download source"):
        datasets._tfds_load("mnist", str(tmp_path / "tfds"))
    assert probed == [datasets.TFDS_SOURCE]
    # The probe itself: a port nothing listens on is unreachable, without waiting.
    assert not reaches(("127.0.0.1", 9), timeout=1.0)


@pytest.mark.parametrize("label", [0, 11])
def test_imagenet_labels_outside_1_to_num_classes_stop_the_pipeline(tmp_path, label):
    """TFRecord labels are 1-based: 0 (read as −1) or one above num_classes would otherwise train
    as an all-zero one-hot target."""
    images = [np.full((8, 8, 3), 100, np.uint8)] * 2
    # write_imagenet_tfrecords takes 0-based labels and stores them 1-based.
    datasets.write_imagenet_tfrecords(tmp_path, images, [3, label - 1], "validation")
    ds = datasets.imagenet(str(tmp_path), "validation", None, image_size=8, training=False,
                           num_classes=10)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"image/class/label.{0,3} (below 1|above num_classes=10)"):
        list(ds)


def test_fewer_examples_than_one_batch_is_an_error(tmp_path, offline):
    from keras_wt.app import training
    from keras_wt.app.config import DataConfig, ModelConfig, TrainConfig

    make_idx_dataset(tmp_path)  # 3 training examples
    config = TrainConfig(data=DataConfig(dataset="mnist", data_dir=str(tmp_path), batch_size=4),
                         model=ModelConfig(name="mlp", options={"hidden": [2]}))
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        training.train(config)
