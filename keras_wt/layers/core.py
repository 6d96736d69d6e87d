"""Dense layers: `Dense` (`dx = dy·Bᵀ`) and `EinsumDense` (the einsum's adjoint with `B`)."""

import math

import keras

from keras_wt.layers.arguments import _Twin
from keras_wt.layers.base import FeedbackLayer
from keras_wt.layers.base import _add_bias_and_activate
from keras_wt.layers.base import _independent_initializer


@keras.saving.register_keras_serializable(package="keras_wt")
class Dense(_Twin, FeedbackLayer, keras.layers.Dense):
    """`keras.layers.Dense` whose input gradient is `dy·Bᵀ` (`B`: the feedback kernel).

    Args:
        units: as `keras.layers.Dense`; every stock argument is accepted.
        feedback: one of `keras_wt.ALGORITHMS`.
        feedback_initializer: initializer of `B` for `fa`, `wm`, `kp`; `None` draws it like the
            kernel, independently.
        feedback_scale: `s` of sign symmetry, `B = sign(W)·s`; `None` is `sqrt(2 / units)`.
        feedback_input: `"real"` or `"noise"`: what the local alignment loss of `B` sees (`sa`,
            `ia`, `wm`); `None`: the algorithm's default.
        feedback_loss: `{primitive: coefficient}` of that loss (`keras_wt.local`); `None`: the
            algorithm's.

    Example:

    >>> layer = keras_wt.layers.Dense(64, activation="relu", feedback="kp")
    >>> y = layer(np.zeros((8, 32), "float32"))
    >>> layer.feedback_kernel.shape
    (32, 64)
    """

    def linear(self, x, kernel):
        return keras.ops.matmul(x, kernel)

    def call(self, inputs, training=None):
        return _add_bias_and_activate(self, self.linear_with_feedback(inputs, self.kernel))


def _einsum_kernel_axes(equation):
    """`(input_axes, output_axes)` of the kernel (second operand) of an einsum `equation`:
    the kernel's axes summed over, and those that reach the output."""
    operands, output = equation.replace(" ", "").split("->")
    kernel = operands.split(",")[1]
    if "." in kernel:
        return None, None
    input_axes = [i for i, axis in enumerate(kernel) if axis not in output]
    output_axes = [i for i, axis in enumerate(kernel) if axis in output]
    return input_axes, output_axes


@keras.saving.register_keras_serializable(package="keras_wt")
class EinsumDense(_Twin, FeedbackLayer, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` whose input gradient is the einsum of `dy` with `B`.

    The input gradient is `einsum(equation)`'s vector-Jacobian product with `B` in place of the
    kernel: for `"ab,bc->ac"` it is `dy·Bᵀ`, as for `Dense`. Takes every stock argument plus
    `feedback`, `feedback_initializer` and `feedback_scale` as `keras_wt.layers.Dense`; the
    default `feedback_scale` is `sqrt(2 / fan_out)` with `fan_out` the product of the kernel's
    output axes (`num_heads·head_dim` for an attention projection).

    Example:

    >>> layer = keras_wt.layers.EinsumDense("abc,cde->abde", (4, 16), feedback="kp")
    """

    def linear(self, x, kernel):
        return keras.ops.einsum(self.equation, x, kernel)

    def call(self, inputs, training=None):
        return _add_bias_and_activate(self, self.linear_with_feedback(inputs, self.kernel))

    def default_feedback_initializer(self):
        # The stock build tells a VarianceScaling initializer which kernel axes are fan-in and
        # fan-out; B's copy needs the same to have W's scale.
        input_axes, output_axes = _einsum_kernel_axes(self.equation)
        if isinstance(self.kernel_initializer, keras.initializers.VarianceScaling) and (
            input_axes is not None
        ):
            return _independent_initializer(
                self.kernel_initializer, input_axes=input_axes, output_axes=output_axes
            )
        return super().default_feedback_initializer()

    @property
    def feedback_fan_out(self):
        _, output_axes = _einsum_kernel_axes(self.equation)
        if output_axes is None:
            return super().feedback_fan_out
        return math.prod(int(self.kernel.shape[i]) for i in output_axes)
