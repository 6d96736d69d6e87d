"""ImageNet from TFRecords in the standard `train-00000-of-01024`, `validation-00000-of-00128`
layout (`data_dir` may be a `gs://` path), falling back to the TFDS `imagenet2012` builder; and
a writer of that layout (tests, small demos)."""

import logging
import os
import re

import numpy as np
import tensorflow as tf

from keras_wt.app.data import augment
from keras_wt.app.data.info import DataError
from keras_wt.app.data.info import _check_split

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE

_IMAGENET_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


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
            image = augment.train_crop(image_bytes, image_size, key)
        else:
            image = augment.eval_crop(image_bytes, image_size)
        return augment.normalize(image), label

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
