"""The weight mirror's law: what each kernel entry's step averages over (`link_counts`), the
step itself (`mirror_gradient`), and the residual angle of `B` at the fixed point with the
noise batch that reaches a target angle (`residual_angle`, `auto_batch_size`): the math of
`keras_wt.mirror`'s docstring."""

import math

import numpy as np
from keras import ops

from keras_wt import backend
from keras_wt.mirror.noise import noise_kurtosis


def _link_tensors(layer):
    """`(C, V)` of `layer`'s linear op on one sample, both of the kernel's shape.

    With `F = f_1(1)` (ones as input and kernel: each output element's fan-in of real input),
    `C = ∇_W Σ f_W(1)` counts the pairs each kernel entry links on real input and
    `V = ∇_W Σ F ⊙ f_W(1)` sums `F` over those pairs. Both depend only on shapes and padding.
    """
    ones = ops.ones((1,) + layer.mirror_input_shape, "float32")
    kernel = ops.ones(tuple(layer.kernel.shape), "float32")

    def fan_in(kernel):
        return layer.linear(ones, kernel)

    fan_ins = fan_in(kernel)
    (counts,) = backend.vjp(fan_in, (kernel,), ops.ones_like(fan_ins))
    (weighted,) = backend.vjp(fan_in, (kernel,), ops.stop_gradient(fan_ins))
    return counts, weighted


def link_counts(layer):
    """`C`: for each entry of `layer`'s kernel, the number of (input, output) element pairs it
    links on one sample where the input is real, not padding (a NumPy array of W's shape).

    It is `∇_W Σ f_W(1)`, the weight-gradient of the layer's linear op on a sample of ones: all
    ones for Dense on vectors, the output's spatial size for a "valid" convolution, fewer at the
    border taps of a padded one.
    """
    return ops.convert_to_numpy(_link_tensors(layer)[0])


def mirror_fan_in(layer, noise_distribution=None):
    """`m` of the residual-angle law (`residual_angle`) for `layer`: `d_in / c` to leading order,
    `d_in + κ − 2` for Dense with noise `noise_distribution` (`κ = E[x⁴]/σ⁴`, `NOISE_KURTOSIS`).

    In general `m = mean_k (V_k + (κ − 2)·C_k) / C_k²` over the kernel entries `k` that meet
    real input (see `_link_tensors`): each entry's mirror step averages `C_k` products
    `x_i·y_o`, and the variance of each product is `σ⁴` times the fan-in `F_o` of its output
    plus `(κ − 2)` for the product's own term `x_i²·W_k` (for weights of equal magnitude). It is
    `d_in + κ − 2` for Dense and `(d_in + κ − 2) / P` for a "valid" convolution with `P` output
    positions; padding makes the border taps' share larger. `noise_distribution=None` leaves
    out the `κ − 2` term (`m = mean_k V_k / C_k²`, the large-`d_in` form, as before `κ`).
    """
    counts, weighted = (ops.convert_to_numpy(t).astype(np.float64) for t in _link_tensors(layer))
    live = counts > 0
    excess = 0.0 if noise_distribution is None else noise_kurtosis(noise_distribution) - 2.0
    return float(np.mean((weighted[live] + excess * counts[live]) / counts[live] ** 2))


def residual_angle(fan_in, batch_size, learning_rate, decay):
    """Degrees: the expected angle between `B` and a frozen `W` at the mirror's fixed point,
    `atan √(η·λ·m / ((2 − η·λ)·n))` for `m = fan_in` (`mirror_fan_in`) and `n = batch_size`."""
    _check_fixed_point(learning_rate, decay)
    rate = learning_rate * decay
    return math.degrees(math.atan(math.sqrt(rate * fan_in / ((2.0 - rate) * batch_size))))


def auto_batch_size(fan_in, learning_rate, decay, target_angle, max_batch_size):
    """The smallest noise batch `n` whose `residual_angle` is at most `target_angle` degrees:
    `n = ⌈η·λ·m / ((2 − η·λ)·tan²θ)⌉`, at least 1 and at most `max_batch_size`."""
    _check_fixed_point(learning_rate, decay)
    if not 0 < target_angle < 90 or max_batch_size < 1:
        raise ValueError(
            f"target_angle={target_angle} must be in (0, 90) degrees and "
            f"max_batch_size={max_batch_size} >= 1."
        )
    rate = learning_rate * decay
    tan2 = math.tan(math.radians(target_angle)) ** 2
    needed = math.ceil(rate * fan_in / ((2.0 - rate) * tan2) * (1 - 1e-12))
    return int(min(max(needed, 1), max_batch_size))


def cost_cap(batch_sizes, costs, max_cost):
    """The largest common cap `N` on the noise batches `batch_sizes` at which the mirror's
    products stay within `max_cost`: `Σ_l min(n_l, N)·F_l ≤ max_cost·Σ_l F_l`, `F_l` (`costs`)
    the multiply-adds of layer `l`'s linear op on one sample (so `max_cost` is a noise batch,
    the mean of the layers' weighted by their cost). At least 1; `max(batch_sizes)` (nothing
    capped) when they all fit."""
    if not max_cost > 0:
        raise ValueError(f"max_cost={max_cost!r} must be > 0")
    budget = max_cost * sum(costs)

    def cost(cap):
        return sum(min(n, cap) * f for n, f in zip(batch_sizes, costs))

    low, high = 1, max(batch_sizes)
    if cost(high) <= budget:
        return high
    while low < high:  # the largest cap within budget (cost grows with the cap)
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= budget else (low, middle - 1)
    return low


def auto_learning_rate(fan_in, batch_size, decay, target_angle):
    """The largest mirror rate `η` at which a noise batch of `batch_size` reaches a
    `residual_angle` of `target_angle` degrees: `η·λ = 2·n·tan²θ / (m + n·tan²θ)` (the angle law
    solved for `η·λ`; always below 2). Its lag behind a moving `W` is about `1/(η·λ)` steps."""
    _check_fixed_point(0.0, decay)
    if not 0 < target_angle < 90 or batch_size < 1:
        raise ValueError(
            f"target_angle={target_angle} must be in (0, 90) degrees and "
            f"batch_size={batch_size} >= 1."
        )
    tan2 = math.tan(math.radians(target_angle)) ** 2
    return 2.0 * batch_size * tan2 / (fan_in + batch_size * tan2) / decay


def _check_fixed_point(learning_rate, decay):
    if decay <= 0:
        raise ValueError(
            f"The mirror has a residual angle only with decay > 0 (got decay={decay}): with "
            "decay=0 there is no fixed point, B grows with the step count and its angle to W "
            "shrinks like 1/sqrt(steps * batch_size). Give decay > 0, or an explicit "
            "batch_size instead of 'auto'."
        )
    if not 0 <= learning_rate * decay < 2:
        raise ValueError(
            f"learning_rate * decay = {learning_rate * decay} must be in [0, 2) for the mirror "
            "to converge."
        )


def mirror_gradient(layer, x, counts=None):
    """`∇_W(½‖f_W(x)‖²) ⊘ C` of `layer`'s linear op at its current kernel, for noise `x`.

    `C` (`counts`, default `link_counts(layer)` with zeros raised to 1; anything that broadcasts
    to W's shape) counts the real-input positions of each kernel entry, so the step is an
    average over every (sample, position) pair that entry actually sees, and `B → (σ²/λ)·W`
    exactly for Dense and every convolution, with any padding.
    """
    kernel = backend.read_value(layer.kernel.value)
    if counts is None:
        counts = ops.maximum(_link_tensors(layer)[0], 1.0)
    x = ops.cast(x, kernel.dtype)

    def energy(kernel):
        return 0.5 * ops.sum(ops.square(layer.linear(x, kernel)))

    (gradient,) = backend.vjp(energy, (kernel,))
    return gradient / ops.cast(counts, kernel.dtype)


def _compact(array):
    """`array` reduced to length 1 along every axis on which it is constant: it broadcasts back
    to its shape, and the compiled step embeds `(k1, …, kn, 1, 1)` counts, not a kernel's worth."""
    for axis in range(array.ndim):
        first = np.take(array, [0], axis=axis)
        if np.array_equal(array, np.broadcast_to(first, array.shape)):
            array = first
    return array
