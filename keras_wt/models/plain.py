"""The plain (non-residual) networks: `mlp` (the reference MLP) and `cnn`."""

import keras

from keras_wt.models.builder import _Builder
from keras_wt.models.reference import ReferenceNormal


def mlp(
    input_shape=(784,),
    hidden=(500,),
    num_classes=10,
    feedback="bp",
    activation="sigmoid",
    output_activation="sigmoid",
    initializer="reference",
    feedback_initializer=None,
    feedback_loss=None,
    seed=None,
    dtype=None,
    name="mlp",
):
    """The fully connected network of Akrout et al.'s reference NumPy code.

    `x → [Dense(h, activation) for h in hidden] → Dense(num_classes) → output_activation`; a
    multi-dimensional input is flattened first. With the defaults it is the reference model:
    sigmoid hidden and output units, trained with `reference_loss()`.

    Args:
        input_shape: shape of one example.
        hidden: widths of the hidden layers.
        num_classes: output units.
        feedback: one of `keras_wt.ALGORITHMS`, for every Dense layer.
        activation: of the hidden layers.
        output_activation: `"sigmoid"` (reference), `"softmax"`, or `None` for logits (then use
            `reference_loss(from_logits=True)`).
        initializer: `"reference"`: W, b and B all drawn from `N(0, 1/(fan_in + fan_out))`
            (`ReferenceNormal`); anything else is a Keras initializer for the kernels, with zero
            biases.
        feedback_initializer: initializer of `B` (`fa`, `wm`, `kp`); `None` draws `B` like `W`,
            independently.
        feedback_loss: `{primitive: coefficient}` of the local alignment loss of `B` (`sa`,
            `ia`; `keras_wt.local`); `None`: the algorithm's.
        seed: integer for reproducible weights, or `None`.
        dtype: dtype policy of the layers (`None`: the global policy).
        name: of the model.
    """
    builder = _Builder(
        feedback, feedback_initializer, seed=seed, dtype=dtype, feedback_loss=feedback_loss
    )
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = inputs
    if len(input_shape) > 1:
        x = keras.layers.Flatten(dtype=dtype, name="flatten")(x)
    reference = isinstance(initializer, str) and initializer == "reference"
    kernel_initializer = ReferenceNormal() if reference else initializer
    fan_in = int(x.shape[-1])
    widths = list(hidden) + [num_classes]
    for i, units in enumerate(widths):
        bias_initializer = ReferenceNormal(fan_sum=fan_in + units) if reference else "zeros"
        if i < len(hidden):
            x = builder.dense(
                units, f"hidden_{i + 1}", kernel_initializer, bias_initializer, activation
            )(x)
        else:
            x = builder.head(
                x, units, kernel_initializer, output_activation, bias_initializer
            )
        fan_in = units
    return keras.Model(inputs, x, name=name)


def cnn(
    input_shape=(28, 28, 1),
    num_classes=10,
    feedback="bp",
    filters=(32, 64),
    kernel_size=5,
    dense_units=256,
    output_activation=None,
    kernel_initializer="he_normal",
    feedback_initializer=None,
    feedback_loss=None,
    batch_norm=False,
    seed=None,
    dtype=None,
    name="cnn",
):
    """A small CNN for MNIST-like and CIFAR-like images; returns logits by default.

    `[Conv2D(f, kernel_size, "same") → ReLU → MaxPool(2)] for f in filters → Flatten →
    Dense(dense_units) → ReLU → Dense(num_classes)`, with biases. With `batch_norm`, every
    convolution and the hidden Dense are followed by batch normalisation (momentum
    `BN_MOMENTUM`) before the ReLU, and have no bias. Train it with
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`, or pass
    `output_activation="softmax"`.

    Args:
        input_shape: `(height, width, channels)`.
        num_classes: output units.
        feedback: one of `keras_wt.ALGORITHMS`, for every Dense and Conv2D layer.
        filters, kernel_size: of the convolutional layers.
        dense_units: of the hidden Dense layer.
        output_activation: `None` (logits) or an activation such as `"softmax"`.
        kernel_initializer: of every kernel; biases start at zero.
        feedback_initializer: of `B` (`fa`, `wm`, `kp`); `None` draws `B` like `W`,
            independently.
        feedback_loss: `{primitive: coefficient}` of the local alignment loss of `B` (`sa`,
            `ia`; `keras_wt.local`); `None`: the algorithm's.
        batch_norm: batch normalisation after every convolution and the hidden Dense.
        seed: integer for reproducible weights, or `None`.
        dtype: dtype policy of the layers (`None`: the global policy).
        name: of the model.
    """
    builder = _Builder(
        feedback, feedback_initializer, seed=seed, dtype=dtype, feedback_loss=feedback_loss
    )
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = inputs
    activation = None if batch_norm else "relu"
    for i, f in enumerate(filters):
        x = builder.conv(
            x, f, kernel_size, 1, f"conv_{i + 1}", kernel_initializer,
            use_bias=not batch_norm, activation=activation,
        )
        if batch_norm:
            x = builder.relu(builder.batch_norm(x, f"bn_{i + 1}"), f"relu_{i + 1}")
        x = keras.layers.MaxPooling2D(2, dtype=dtype, name=f"pool_{i + 1}")(x)
    x = keras.layers.Flatten(dtype=dtype, name="flatten")(x)
    if batch_norm:
        x = builder.dense(dense_units, "hidden", kernel_initializer, activation=None)(x)
        x = builder.relu(builder.batch_norm(x, "bn_hidden"), "relu_hidden")
    else:
        x = builder.dense(dense_units, "hidden", kernel_initializer, activation="relu")(x)
    outputs = builder.head(x, num_classes, kernel_initializer, output_activation)
    return keras.Model(inputs, outputs, name=name)
