"""The ResNets: `resnet18`, `resnet50` (ImageNet, v1.5) and `resnet20` (CIFAR)."""

import warnings

import keras

from keras_wt.models.builder import _Builder


def _he_normal_fan_out():
    """He et al.'s normal initializer in fan-out mode (torchvision's ResNet convolutions)."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def _shortcut(builder, x, filters, strides, name, kernel_initializer):
    """Identity, or a 1x1 convolution + BN projection when the shape changes (option B)."""
    if strides == 1 and x.shape[-1] == filters:
        return x
    x = builder.conv(x, filters, 1, strides, f"{name}_proj_conv", kernel_initializer)
    return builder.batch_norm(x, f"{name}_proj_bn")


def _basic_block(builder, x, filters, strides, name, kernel_initializer, zero_init_residual):
    """3x3 conv (stride) → BN → ReLU → 3x3 conv → BN, plus the shortcut, → ReLU."""
    shortcut = _shortcut(builder, x, filters, strides, name, kernel_initializer)
    x = builder.conv(x, filters, 3, strides, f"{name}_conv1", kernel_initializer)
    x = builder.batch_norm(x, f"{name}_bn1")
    x = builder.relu(x, f"{name}_relu1")
    x = builder.conv(x, filters, 3, 1, f"{name}_conv2", kernel_initializer)
    x = builder.batch_norm(x, f"{name}_bn2", zero_gamma=zero_init_residual)
    x = keras.layers.Add(dtype=builder.dtype, name=f"{name}_add")([x, shortcut])
    return builder.relu(x, f"{name}_out")


def _bottleneck_block(builder, x, filters, strides, name, kernel_initializer,
                      zero_init_residual):
    """ResNet v1.5 bottleneck: 1x1 → 3x3 (stride) → 1x1 (4·filters), BN after each, ReLU."""
    shortcut = _shortcut(builder, x, 4 * filters, strides, name, kernel_initializer)
    x = builder.conv(x, filters, 1, 1, f"{name}_conv1", kernel_initializer)
    x = builder.batch_norm(x, f"{name}_bn1")
    x = builder.relu(x, f"{name}_relu1")
    x = builder.conv(x, filters, 3, strides, f"{name}_conv2", kernel_initializer)
    x = builder.batch_norm(x, f"{name}_bn2")
    x = builder.relu(x, f"{name}_relu2")
    x = builder.conv(x, 4 * filters, 1, 1, f"{name}_conv3", kernel_initializer)
    x = builder.batch_norm(x, f"{name}_bn3", zero_gamma=zero_init_residual)
    x = keras.layers.Add(dtype=builder.dtype, name=f"{name}_add")([x, shortcut])
    return builder.relu(x, f"{name}_out")


def _l2(l2, weight_decay):
    """`l2`, or the deprecated `weight_decay` that was its name."""
    if weight_decay is None:
        return l2
    if l2 is not None:
        raise ValueError(f"l2={l2!r} and weight_decay={weight_decay!r}: weight_decay is the "
                         "former name of l2 (the coupled L2 coefficient); give l2 only.")
    warnings.warn(
        "weight_decay= of the keras_wt.models ResNets is renamed l2= (the coupled L2 "
        "coefficient, OptimizerConfig.l2); in Keras's optimizers and KolenPollack weight_decay "
        "is a decoupled decay. weight_decay= will be removed.",
        DeprecationWarning, stacklevel=3)
    return weight_decay


def _resnet(
    block,
    blocks_per_stage,
    stage_filters,
    stem,
    input_shape,
    num_classes,
    feedback,
    feedback_initializer,
    zero_init_residual,
    kernel_initializer,
    classifier_initializer,
    l2,
    output_activation,
    seed,
    dtype,
    name,
    feedback_loss=None,
):
    builder = _Builder(
        feedback, feedback_initializer, seed=seed, dtype=dtype, l2=l2, feedback_loss=feedback_loss,
    )
    if kernel_initializer is None:
        kernel_initializer = _he_normal_fan_out()
    if classifier_initializer is None:
        classifier_initializer = keras.initializers.RandomNormal(stddev=0.01)
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = stem(builder, inputs, kernel_initializer)
    for stage, (filters, num_blocks) in enumerate(zip(stage_filters, blocks_per_stage)):
        for b in range(num_blocks):
            strides = 2 if (b == 0 and stage > 0) else 1
            x = block(
                builder, x, filters, strides, f"stage{stage + 1}_block{b + 1}",
                kernel_initializer, zero_init_residual,
            )
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="avg_pool")(x)
    outputs = builder.head(x, num_classes, classifier_initializer, output_activation)
    return keras.Model(inputs, outputs, name=name)


def _imagenet_stem(builder, x, kernel_initializer):
    """7x7/2 convolution (64) → BN → ReLU → 3x3/2 max pool."""
    x = builder.conv(x, 64, 7, 2, "stem_conv", kernel_initializer)
    x = builder.batch_norm(x, "stem_bn")
    x = builder.relu(x, "stem_relu")
    # Zero padding equals PyTorch's −∞ padding here: the inputs are ReLU outputs, >= 0.
    x = keras.layers.ZeroPadding2D(1, dtype=builder.dtype, name="stem_pool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, dtype=builder.dtype, name="stem_pool")(x)


def _cifar_stem(builder, x, kernel_initializer):
    """3x3 convolution (16) → BN → ReLU."""
    x = builder.conv(x, 16, 3, 1, "stem_conv", kernel_initializer)
    x = builder.batch_norm(x, "stem_bn")
    return builder.relu(x, "stem_relu")


_RESNET_ARGS_DOC = """
    Args:
        input_shape: `(height, width, channels)`.
        num_classes: output units.
        feedback: one of `keras_wt.ALGORITHMS`, for every Conv2D and Dense layer.
        feedback_initializer: of `B` (`fa`, `wm`, `kp`); `None` draws `B` like `W`,
            independently.
        feedback_loss: `{primitive: coefficient}` of the local alignment loss of `B` (`sa`,
            `ia`; `keras_wt.local`); `None`: the algorithm's.
        zero_init_residual: start the γ of the last batch norm of every residual block at 0,
            so each block starts as the identity (Goyal et al. 2017).
        kernel_initializer: of the convolution kernels; `None` is He et al.'s normal in fan-out
            mode (`VarianceScaling(2.0, "fan_out", "untruncated_normal")`, as torchvision).
        classifier_initializer: of the final Dense kernel; `None` is `RandomNormal(stddev=0.01)`
            (as the TPU reference ResNet). Its bias starts at zero.
        l2: the coupled L2 coefficient (`OptimizerConfig.l2`): `None` (default) adds no
            regularizer (the trainer applies the equivalent decoupled decay in the optimizer); a
            number adds `keras.regularizers.L2(l2 / 2)` to every Conv2D and Dense kernel, i.e. a
            gradient `l2·W` (batch norm and biases are not decayed).
        weight_decay: the former name of `l2`, deprecated (a `DeprecationWarning`): in Keras's
            optimizers and `KolenPollack`, `weight_decay` is a decoupled decay.
        output_activation: `None` (logits, the default) or e.g. `"softmax"`.
        seed: integer for reproducible weights, or `None`.
        dtype: dtype policy of the layers (`None`: the global policy, e.g. `"mixed_float16"` or
            `"mixed_bfloat16"`); the outputs are in the variable dtype.
        name: of the model.
"""


def resnet18(
    input_shape=(224, 224, 3),
    num_classes=1000,
    feedback="bp",
    feedback_initializer=None,
    feedback_loss=None,
    zero_init_residual=True,
    kernel_initializer=None,
    classifier_initializer=None,
    l2=None,
    output_activation=None,
    seed=None,
    dtype=None,
    name="resnet18",
    *,
    weight_decay=None,
):
    """ResNet-18 (basic blocks [2, 2, 2, 2]) for ImageNet; 11,689,512 parameters.

    ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool); convolutions without bias, each
    followed by batch norm (momentum 0.9, epsilon 1e-5); 1x1 conv + BN projection shortcuts
    where the shape changes; global average pool; Dense(num_classes).
    """
    return _resnet(
        _basic_block, (2, 2, 2, 2), (64, 128, 256, 512), _imagenet_stem, input_shape,
        num_classes, feedback, feedback_initializer, zero_init_residual, kernel_initializer,
        classifier_initializer, _l2(l2, weight_decay), output_activation, seed, dtype, name,
        feedback_loss=feedback_loss,
    )


def resnet50(
    input_shape=(224, 224, 3),
    num_classes=1000,
    feedback="bp",
    feedback_initializer=None,
    feedback_loss=None,
    zero_init_residual=True,
    kernel_initializer=None,
    classifier_initializer=None,
    l2=None,
    output_activation=None,
    seed=None,
    dtype=None,
    name="resnet50",
    *,
    weight_decay=None,
):
    """ResNet-50 v1.5 (bottleneck blocks [3, 4, 6, 3]) for ImageNet; 25,557,032 parameters.

    As `resnet18`, with bottleneck blocks (1x1, 3x3, 1x1 with 4x expansion). v1.5: a block that
    downsamples does so in its 3x3 convolution (stride 2), not in its first 1x1.
    """
    return _resnet(
        _bottleneck_block, (3, 4, 6, 3), (64, 128, 256, 512), _imagenet_stem, input_shape,
        num_classes, feedback, feedback_initializer, zero_init_residual, kernel_initializer,
        classifier_initializer, _l2(l2, weight_decay), output_activation, seed, dtype, name,
        feedback_loss=feedback_loss,
    )


def resnet20(
    input_shape=(32, 32, 3),
    num_classes=10,
    feedback="bp",
    feedback_initializer=None,
    feedback_loss=None,
    zero_init_residual=False,
    kernel_initializer=None,
    classifier_initializer=None,
    l2=None,
    output_activation=None,
    seed=None,
    dtype=None,
    name="resnet20",
    *,
    weight_decay=None,
):
    """The CIFAR ResNet-20 of He et al. (2016, §4.2); 272,474 parameters (0.27M).

    3x3 conv (16) → BN → ReLU stem; three stages of three basic blocks with 16, 32 and 64
    filters (the 2nd and 3rd start with stride 2); global average pool; Dense(num_classes).
    Shortcuts are option B: a 1x1 conv + BN projection where the shape changes, as in the
    ImageNet ResNets. (The paper's CIFAR models used option A, parameter-free zero-padding
    shortcuts, with 269,722 parameters; the two projections add 2,752.) Unlike the ImageNet
    ResNets, `zero_init_residual` defaults to `False`, as in the paper.
    """
    return _resnet(
        _basic_block, (3, 3, 3), (16, 32, 64), _cifar_stem, input_shape, num_classes,
        feedback, feedback_initializer, zero_init_residual, kernel_initializer,
        classifier_initializer, _l2(l2, weight_decay), output_activation, seed, dtype, name,
        feedback_loss=feedback_loss,
    )


for _builder in (resnet18, resnet50, resnet20):
    _builder.__doc__ += _RESNET_ARGS_DOC
del _builder
