"""ImageNet's preprocessing: the random-resized crop and flip of training, the central crop of
evaluation, and the per-channel normalization."""


import tensorflow as tf

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def normalize(image):
    """float RGB in [0, 255] -> (image / 255 - mean) / std, per channel."""
    mean = tf.constant(IMAGENET_MEAN_RGB, tf.float32) * 255.0
    std = tf.constant(IMAGENET_STDDEV_RGB, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std


def train_crop(image_bytes, image_size, seed):
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


def eval_crop(image_bytes, image_size):
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
