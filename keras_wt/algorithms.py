"""The feedback rule of every algorithm, written once for every layer type.

`B` always has exactly the forward kernel `W`'s shape and layout (DESIGN.md §1), so a rule is a
function of the layer and of `W`'s current value and serves Dense and every convolution alike
(`dfa` sends nothing through its layers: its matrices live in `keras_wt.dfa.DirectFeedback`).
"""

import collections.abc
import dataclasses
import enum
import math

from keras import ops

from keras_wt.backend import stateless_normal

ALGORITHMS = ("bp", "fa", "ss", "wm", "kp", "frsf", "brsf", "dfa", "sa", "ia")

LONG_NAMES = {
    "bp": "backprop",
    "fa": "feedback alignment",
    "ss": "sign symmetry",
    "wm": "weight mirror",
    "kp": "Kolen-Pollack",
    "frsf": "fixed random-magnitude sign-concordant feedback",
    "brsf": "batchwise random-magnitude sign-concordant feedback",
    "dfa": "direct feedback alignment",
    "sa": "symmetric alignment",
    "ia": "information alignment",
}

def _exact(layer, kernel):
    return None


def _stored(layer, kernel):
    return ops.cast(layer.read_feedback_kernel(), kernel.dtype)


def _sign(layer, kernel):
    return ops.sign(kernel) * ops.cast(sign_symmetry_scale(layer), kernel.dtype)


def _fixed_random_sign(layer, kernel):
    # The stored variable holds R; only its magnitude is used.
    return ops.abs(ops.cast(layer.feedback_kernel, kernel.dtype)) * ops.sign(kernel)


def _batchwise_random_sign(layer, kernel):
    # R is redrawn at every step from the layer's (seed, step) state: reproducible, resumable
    # (`stateless_normal`: the same numbers with and without XLA).
    magnitude = ops.abs(stateless_normal(ops.shape(kernel), layer.feedback_seed()))
    return ops.cast(magnitude * sign_symmetry_scale(layer), kernel.dtype) * ops.sign(kernel)


def _cut(layer, kernel):
    # Direct feedback alignment: nothing flows down through the layer; the output error reaches
    # every layer directly (`keras_wt.dfa.DirectFeedback`).
    return ops.zeros_like(kernel)


class Learning(str, enum.Enum):
    """Who changes a stored `B` (`Algorithm.learns_feedback`). A `str`, so a member equals its
    value (`Learning.MIRROR == "mirror"`); `Learning.NONE` is false, the others true."""

    NONE = "none"  # nothing: B stays as drawn (or is recomputed from W by the rule)
    MIRROR = "mirror"  # the weight mirror, on noise (`keras_wt.mirror`)
    OPTIMIZER = "optimizer"  # the Kolen–Pollack optimizer (`keras_wt.optimizers`)
    LOSS = "loss"  # the model's optimizer, on a local alignment loss (`keras_wt.local`)

    def __bool__(self):
        return self is not Learning.NONE

    def __str__(self):
        return self.value


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """How one algorithm obtains the feedback kernel `B` that carries the error downwards.

    Attributes:
        name: the short code (`"bp"`, `"fa"`, ...).
        long_name: the name shown in docs and plots.
        stores_feedback: whether `B` (or, for `frsf`, the `R` of `B = |R|·sign(W)`) is a
            variable of the layer (`layer.feedback_kernel`).
        learns_feedback: who changes the stored `B` (a `Learning`): nobody (`NONE`), the weight
            mirror on noise (`MIRROR`), the Kolen–Pollack optimizer (`OPTIMIZER`) or the model's
            optimizer on a local alignment loss the layer adds to the model's losses (`LOSS`,
            `keras_wt.local`).
        rule: `(layer, kernel) -> B`, the tensor that replaces `W` in the input gradient, or
            `None` for exact backprop.
        steps: whether the layer keeps a `(seed, step)` state (`layer.feedback_state`), advanced
            at every backward pass, from which per-step random draws are made.
        direct: whether the error reaches the layer directly from the model's output (`dfa`):
            the model must end in a `keras_wt.dfa.DirectFeedback` marker.
        local_loss: `{primitive: coefficient}` of the local alignment loss of `B`
            (`keras_wt.local.PRIMITIVES`), for `learns_feedback=Learning.LOSS` (or the real-input
            option of `wm`).
        inputs: the `feedback_input` values the layer accepts (the first is the default):
            `"real"`, the layer's input of the current batch, or `"noise"`.
        real_input_learning: how `B` learns (a `Learning`) when `feedback_input="real"`, if not
            `learns_feedback` (`wm`: a local loss instead of the mirror on noise).
        weight_angle: whether the angle between `W` and `B` is defined (`dfa`'s `Bₗ` has another
            shape: its layers have no `weight_angle` nor `norm_ratio`).
    """

    name: str
    long_name: str
    stores_feedback: bool
    learns_feedback: Learning = Learning.NONE
    rule: collections.abc.Callable = _stored
    steps: bool = False
    direct: bool = False
    local_loss: tuple = ()
    inputs: tuple = ()
    real_input_learning: Learning = None
    weight_angle: bool = True

    def feedback(self, layer, kernel):
        """Returns the tensor that replaces `kernel` in the input gradient, or `None` for exact BP.

        Args:
            layer: a built feedback layer.
            kernel: the forward kernel `W` as read in the forward pass (already autocast).
        """
        return self.rule(layer, kernel)

    def learning(self, feedback_input=None):
        """Who changes `B` (a `Learning`) for a layer whose local input is `feedback_input`."""
        if feedback_input == "real" and self.real_input_learning:
            return self.real_input_learning
        return self.learns_feedback


# Kunin et al.'s primitives' coefficients (keras_wt.local). Our choices, documented in DESIGN.md.
SA_LOSS = (("self", 1.0), ("decay", 1.0))
IA_LOSS = (("amp", 1.0), ("null", 0.1), ("decay", 1.0))
WM_REAL_LOSS = (("amp", 1.0), ("decay", 1.0))

_REGISTRY = {
    "bp": Algorithm("bp", LONG_NAMES["bp"], stores_feedback=False, rule=_exact),
    "fa": Algorithm("fa", LONG_NAMES["fa"], stores_feedback=True),
    "ss": Algorithm("ss", LONG_NAMES["ss"], stores_feedback=False, rule=_sign),
    "wm": Algorithm("wm", LONG_NAMES["wm"], stores_feedback=True,
                    learns_feedback=Learning.MIRROR, local_loss=WM_REAL_LOSS,
                    inputs=("noise", "real"), real_input_learning=Learning.LOSS),
    "kp": Algorithm("kp", LONG_NAMES["kp"], stores_feedback=True,
                    learns_feedback=Learning.OPTIMIZER),
    "frsf": Algorithm("frsf", LONG_NAMES["frsf"], stores_feedback=True,
                      rule=_fixed_random_sign),
    "brsf": Algorithm("brsf", LONG_NAMES["brsf"], stores_feedback=False,
                      rule=_batchwise_random_sign, steps=True),
    "dfa": Algorithm("dfa", LONG_NAMES["dfa"], stores_feedback=False, rule=_cut, direct=True,
                     weight_angle=False),
    "sa": Algorithm("sa", LONG_NAMES["sa"], stores_feedback=True, learns_feedback=Learning.LOSS,
                    local_loss=SA_LOSS, inputs=("real", "noise"), steps=True),
    "ia": Algorithm("ia", LONG_NAMES["ia"], stores_feedback=True, learns_feedback=Learning.LOSS,
                    local_loss=IA_LOSS, inputs=("noise", "real"), steps=True),
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
