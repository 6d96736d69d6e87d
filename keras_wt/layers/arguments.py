"""The feedback arguments every keras_wt layer takes (`FEEDBACK_ARGUMENTS`): `WithFeedback`, their
validation and config, and `_Twin`, the `__init__` that takes them after the stock layer's own.
`keras_wt.layers.base.FeedbackLayer` builds on `WithFeedback`; the composite layers (separable
convolutions, attention, the recurrent cells and layers) use it directly.
"""

import keras

from keras_wt import algorithms
from keras_wt import local

FEEDBACK_ARGUMENTS = (
    "feedback", "feedback_initializer", "feedback_scale", "feedback_input", "feedback_loss"
)
# Every keras_wt key of a feedback layer's config: the arguments above, `feedback_used` and, for
# the recurrent cells, `feedback_prefix` (the names of their projections).
FEEDBACK_CONFIG_KEYS = FEEDBACK_ARGUMENTS + ("feedback_used", "feedback_prefix")


class WithFeedback:
    """Mixin of every keras_wt layer: the `FEEDBACK_ARGUMENTS`, their validation and their
    config."""

    def _init_feedback(
        self, feedback, feedback_initializer, feedback_scale, feedback_input=None,
        feedback_loss=None,
    ):
        self.algorithm = algorithms.get(feedback)
        self.feedback = self.algorithm.name
        self.feedback_initializer = (
            None
            if feedback_initializer is None
            else keras.initializers.get(feedback_initializer)
        )
        if feedback_scale is not None and (
            not isinstance(feedback_scale, (int, float)) or feedback_scale <= 0
        ):
            raise ValueError(
                f"feedback_scale={feedback_scale!r} must be a positive number or None"
            )
        self.feedback_scale = feedback_scale
        inputs = self.algorithm.inputs
        if feedback_input is not None and feedback_input not in inputs:
            raise ValueError(
                f"feedback_input={feedback_input!r} is not allowed with feedback="
                f"{self.feedback!r}: it takes "
                + (f"one of {inputs}" if inputs else "none (only sa, ia and wm have one)")
            )
        self.feedback_input = feedback_input
        if feedback_loss is not None:
            if not self.algorithm.local_loss:
                raise ValueError(
                    f"feedback_loss is not allowed with feedback={self.feedback!r}: only the "
                    "algorithms whose B learns from a local alignment loss (sa, ia, and wm with "
                    "feedback_input='real') take one."
                )
            feedback_loss = dict(local.check_coefficients(feedback_loss))
        self.feedback_loss = feedback_loss

    @property
    def feedback_learning(self):
        """Who changes this layer's `B`: an `algorithms.Learning` (`NONE`, `MIRROR`, `OPTIMIZER`
        or `LOSS`)."""
        return self.algorithm.learning(self.resolved_feedback_input)

    @property
    def resolved_feedback_input(self):
        """`feedback_input`, else the algorithm's default (`None` if it has none)."""
        if self.feedback_input is not None:
            return self.feedback_input
        return self.algorithm.inputs[0] if self.algorithm.inputs else None

    @property
    def local_loss_coefficients(self):
        """`{primitive: coefficient}` of the local alignment loss of `B` (`keras_wt.local`)."""
        if self.feedback_loss is not None:
            return dict(self.feedback_loss)
        return dict(self.algorithm.local_loss)

    def feedback_config(self):
        """The `FEEDBACK_ARGUMENTS` of the layer: what a sublayer or a copy needs."""
        return dict(
            feedback=self.feedback,
            feedback_initializer=(
                None
                if self.feedback_initializer is None
                else keras.initializers.serialize(self.feedback_initializer)
            ),
            feedback_scale=self.feedback_scale,
            feedback_input=self.feedback_input,
            feedback_loss=None if self.feedback_loss is None else dict(self.feedback_loss),
        )

    def enable_lora(self, *args, **kwargs):
        raise NotImplementedError(
            f"LoRA is not supported on keras_wt feedback layers (layer {self.name!r}): the "
            "feedback kernel has the full kernel's shape."
        )

    def quantize(self, *args, **kwargs):
        raise NotImplementedError(
            f"Quantization is not supported on keras_wt feedback layers (layer {self.name!r}): "
            "strip the model first (keras_wt.strip) and quantize the stock model."
        )

    def get_config(self):
        config = super().get_config()
        config.update(self.feedback_config())
        return config


class _Twin:
    """`__init__` of every keras_wt layer: the stock layer's arguments, then the feedback ones."""

    def __init__(
        self, *args, feedback="bp", feedback_initializer=None, feedback_scale=None,
        feedback_input=None, feedback_loss=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self._init_feedback(
            feedback, feedback_initializer, feedback_scale, feedback_input, feedback_loss
        )
