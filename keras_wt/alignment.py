"""How well the feedback pathway aligns with backprop.

Every result is a dict keyed by `keras_wt.layers.feedback_keys`: a layer's name, or, where
several feedback layers share it (the blocks of a Transformer), its path of ancestor names
(`transformer_layer_0/self_attention_layer/query`).

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

import contextlib

import keras
import numpy as np
from keras import ops

from keras_wt import backend
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
    kernel = backend.read_value(layer.kernel)
    feedback = layer.algorithm.feedback(layer, kernel)
    return kernel if feedback is None else feedback


def _with_weight_angle(model):
    """`{layer: key}` of the feedback layers of `model` whose `B` has `W`'s shape and is used:
    not `dfa`'s (its `Bₗ` maps the output error to the layer's units: no angle to `W` is
    defined), nor those with `feedback_used=False`, which have no feedback."""
    return {
        layer: key for layer, key in layers_lib.feedback_keys(model).items()
        if layer.algorithm.weight_angle and layer.feedback_used
    }


def weight_angles(model):
    """`{key: degrees between W and B}` for every feedback layer of `model` whose algorithm
    defines one and that has feedback (no key for `dfa` layers or layers with
    `feedback_used=False`); keys as `keras_wt.layers.feedback_keys` (the layer's name unless
    another feedback layer has it)."""
    return {
        key: angle(ops.convert_to_numpy(backend.read_value(layer.kernel)),
                   ops.convert_to_numpy(effective_feedback(layer)))
        for layer, key in _with_weight_angle(model).items()
    }


def norm_ratios(model):
    """`{key: ‖B‖/‖W‖}` for the layers of `weight_angles`."""
    ratios = {}
    for layer, key in _with_weight_angle(model).items():
        w = np.linalg.norm(ops.convert_to_numpy(backend.read_value(layer.kernel)).astype(np.float64))
        b = np.linalg.norm(ops.convert_to_numpy(effective_feedback(layer)).astype(np.float64))
        ratios[key] = float(b / w) if w else float("nan")
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
    """Deltas and kernel gradients of every feedback layer, in algorithm or backprop mode, keyed
    as `feedback_keys`. A layer called several times in the forward pass has one delta per call:
    they are flattened and concatenated in call order. Its kernel gradient sums over its calls."""
    if backend.STATELESS:
        return _deltas_and_gradients_by_probes(model, x, y, loss_fn, backprop)
    keys = layers_lib.feedback_keys(model)
    with feedback_lib.tap_linear_outputs() as tap:
        with backend.gradient_tape() as tape:
            if backprop:
                with feedback_lib.force_backprop():
                    y_pred = model(x, training=False)
            else:
                y_pred = model(x, training=False)
            loss = loss_fn(x, y, y_pred)
    layers = [layer for layer in keys if layer in tap.calls]
    calls = [tap.calls[layer] for layer in layers]
    outputs = [output for layer_calls in calls for output in layer_calls]
    grads = tape.gradient(loss, outputs + [layer.kernel for layer in layers])
    deltas, start = {}, 0
    for layer, outputs in zip(layers, calls):
        per_call = grads[start:start + len(outputs)]
        start += len(outputs)
        deltas[keys[layer]] = ops.concatenate(
            [ops.reshape(_dense(g, o), [-1]) for g, o in zip(per_call, outputs)], axis=0
        )
    kernel_grads = {keys[layer]: g for layer, g in zip(layers, grads[start:])}
    return deltas, kernel_grads


def _deltas_and_gradients_by_probes(model, x, y, loss_fn, backprop):
    """`_deltas_and_gradients` without a tape (JAX): the loss as a function of zero probes added
    to every call's linear output and of the kernels' values (the model's variables read
    through a `keras.StatelessScope`), differentiated by the backend."""
    keys = layers_lib.feedback_keys(model)
    mode = feedback_lib.force_backprop if backprop else contextlib.nullcontext
    with feedback_lib.tap_linear_outputs() as tap, mode():
        model(x, training=False)  # the shapes of every call's output
    layers = [layer for layer in keys if layer in tap.calls]
    probes = [[ops.zeros_like(output) for output in tap.calls[layer]] for layer in layers]
    kernels = [layer.kernel for layer in layers]
    kernel_ids = {id(kernel) for kernel in kernels}
    variables = [v for v in model.variables if id(v) not in kernel_ids]
    values = [v.value for v in variables]

    def loss_of(probes, kernel_values):
        mapping = list(zip(variables, values)) + list(zip(kernels, kernel_values))
        with keras.StatelessScope(state_mapping=mapping), mode():
            with feedback_lib.tap_linear_outputs(dict(zip(layers, probes))):
                y_pred = model(x, training=False)
            return loss_fn(x, y, y_pred)

    probe_grads, kernel_grads = backend.vjp(loss_of, (probes, [k.value for k in kernels]))
    deltas = {
        keys[layer]: ops.concatenate([ops.reshape(g, [-1]) for g in grads], axis=0)
        for layer, grads in zip(layers, probe_grads)
    }
    return deltas, {keys[layer]: g for layer, g in zip(layers, kernel_grads)}


def _dense(gradient, output):
    """`gradient`, or zeros of `output`'s shape where no gradient reaches the output."""
    return ops.zeros_like(output) if gradient is None else gradient


def _compare(model, x, y, loss):
    loss_fn = _loss_fn(model, loss)
    algo = _deltas_and_gradients(model, x, y, loss_fn, backprop=False)
    true = _deltas_and_gradients(model, x, y, loss_fn, backprop=True)
    delta = {name: angle(algo[0][name], true[0][name]) for name in algo[0]}
    gradient = {name: angle(algo[1][name], true[1][name]) for name in algo[1]}
    return delta, gradient


def delta_angles(model, x, y, loss=None):
    """`{key: degrees}` between the delta the algorithm sends to each feedback layer's linear
    output and the true backprop delta, on batch `(x, y)` (keys as `weight_angles`). For a layer
    called several times in the forward pass (a shared layer, a projection at every time step),
    the deltas of all its calls, flattened and concatenated, form one vector.

    Args:
        model: a model with keras_wt feedback layers.
        x, y: a batch.
        loss: a Keras loss (name or callable `loss(y_true, y_pred)`); defaults to the model's
            compiled loss.
    """
    return _compare(model, x, y, loss)[0]


def gradient_angles(model, x, y, loss=None):
    """`{key: degrees}` between the kernel gradient `ΔW` of the algorithm and the backprop `ΔW`
    (summed over the layer's calls), on batch `(x, y)` (arguments as `delta_angles`)."""
    return _compare(model, x, y, loss)[1]


def _prefixed(groups):
    return {f"{prefix}/{name}": value for prefix, values in groups for name, value in values.items()}


def weight_metrics(model):
    """`weight_angle/<key>` and `norm_ratio/<key>` as one flat dict: what can be measured
    from the variables alone, with no batch and no forward pass."""
    return _prefixed((("weight_angle", weight_angles(model)), ("norm_ratio", norm_ratios(model))))


def alignment_metrics(model, x, y, loss=None):
    """All alignment measurements as one flat dict with keys `weight_angle/<key>`,
    `delta_angle/<key>`, `gradient_angle/<key>` and `norm_ratio/<key>`."""
    delta, gradient = _compare(model, x, y, loss)
    metrics = weight_metrics(model)
    metrics.update(_prefixed((("delta_angle", delta), ("gradient_angle", gradient))))
    return metrics
