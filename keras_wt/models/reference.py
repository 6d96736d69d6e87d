"""The reference initializer and loss of Akrout et al.'s NumPy code: `ReferenceNormal`,
`SummedSigmoidCrossEntropy`, `reference_loss`."""

import math

import keras


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
