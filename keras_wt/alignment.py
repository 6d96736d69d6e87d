"""How well the feedback pathway aligns with backprop.

* `weight_angles(model)`: per feedback layer, the angle between `W` and the `B` its algorithm
  sends errors through (`sign(W)·s` for `ss`, `W` itself for `bp`).
* `delta_angles(model, x, y)`: per layer, the angle between the delta the algorithm sends to
  the layer's linear output (before bias and activation) and the true backprop delta, on the
  same batch and parameters.
* `gradient_angles(model, x, y)`: the same for the kernel gradients `ΔW`.
* `norm_ratios(model)`: `‖B‖/‖W‖`.

A layer whose `B` no gradient uses (`feedback_used=False`, `keras_wt.unused_feedback`) has no
feedback: it has no weight angle or norm ratio (its key is absent), while its delta and
gradient angles, which depend on the `B` of the layers above it, are reported as for any layer.

Angles are `degrees(arccos(clip(<a,b>/(|a||b|), -1, 1)))` over flattened tensors, in float64.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_wt import feedback as feedback_lib
from keras_wt import layers as layers_lib


def angle(a, b):
    """The angle in degrees between two tensors of the same size, flattened."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(np.dot(a, b) / norms, -1.0, 1.0))))


def effective_feedback(layer):
    """The `B` the layer's algorithm sends errors through, as a tensor of `W`'s shape."""
    kernel = tf.convert_to_tensor(layer.kernel.value)
    feedback = layer.algorithm.feedback(layer, kernel)
    return kernel if feedback is None else feedback


def _with_weight_angle(model):
    """The feedback layers of `model` whose `B` has `W`'s shape and is used: not `dfa`'s (its
    `Bₗ` maps the output error to the layer's units: no angle to `W` is defined), nor those with
    `feedback_used=False`, which have no feedback."""
    return [
        layer for layer in layers_lib.feedback_layers(model)
        if layer.algorithm.weight_angle and layer.feedback_used
    ]


def weight_angles(model):
    """`{layer_name: degrees between W and B}` for every feedback layer of `model` whose
    algorithm defines one and that has feedback (no key for `dfa` layers or layers with
    `feedback_used=False`)."""
    return {
        layer.name: angle(layer.kernel.numpy(), effective_feedback(layer).numpy())
        for layer in _with_weight_angle(model)
    }


def norm_ratios(model):
    """`{layer_name: ‖B‖/‖W‖}` for the layers of `weight_angles`."""
    ratios = {}
    for layer in _with_weight_angle(model):
        w = np.linalg.norm(layer.kernel.numpy().astype(np.float64))
        b = np.linalg.norm(effective_feedback(layer).numpy().astype(np.float64))
        ratios[layer.name] = float(b / w) if w else float("nan")
    return ratios


def _loss_fn(model, loss):
    if loss is not None:
        loss = keras.losses.get(loss)
        return lambda x, y, y_pred: loss(y, y_pred)
    if getattr(model, "loss", None) is None:
        raise ValueError(
            "The model is not compiled with a loss: pass loss=... (for instance "
            "'sparse_categorical_crossentropy') to compute deltas."
        )
    return lambda x, y, y_pred: model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)


def _deltas_and_gradients(model, x, y, loss_fn, backprop):
    """Deltas and kernel gradients of every feedback layer, in algorithm or backprop mode."""
    layers = layers_lib.feedback_layers(model)
    with feedback_lib.tap_linear_outputs() as tap:
        with tf.GradientTape() as tape:
            if backprop:
                with feedback_lib.force_backprop():
                    y_pred = model(x, training=False)
            else:
                y_pred = model(x, training=False)
            loss = loss_fn(x, y, y_pred)
    layers = [layer for layer in layers if layer in tap.outputs]
    grads = tape.gradient(
        loss,
        [tap.outputs[layer] for layer in layers] + [layer.kernel for layer in layers],
    )
    n = len(layers)
    deltas = {layer.name: g for layer, g in zip(layers, grads[:n])}
    kernel_grads = {layer.name: g for layer, g in zip(layers, grads[n:])}
    return deltas, kernel_grads


def _compare(model, x, y, loss):
    loss_fn = _loss_fn(model, loss)
    algo = _deltas_and_gradients(model, x, y, loss_fn, backprop=False)
    true = _deltas_and_gradients(model, x, y, loss_fn, backprop=True)
    delta = {name: angle(algo[0][name], true[0][name]) for name in algo[0]}
    gradient = {name: angle(algo[1][name], true[1][name]) for name in algo[1]}
    return delta, gradient


def delta_angles(model, x, y, loss=None):
    """`{layer_name: degrees}` between the delta the algorithm sends to each feedback layer's
    linear output and the true backprop delta, on batch `(x, y)`.

    Args:
        model: a model with keras_wt feedback layers.
        x, y: a batch.
        loss: a Keras loss (name or callable `loss(y_true, y_pred)`); defaults to the model's
            compiled loss.
    """
    return _compare(model, x, y, loss)[0]


def gradient_angles(model, x, y, loss=None):
    """`{layer_name: degrees}` between the kernel gradient `ΔW` of the algorithm and the
    backprop `ΔW`, on batch `(x, y)` (arguments as `delta_angles`)."""
    return _compare(model, x, y, loss)[1]


def _prefixed(groups):
    return {f"{prefix}/{name}": value for prefix, values in groups for name, value in values.items()}


def weight_metrics(model):
    """`weight_angle/<layer>` and `norm_ratio/<layer>` as one flat dict: what can be measured
    from the variables alone, with no batch and no forward pass."""
    return _prefixed((("weight_angle", weight_angles(model)), ("norm_ratio", norm_ratios(model))))


def alignment_metrics(model, x, y, loss=None):
    """All alignment measurements as one flat dict with keys `weight_angle/<layer>`,
    `delta_angle/<layer>`, `gradient_angle/<layer>` and `norm_ratio/<layer>`."""
    delta, gradient = _compare(model, x, y, loss)
    metrics = weight_metrics(model)
    metrics.update(_prefixed((("delta_angle", delta), ("gradient_angle", gradient))))
    return metrics
