"""Model builders whose every Dense and convolution is a keras_wt feedback layer.

Each builder takes `feedback=` (one of `keras_wt.ALGORITHMS`), passes it to every Dense/Conv
layer, and returns a functional `keras.Model`. Batch norm, pooling, padding and additions are
stock Keras layers with their ordinary gradients. Nothing is kept on the Python side at run
time, so the models compile with `jit_compile=True` and run under `tf.distribute`.

* `mlp`: the fully connected network of Akrout et al.'s public NumPy code (sigmoid units,
  `ReferenceNormal` weights), trained with `reference_loss()`.
* `cnn`: a small convolutional network for MNIST-like and CIFAR-like images.
* `resnet18`, `resnet50`: ImageNet ResNets, v1.5 (torchvision layout and parameter counts).
* `resnet20`: the CIFAR ResNet of He et al. (2016), with 1x1 projection shortcuts.
* `get(name, **kwargs)`: a builder by name.

Every model ends in a `Dense` named `"classifier"` and an `Activation` named `"predictions"`
computed in the policy's variable dtype (float32 under `"mixed_float16"`), so losses never
see float16 outputs.

Parameter counts: `count_forward_params(model)` counts what the usual tables count — kernels,
biases, batch-norm γ and β — and leaves out the feedback kernels `B` (extra, non-trainable
weights of `fa`, `wm`, `kp` layers) and the batch-norm moving statistics (buffers, not
parameters). With it, `resnet18()` has 11,689,512 and `resnet50()` 25,557,032 parameters for
every algorithm. `model.count_params()` counts every weight, those included.
"""

import math

import keras

from keras_wt import algorithms
from keras_wt import dfa
from keras_wt import layers as wt_layers

# Batch norm of the reference ResNets (PyTorch's momentum 0.1 is Keras's 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# --------------------------------------------------------------------------------------------
# The reference initializer and loss (Akrout et al.'s NumPy code)
# --------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_wt")
class ReferenceNormal(keras.initializers.RandomNormal):
    """Normal initializer with `stddev = sqrt(1 / (fan_in + fan_out))`.

    The initializer of W, b and B in the reference NumPy code of Akrout et al.
    (`np.sqrt(1. / (x + y)) * np.random.randn(...)` for a layer of `x` inputs and `y` outputs).

    Args:
        fan_sum: `fan_in + fan_out` of the layer. `None` computes it from the shape of the
            tensor to initialize (`in + out` for a Dense kernel, `k·c_in + k·c_out` for a
            convolution kernel of receptive field `k`); a bias does not know its layer's fan-in,
            so a bias initializer must be given `fan_sum`.
        seed: as `keras.initializers.RandomNormal`: an integer, a `keras.random.SeedGenerator`
            or `None`.

    Example:

    >>> init = ReferenceNormal()                     # kernel of a 784 -> 500 Dense layer
    >>> w = init((784, 500))                         # std sqrt(1 / 1284)
    >>> b = ReferenceNormal(fan_sum=784 + 500)((500,))
    """

    def __init__(self, fan_sum=None, seed=None):
        if fan_sum is not None and (
            isinstance(fan_sum, bool) or not isinstance(fan_sum, int) or fan_sum <= 0
        ):
            raise ValueError(f"fan_sum={fan_sum!r} must be a positive integer or None")
        self.fan_sum = fan_sum
        super().__init__(mean=0.0, stddev=None, seed=seed)

    def stddev_for(self, shape):
        """The standard deviation used for a tensor of `shape`."""
        fan_sum = self.fan_sum
        if fan_sum is None:
            shape = tuple(int(d) for d in shape)
            if len(shape) < 2:
                raise ValueError(
                    f"ReferenceNormal(fan_sum=None) cannot infer fan_in + fan_out from the "
                    f"shape {shape}: pass fan_sum=<fan_in + fan_out of the layer> (e.g. for a "
                    "bias)."
                )
            receptive_field = math.prod(shape[:-2])
            fan_sum = receptive_field * (shape[-2] + shape[-1])
        return math.sqrt(1.0 / fan_sum)

    def __call__(self, shape, dtype=None):
        return keras.random.normal(
            shape=shape, mean=0.0, stddev=self.stddev_for(shape), seed=self.seed, dtype=dtype
        )

    def get_config(self):
        return {
            "fan_sum": self.fan_sum,
            "seed": keras.saving.serialize_keras_object(self._init_seed),
        }


@keras.saving.register_keras_serializable(package="keras_wt")
class SummedSigmoidCrossEntropy(keras.losses.Loss):
    """Sigmoid cross-entropy summed over the classes, averaged over the batch.

    The loss of the reference NumPy code of Akrout et al.:
    `mean_over_batch( -sum_k [t_k·log p_k + (1 − t_k)·log(1 − p_k)] )`.

    Labels: integer class indices of shape `(batch,)` or `(batch, 1)` are one-hot encoded; a
    tensor of the predictions' rank whose last dimension equals the number of classes is taken
    as the targets `t` themselves (one-hot, multi-hot or soft). With a single output unit the
    labels are always the targets `t` (binary classification).

    Args:
        from_logits: `False` (default): predictions are probabilities, clipped to
            `[epsilon, 1 − epsilon]`. `True`: predictions are logits `z`, and the loss is computed
            stably as `max(z, 0) − z·t + log(1 + exp(−|z|))`.
        epsilon: the clipping of probabilities; `None` is `keras.config.epsilon()`.
        reduction, name, dtype: as `keras.losses.Loss`.

    Example:

    >>> model.compile(optimizer="sgd", loss=SummedSigmoidCrossEntropy())   # sigmoid outputs
    >>> model.fit(x, integer_labels)
    """

    def __init__(
        self,
        from_logits=False,
        epsilon=None,
        reduction="sum_over_batch_size",
        name="summed_sigmoid_cross_entropy",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.epsilon = epsilon

    def call(self, y_true, y_pred):
        targets = _sigmoid_targets(y_true, y_pred)
        ops = keras.ops
        if self.from_logits:
            z = y_pred
            losses = ops.relu(z) - z * targets + ops.log1p(ops.exp(-ops.abs(z)))
        else:
            eps = keras.config.epsilon() if self.epsilon is None else self.epsilon
            p = ops.clip(y_pred, eps, 1.0 - eps)
            losses = -(targets * ops.log(p) + (1.0 - targets) * ops.log(1.0 - p))
        return ops.sum(losses, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(from_logits=self.from_logits, epsilon=self.epsilon)
        return config


def _sigmoid_targets(y_true, y_pred):
    """`y_true` as targets of `y_pred`'s shape: one-hot encodes integer class labels."""
    ops = keras.ops
    num_classes = y_pred.shape[-1]
    true_rank, pred_rank = len(y_true.shape), len(y_pred.shape)
    if true_rank == pred_rank and (y_true.shape[-1] != 1 or num_classes == 1):
        return ops.cast(y_true, y_pred.dtype)
    if true_rank == pred_rank:  # (batch, 1) class indices
        y_true = ops.squeeze(y_true, axis=-1)
    elif true_rank != pred_rank - 1:
        raise ValueError(
            f"SummedSigmoidCrossEntropy got labels of shape {y_true.shape} for predictions of "
            f"shape {y_pred.shape}: pass integer class indices of shape {y_pred.shape[:-1]} "
            f"(or with a trailing 1), or targets of shape {y_pred.shape}."
        )
    if num_classes is None:
        raise ValueError(
            "SummedSigmoidCrossEntropy needs the number of classes (the last dimension of the "
            f"predictions, shape {y_pred.shape}) to be known to one-hot encode integer labels."
        )
    return ops.one_hot(ops.cast(y_true, "int32"), num_classes, dtype=y_pred.dtype)


def reference_loss(from_logits=False):
    """The loss of the reference MLP: `SummedSigmoidCrossEntropy(from_logits=from_logits)`."""
    return SummedSigmoidCrossEntropy(from_logits=from_logits)


# --------------------------------------------------------------------------------------------
# Shared construction
# --------------------------------------------------------------------------------------------


def _seed_for(seed, index):
    return (seed * 1_000_003 + index) % (2**31 - 1)


class _Builder:
    """Makes the layers of one model: feedback, initializers, regularizer and dtype in one place.

    Every layer gets its own initializer instances (an unseeded Keras initializer returns the
    same values at every call, so sharing one would make equal-shaped kernels equal). With
    `seed`, initializer `i` of the model is seeded with a number derived from `(seed, i)`: two
    builds with the same seed are identical, and no two kernels (nor a kernel and its feedback
    kernel) share a seed. The numbering does not depend on the algorithm, so the same seed gives
    the same forward weights for `bp`, `fa`, ... and the same `B` for `fa`, `wm` and `kp`.
    """

    def __init__(
        self,
        feedback,
        feedback_initializer=None,
        seed=None,
        dtype=None,
        weight_decay=None,
    ):
        self.algorithm = algorithms.get(feedback)
        self.feedback_initializer = feedback_initializer
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} must be an integer or None")
        self.seed = seed
        self.dtype = dtype
        if weight_decay is not None and (
            not isinstance(weight_decay, (int, float)) or weight_decay < 0
        ):
            raise ValueError(f"weight_decay={weight_decay!r} must be a number >= 0 or None")
        self.weight_decay = weight_decay
        self._count = 0

    def initializer(self, identifier):
        """A fresh instance of the initializer `identifier`, seeded as the class docstring says."""
        initializer = keras.initializers.get(identifier)
        if not isinstance(initializer, keras.initializers.Initializer):
            return initializer  # a plain function: nothing to copy or seed
        config = keras.initializers.serialize(initializer)
        inner = config.get("config") if isinstance(config, dict) else None
        if not isinstance(inner, dict) or "seed" not in inner:
            return keras.initializers.deserialize(config)  # deterministic (zeros, ones, ...)
        index, self._count = self._count, self._count + 1
        if self.seed is not None:
            inner["seed"] = _seed_for(self.seed, index)
        elif isinstance(inner["seed"], int):
            inner["seed"] = _seed_for(inner["seed"], index)
        else:
            inner["seed"] = None  # a new random default seed
        return keras.initializers.deserialize(config)

    def _feedback_kwargs(self, kernel_initializer):
        kwargs = {"feedback": self.algorithm.name}
        # Drawn for every algorithm, so that a seed gives the same W whatever the algorithm.
        feedback_initializer = self.initializer(
            kernel_initializer if self.feedback_initializer is None else self.feedback_initializer
        )
        if self.algorithm.stores_feedback:
            kwargs["feedback_initializer"] = feedback_initializer
        return kwargs

    def _regularizer(self):
        # keras L2(l) adds l·‖W‖², whose gradient is 2l·W: l = weight_decay / 2 gives
        # weight_decay·W, the usual coupled weight decay.
        if not self.weight_decay:
            return None
        return keras.regularizers.L2(self.weight_decay / 2)

    def dense(self, units, name, kernel_initializer, bias_initializer="zeros", activation=None):
        return wt_layers.Dense(
            units,
            activation=activation,
            kernel_initializer=self.initializer(kernel_initializer),
            bias_initializer=self.initializer(bias_initializer),
            kernel_regularizer=self._regularizer(),
            dtype=self.dtype,
            name=name,
            **self._feedback_kwargs(kernel_initializer),
        )

    def conv(self, x, filters, kernel_size, strides, name, kernel_initializer, use_bias=False,
             activation=None):
        """A Conv2D on `x`. A strided convolution pads `(kernel_size − 1) // 2` on each side
        first (as PyTorch and the TPU ResNet do) instead of TensorFlow's asymmetric "same"."""
        if strides > 1 and kernel_size > 1:
            pad = (kernel_size - 1) // 2
            x = keras.layers.ZeroPadding2D(pad, dtype=self.dtype, name=f"{name}_pad")(x)
            padding = "valid"
        else:
            padding = "same"
        return wt_layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=use_bias,
            activation=activation,
            kernel_initializer=self.initializer(kernel_initializer),
            kernel_regularizer=self._regularizer(),
            dtype=self.dtype,
            name=name,
            **self._feedback_kwargs(kernel_initializer),
        )(x)

    def batch_norm(self, x, name, zero_gamma=False):
        return keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            gamma_initializer="zeros" if zero_gamma else "ones",
            dtype=self.dtype,
            name=name,
        )(x)

    def relu(self, x, name):
        return keras.layers.Activation("relu", dtype=self.dtype, name=name)(x)

    def head(self, x, num_classes, kernel_initializer, output_activation,
             bias_initializer="zeros"):
        """The classifier Dense and the `"predictions"` activation, in the variable dtype."""
        x = self.dense(num_classes, "classifier", kernel_initializer, bias_initializer)(x)
        policy = (
            keras.config.dtype_policy()
            if self.dtype is None
            else keras.dtype_policies.get(self.dtype)
        )
        return keras.layers.Activation(
            output_activation or "linear", dtype=policy.variable_dtype, name="predictions"
        )(x)


def _he_normal_fan_out():
    """He et al.'s normal initializer in fan-out mode (torchvision's ResNet convolutions)."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


# --------------------------------------------------------------------------------------------
# MLP and CNN
# --------------------------------------------------------------------------------------------


def mlp(
    input_shape=(784,),
    hidden=(500,),
    num_classes=10,
    feedback="bp",
    activation="sigmoid",
    output_activation="sigmoid",
    initializer="reference",
    feedback_initializer=None,
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
        seed: integer for reproducible weights, or `None`.
        dtype: dtype policy of the layers (`None`: the global policy).
        name: of the model.
    """
    builder = _Builder(feedback, feedback_initializer, seed=seed, dtype=dtype)
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
        batch_norm: batch normalisation after every convolution and the hidden Dense.
        seed: integer for reproducible weights, or `None`.
        dtype: dtype policy of the layers (`None`: the global policy).
        name: of the model.
    """
    builder = _Builder(feedback, feedback_initializer, seed=seed, dtype=dtype)
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


# --------------------------------------------------------------------------------------------
# ResNets
# --------------------------------------------------------------------------------------------


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
    weight_decay,
    output_activation,
    seed,
    dtype,
    name,
):
    builder = _Builder(
        feedback, feedback_initializer, seed=seed, dtype=dtype, weight_decay=weight_decay
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
        zero_init_residual: start the γ of the last batch norm of every residual block at 0,
            so each block starts as the identity (Goyal et al. 2017).
        kernel_initializer: of the convolution kernels; `None` is He et al.'s normal in fan-out
            mode (`VarianceScaling(2.0, "fan_out", "untruncated_normal")`, as torchvision).
        classifier_initializer: of the final Dense kernel; `None` is `RandomNormal(stddev=0.01)`
            (as the TPU reference ResNet). Its bias starts at zero.
        weight_decay: `None` (default) adds no regularizer (the trainer applies decoupled
            decay); a number adds `keras.regularizers.L2(weight_decay / 2)` to every Conv2D and
            Dense kernel, i.e. a gradient `weight_decay·W` (batch norm and biases are not
            decayed).
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
    zero_init_residual=True,
    kernel_initializer=None,
    classifier_initializer=None,
    weight_decay=None,
    output_activation=None,
    seed=None,
    dtype=None,
    name="resnet18",
):
    """ResNet-18 (basic blocks [2, 2, 2, 2]) for ImageNet; 11,689,512 parameters.

    ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool); convolutions without bias, each
    followed by batch norm (momentum 0.9, epsilon 1e-5); 1x1 conv + BN projection shortcuts
    where the shape changes; global average pool; Dense(num_classes).
    """
    return _resnet(
        _basic_block, (2, 2, 2, 2), (64, 128, 256, 512), _imagenet_stem, input_shape,
        num_classes, feedback, feedback_initializer, zero_init_residual, kernel_initializer,
        classifier_initializer, weight_decay, output_activation, seed, dtype, name,
    )


def resnet50(
    input_shape=(224, 224, 3),
    num_classes=1000,
    feedback="bp",
    feedback_initializer=None,
    zero_init_residual=True,
    kernel_initializer=None,
    classifier_initializer=None,
    weight_decay=None,
    output_activation=None,
    seed=None,
    dtype=None,
    name="resnet50",
):
    """ResNet-50 v1.5 (bottleneck blocks [3, 4, 6, 3]) for ImageNet; 25,557,032 parameters.

    As `resnet18`, with bottleneck blocks (1x1, 3x3, 1x1 with 4x expansion). v1.5: a block that
    downsamples does so in its 3x3 convolution (stride 2), not in its first 1x1.
    """
    return _resnet(
        _bottleneck_block, (3, 4, 6, 3), (64, 128, 256, 512), _imagenet_stem, input_shape,
        num_classes, feedback, feedback_initializer, zero_init_residual, kernel_initializer,
        classifier_initializer, weight_decay, output_activation, seed, dtype, name,
    )


def resnet20(
    input_shape=(32, 32, 3),
    num_classes=10,
    feedback="bp",
    feedback_initializer=None,
    zero_init_residual=False,
    kernel_initializer=None,
    classifier_initializer=None,
    weight_decay=None,
    output_activation=None,
    seed=None,
    dtype=None,
    name="resnet20",
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
        classifier_initializer, weight_decay, output_activation, seed, dtype, name,
    )


for _builder in (resnet18, resnet50, resnet20):
    _builder.__doc__ += _RESNET_ARGS_DOC
del _builder


# --------------------------------------------------------------------------------------------
# Lookup and counting
# --------------------------------------------------------------------------------------------

BUILDERS = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet20": resnet20,
}


def get(name, **kwargs):
    """Builds the model `name` (one of `BUILDERS`: `"mlp"`, `"cnn"`, `"resnet18"`, ...); with
    `feedback="dfa"`, with its `keras_wt.dfa.DirectFeedback` marker."""
    if not isinstance(name, str) or name not in BUILDERS:
        raise ValueError(f"model name={name!r} is not one of {tuple(BUILDERS)}")
    # A direct algorithm (dfa) routes the output error to every layer (keras_wt.dfa).
    return dfa.maybe_direct(BUILDERS[name](**kwargs), kwargs.get("feedback", "bp"))


def _size(variable):
    return math.prod(int(d) for d in variable.shape)


def feedback_params(model):
    """The number of stored feedback weights (`layer.feedback_kernel`) of `model`."""
    return sum(
        _size(layer.feedback_kernel)
        for layer in wt_layers.feedback_layers(model)
        if layer.feedback_kernel is not None
    )


def count_forward_params(model):
    """Parameters of the forward model, counted as the usual tables count them.

    The weights of the model's stock twin (`keras_wt.layers.stock_weights`: without the
    feedback kernels `B` and the `(seed, step)` states of `brsf`, `sa`, `ia` layers) minus the
    moving mean and variance of batch norm (statistics, not parameters; PyTorch's `parameters()`
    and the published ResNet counts leave them out). The count is the same for every algorithm
    and does not depend on which weights are frozen.
    """
    statistics = {
        id(variable)
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
        for variable in (layer.moving_mean, layer.moving_variance)
    }
    return sum(_size(w) for w in wt_layers.stock_weights(model) if id(w) not in statistics)
