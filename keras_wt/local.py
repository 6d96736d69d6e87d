"""Local alignment losses of the feedback kernel `B` (Kunin et al., ICML 2020).

Kunin et al., "Two Routes to Scalable Credit Assignment without Weight Symmetry", build the
learning rules of `B` from a few *primitives*, each a function of quantities local to one layer:
its input `x`, its forward kernel `W`, its feedback kernel `B` and its linear output
`y = f_W(x)`. In keras_wt's layout (`B` has `W`'s shape, `f_K(x) = layer.linear(x, K)`: `x·K`
for Dense, the convolution with `K` for a convolution) they read, for a batch of `n` inputs:

    decay   ½‖B‖²                              (Kunin: ½‖W‖² + ½‖B‖²; W's part is constant in B)
    self    −⟨W, B⟩                            (−tr(WᵀB))
    amp     −⟨f_B(x), f_W(x)⟩ / n              (−tr(xᵀBWx): the weight mirror's objective)
    null    ½‖f_Bᵀ(f_W(x))‖² / n               (½‖BWx‖²: the backward image of the output)
    sparse  ½‖f_B(x)‖² / n                     (½‖xB‖²; Kunin's ½‖Wx‖² is constant in B)

`f_Bᵀ` is the transpose of the linear map `f_B`: `f_Bᵀ(y) = ∇_z⟨f_B(z), y⟩` (for Dense `y·Bᵀ`,
for a convolution `conv_backprop_input(y, B)`), obtained from TensorFlow's own gradient of
`layer.linear`, so one code path serves every layer type. `x` and `W` are held constant
(`stop_gradient`): the loss changes `B` only. For Dense the gradients with respect to `B` are

    decay  B      self  −W      amp  −xᵀ(xW)/n      null  B·(xW)ᵀ(xW)/n      sparse  xᵀ(xB)/n.

Named rules (`keras_wt.algorithms`): symmetric alignment `sa` = self + decay (`B → W/λ`),
information alignment `ia` = amp + null + decay, and the weight mirror on real inputs
(`wm` with `feedback_input="real"`) = amp + decay.

Mechanism: a feedback layer whose `B` learns this way adds `gradient_only(loss)` to the model's
losses in its `call` (`layer.add_loss`); `B` is a trainable variable, so the model's optimizer
applies `lr·∇_B loss` with everything else, through Keras's own loss plumbing (replica scaling
under `tf.distribute`, loss scaling under mixed precision, XLA).
"""

import math
import numbers

from keras import ops

from keras_wt import backend

PRIMITIVES = ("decay", "self", "amp", "null", "sparse")
# The primitives that read the layer's input x.
_READ_INPUT = ("amp", "null", "sparse")


def check_coefficients(coefficients):
    """`((primitive, coefficient), ...)` of a mapping or pairs; raises a `ValueError` naming an
    unknown primitive or a coefficient that is not a finite number."""
    pairs = list(dict(coefficients).items())
    if not pairs:
        raise ValueError("feedback_loss is empty: give at least one of " f"{PRIMITIVES}")
    for name, value in pairs:
        if name not in PRIMITIVES:
            raise ValueError(f"feedback_loss primitive {name!r} is not one of {PRIMITIVES}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value
        ):
            raise ValueError(f"feedback_loss[{name!r}]={value!r} must be a finite number")
    return tuple((name, float(value)) for name, value in pairs)


def transpose_apply(layer, feedback, y, x):
    """`f_Bᵀ(y)`: the transpose of the linear map `z ↦ layer.linear(z, B)` applied to `y`
    (`x` gives the input's shape and dtype)."""
    (transposed,) = backend.vjp(lambda z: layer.linear(z, feedback), (ops.zeros_like(x),), y)
    return transposed


def alignment_loss(layer, x, kernel, feedback, coefficients):
    """`Σ_p c_p·R_p(x, W, B)` over the primitives `p` of `coefficients` (module docstring),
    with `x` and `W` held constant: a float32 scalar whose gradient with respect to `feedback`
    is the update direction of `B`.

    Args:
        layer: the feedback layer (its `linear(x, kernel)` is the linear map).
        x: a batch of the layer's inputs (or noise of their shape).
        kernel: `W`.
        feedback: `B`: the variable, or a tensor read from it while the gradient tape watches
            it (the layers pass the read their backward pass uses), so the gradient reaches it.
        coefficients: `{primitive: coefficient}`.
    """
    coefficients = dict(check_coefficients(coefficients))
    dtype = backend.read_value(kernel).dtype
    w = ops.stop_gradient(ops.cast(kernel, dtype))
    b = ops.cast(feedback, dtype)
    terms = {}
    if "decay" in coefficients:
        terms["decay"] = 0.5 * ops.sum(ops.square(b))
    if "self" in coefficients:
        terms["self"] = -ops.sum(w * b)
    if any(name in coefficients for name in _READ_INPUT):
        x = ops.stop_gradient(ops.cast(x, dtype))
        n = ops.cast(ops.shape(x)[0], dtype)
        y_w = ops.stop_gradient(layer.linear(x, w))
        if "amp" in coefficients or "sparse" in coefficients:
            y_b = layer.linear(x, b)
            if "amp" in coefficients:
                terms["amp"] = -ops.sum(y_b * y_w) / n
            if "sparse" in coefficients:
                terms["sparse"] = 0.5 * ops.sum(ops.square(y_b)) / n
        if "null" in coefficients:
            terms["null"] = 0.5 * ops.sum(ops.square(transpose_apply(layer, b, y_w, x))) / n
    total = backend.add_n([coefficients[name] * terms[name] for name in terms])
    return ops.cast(total, "float32")


def gradient_only(loss):
    """`loss − stop_gradient(loss)`: zero, with `loss`'s gradient. Added to the model's losses it
    trains `B` without changing the losses Keras reports (training and test)."""
    return loss - ops.stop_gradient(loss)
