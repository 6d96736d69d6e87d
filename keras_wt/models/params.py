"""Parameter counts: `count_forward_params` (what the usual tables count) and
`feedback_params` (the stored `B`s)."""

import math

import keras

from keras_wt import _compat
from keras_wt import layers as wt_layers


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
        for layer in _compat.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
        for variable in (layer.moving_mean, layer.moving_variance)
    }
    return sum(_size(w) for w in wt_layers.stock_weights(model) if id(w) not in statistics)
