"""The feedback rule of every algorithm, written once for every layer type.

`B` always has exactly the forward kernel `W`'s shape and layout (DESIGN.md §1), so a rule is a
function of the layer and of `W`'s current value and serves Dense and every convolution alike.
"""

import dataclasses
import math

import tensorflow as tf

ALGORITHMS = ("bp", "fa", "ss", "wm", "kp")

LONG_NAMES = {
    "bp": "backprop",
    "fa": "feedback alignment",
    "ss": "sign symmetry",
    "wm": "weight mirror",
    "kp": "Kolen-Pollack",
}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """How one algorithm obtains the feedback kernel `B` that carries the error downwards.

    Attributes:
        name: the short code (`"bp"`, `"fa"`, ...).
        long_name: the name shown in docs and plots.
        stores_feedback: whether `B` is a variable of the layer (`layer.feedback_kernel`).
        learns_feedback: who changes the stored `B`: `None` (fixed), `"mirror"` or `"optimizer"`.
    """

    name: str
    long_name: str
    stores_feedback: bool
    learns_feedback: str = None

    def feedback(self, layer, kernel):
        """Returns the tensor that replaces `kernel` in the input gradient, or `None` for exact BP.

        Args:
            layer: a built feedback layer.
            kernel: the forward kernel `W` as read in the forward pass (already autocast).
        """
        if self.name == "bp":
            return None
        if self.name == "ss":
            return tf.sign(kernel) * tf.cast(sign_symmetry_scale(layer), kernel.dtype)
        return tf.cast(layer.feedback_kernel, kernel.dtype)


_REGISTRY = {
    "bp": Algorithm("bp", LONG_NAMES["bp"], stores_feedback=False),
    "fa": Algorithm("fa", LONG_NAMES["fa"], stores_feedback=True),
    "ss": Algorithm("ss", LONG_NAMES["ss"], stores_feedback=False),
    "wm": Algorithm("wm", LONG_NAMES["wm"], stores_feedback=True, learns_feedback="mirror"),
    "kp": Algorithm("kp", LONG_NAMES["kp"], stores_feedback=True, learns_feedback="optimizer"),
}


def get(feedback):
    """Returns the `Algorithm` named `feedback`, or raises a `ValueError` naming the choices."""
    if isinstance(feedback, Algorithm):
        return feedback
    if not isinstance(feedback, str) or feedback not in _REGISTRY:
        raise ValueError(f"feedback={feedback!r} is not one of {ALGORITHMS}")
    return _REGISTRY[feedback]


def fan_out(kernel_shape):
    """`out` for a Dense kernel `(in, out)`; `k1·…·kn·c_out` for a convolution kernel."""
    shape = [int(d) for d in kernel_shape]
    return math.prod(shape) // shape[-2]


def sign_symmetry_scale(layer):
    """The magnitude `s` of sign-symmetry feedback `B = sign(W)·s`: `layer.feedback_scale`, or
    `sqrt(2 / fan_out)` when that is `None` (DESIGN.md §2), with `fan_out` the layer's own
    (`layer.feedback_fan_out`: how many outputs each input unit feeds)."""
    if layer.feedback_scale is not None:
        return float(layer.feedback_scale)
    return math.sqrt(2.0 / layer.feedback_fan_out)
