"""The training and evaluation pipelines of `keras_wt.app.training.train`.

* Small datasets held in memory (MNIST, Fashion-MNIST, CIFAR-10): every epoch's order is a
  function of `(seed, epoch)` only (`epoch_permutation`), so a resumed run sees exactly the
  batches the uninterrupted run would have seen.
* ImageNet TFRecords: endless augmented training batches, and an evaluation pass padded to full
  batches with zero-weight examples so that every validation image counts once with the static
  shapes TPUs need.
"""

import tensorflow as tf

from keras_wt.app.data import datasets

EVAL_BATCH_SIZE = 1000


# --------------------------------------------------------------------------------------------
# Small datasets in memory
# --------------------------------------------------------------------------------------------


def scale_images(images, flatten):
    """uint8 images to float32 in [0, 1], flattened to vectors when `flatten`."""
    images = tf.cast(images, tf.float32) / 255.0
    if flatten:
        images = tf.reshape(images, [tf.shape(images)[0], -1])
    return images


def epoch_permutation(num_examples, seed, epoch):
    """The order of the training examples in `epoch`: a function of `(seed, epoch)` only, so
    a resumed run sees the batches the uninterrupted run would have seen."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.argsort(tf.random.stateless_uniform([num_examples], key))


def train_dataset(x, y, batch_size, seed, first_epoch, n_epochs, flatten, steps_per_epoch=None):
    """Batches of epochs `first_epoch .. n_epochs − 1`, each shuffled by `epoch_permutation`;
    `ceil(N / batch_size)` batches per epoch, the last one smaller, or the first
    `steps_per_epoch` of them (so every epoch starts its own order, and a resumed run continues
    exactly)."""
    x, y = tf.constant(x), tf.constant(y)
    n = int(x.shape[0])

    def epoch(e):
        batches = tf.data.Dataset.from_tensor_slices(epoch_permutation(n, seed, e)).batch(batch_size)
        return batches if steps_per_epoch is None else batches.take(steps_per_epoch)

    ds = tf.data.Dataset.range(first_epoch, n_epochs).flat_map(epoch)
    ds = ds.map(lambda i: (scale_images(tf.gather(x, i), flatten), tf.gather(y, i)))
    return ds.prefetch(tf.data.AUTOTUNE)


def test_dataset(x, y, flatten, batch_size=EVAL_BATCH_SIZE):
    """The test split in order, in batches of `batch_size`."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return ds.map(lambda a, b: (scale_images(a, flatten), b)).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------
# ImageNet
# --------------------------------------------------------------------------------------------


def pad_to_batches(dataset, batch_size, num_classes):
    """Batches single `(image, label)` examples into `(images, one_hot, weights)` batches of
    exactly `batch_size`: the last batch is padded with zero images of weight 0, so every example
    counts once and every batch has the static shape TPUs need."""

    def pad(images, labels):
        n = tf.shape(labels)[0]
        missing = batch_size - n
        images = tf.pad(images, [[0, missing]] + [[0, 0]] * (len(images.shape) - 1))
        one_hot = tf.pad(tf.one_hot(labels, num_classes), [[0, missing], [0, 0]])
        weights = tf.pad(tf.ones([n], tf.float32), [[0, missing]])
        images = tf.ensure_shape(images, [batch_size] + list(images.shape[1:]))
        return images, tf.ensure_shape(one_hot, [batch_size, num_classes]), tf.ensure_shape(
            weights, [batch_size]
        )

    return dataset.batch(batch_size).map(pad, tf.data.AUTOTUNE)


def imagenet_datasets(
    data_dir,
    batch_size,
    image_size=224,
    num_classes=1000,
    use_synthetic_data=False,
    seed=None,
    first_epoch=0,
    epochs=None,
    steps_per_epoch=None,
    train_examples=None,
    eval_examples=None,
):
    """The training and evaluation datasets of the trainer.

    Training: batches `(images, one_hot_labels)` of `batch_size` with the ImageNet augmentation
    (`keras_wt.app.data.datasets.imagenet`). With `epochs` and `steps_per_epoch`, the batches of epochs
    `first_epoch .. epochs − 1`, epoch `e` being `steps_per_epoch` batches of a pass seeded by
    `(seed, e)` (repeated if one pass has fewer batches): every epoch's batches are a function of
    the seed and the epoch alone, so a run resumed at an epoch sees exactly the batches the
    uninterrupted run saw there. Otherwise an endless stream. Evaluation: one pass over the
    validation split in batches `(images, one_hot_labels, weights)`, padded to full batches
    (`pad_to_batches`). With `use_synthetic_data` both are endless repetitions of one random
    batch (for speed runs and smoke tests; give the number of evaluation steps).

    With `train_examples` / `eval_examples`, every pass over the training / validation files
    that reads another number of examples stops with an error (`keras_wt.app.data.datasets.imagenet`'s
    `expected_examples`: a truncated, missing or extra file).
    """
    if use_synthetic_data:
        train = datasets.imagenet(
            None, "train", batch_size, image_size=image_size, use_synthetic_data=True,
            num_classes=num_classes, seed=seed,
        )
        evaluation = datasets.imagenet(
            None, "validation", batch_size, image_size=image_size, use_synthetic_data=True,
            num_classes=num_classes, seed=None if seed is None else seed + 1,
        )
        evaluation = evaluation.map(
            lambda x, y: (x, tf.one_hot(y, num_classes), tf.ones([batch_size], tf.float32))
        )
    else:
        def one_pass(epoch=None):
            return datasets.imagenet(
                data_dir, "train", batch_size, image_size=image_size, training=True,
                drop_remainder=True, num_classes=num_classes, seed=seed, epoch=epoch,
                expected_examples=train_examples,
            )

        first = one_pass()  # here, not inside tf.data's tracing: a file error stays readable
        if epochs is None or steps_per_epoch is None:
            train = first.repeat()
        else:
            train = tf.data.Dataset.range(first_epoch, epochs).flat_map(
                lambda e: one_pass(e).repeat().take(steps_per_epoch)
            )
        evaluation = datasets.imagenet(
            data_dir, "validation", None, image_size=image_size, training=False,
            num_classes=num_classes, expected_examples=eval_examples,
        )
        evaluation = pad_to_batches(evaluation, batch_size, num_classes).prefetch(
            tf.data.AUTOTUNE
        )
    train = train.map(lambda x, y: (x, tf.one_hot(y, num_classes)), tf.data.AUTOTUNE)
    return train, evaluation
