"""The one substitution: a linear op whose input gradient uses the feedback kernel `B`.

`linear_with_feedback(op, x, W, B)` computes `op(x, W)` in the forward pass. In the backward
pass the gradient with respect to `x` is the vector-Jacobian product of `op(·, B)` and the
gradient with respect to `W` is the stock one, the vector-Jacobian product of `op(x, ·)`. `op` is
bilinear (a matmul or a convolution, with any padding, stride, dilation or grouping), so both
products come from the backend's own gradients of `op` and no layer type needs code of its own:
for Dense this is `dx = dy·Bᵀ`, `dW = xᵀ·dy`; for a convolution it is
`conv_backprop_input(dy, B)` and `conv_backprop_filter(x, dy)`.
"""

import contextlib
import threading

from keras import ops

from keras_wt import backend

_state = threading.local()


def _get(name, default):
    return getattr(_state, name, default)


@contextlib.contextmanager
def _set(name, value):
    previous = _get(name, None)
    setattr(_state, name, value)
    try:
        yield value
    finally:
        setattr(_state, name, previous)


def force_backprop():
    """Context manager: inside it every feedback layer sends the exact backprop gradient.

    Used by `keras_wt.alignment` to compute the true backprop deltas of a model in place.
    """
    return _set("force_backprop", True)


def backprop_forced():
    return bool(_get("force_backprop", False))


def kolen_pollack_update():
    """Context manager the KolenPollack optimizer holds while the wrapped optimizer updates."""
    return _set("kolen_pollack_update", True)


def in_kolen_pollack_update():
    return bool(_get("kolen_pollack_update", False))


class _LinearTap:
    """Collects the linear outputs (before bias and activation) of feedback layers: every call
    of each layer, in call order (a layer called several times in one forward pass, such as a
    shared layer or a projection applied at every time step, has one output per call)."""

    def __init__(self, probes=None):
        self.calls = {}
        self.probes = probes

    def __call__(self, layer, y):
        calls = self.calls.setdefault(layer, [])
        if self.probes is not None and layer in self.probes:
            # A zero tensor added to the output: the gradient with respect to it is the
            # output's delta (a backend without a tape differentiates with respect to it).
            y = y + self.probes[layer][len(calls)]
        calls.append(y)
        return y

    @property
    def outputs(self):
        """`{layer: the linear output of its last call}`."""
        return {layer: calls[-1] for layer, calls in self.calls.items()}


def tap_linear_outputs(probes=None):
    """Context manager yielding a tap: `tap.calls[layer]` lists the linear output of every call
    of each feedback layer called inside it (eagerly), in call order, so that a gradient tape
    (`keras_wt.backend.gradient_tape`) can take the gradient of a loss with respect to them
    (the layer's *delta* at each call); `tap.outputs[layer]` is the last call's.

    `probes`: `{layer: [tensor per call]}` (zeros of each output's shape) added to those
    outputs, so that the deltas are the gradients with respect to the probes: how a backend
    without a tape (JAX) measures them."""
    return _set("tap", _LinearTap(probes))


def linear_tap():
    return _get("tap", None)


def linear_with_feedback(op, x, kernel, feedback, on_backward=None):
    """`op(x, kernel)` whose gradient wrt `x` flows through `feedback` instead of `kernel`.

    Args:
        op: a function `(x, kernel) -> y`, linear in each argument.
        x: the input tensor.
        kernel: the forward kernel `W` (a tensor).
        feedback: a tensor of `kernel`'s shape and dtype, or `None` for exact backprop (then
            the stock op and its stock gradients are used, bit for bit).
        on_backward: called (without arguments) when the backward pass is built: when it is
            traced inside a compiled function, at every backward pass in eager mode.

    Returns:
        `op(x, kernel)`.
    """
    if feedback is None:
        return op(x, kernel)

    @backend.custom_gradient
    def _linear(x, kernel, feedback):
        def grad(dy):
            if on_backward is not None:
                on_backward()
            # Two independent vector-Jacobian products of the same bilinear op. Their forward
            # values are never used and are pruned from the compiled graph.
            (dx,) = backend.vjp(lambda x: op(x, ops.stop_gradient(feedback)), (x,), dy)
            (dw,) = backend.vjp(lambda kernel: op(ops.stop_gradient(x), kernel), (kernel,), dy)
            return dx, dw, None

        return op(x, kernel), grad

    return _linear(x, kernel, feedback)
