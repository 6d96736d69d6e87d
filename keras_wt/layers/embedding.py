"""`ReversibleEmbedding`: a lookup that stays a lookup, and a reverse projection through `B`."""

import keras

from keras_wt.layers.arguments import _Twin
from keras_wt.layers.base import FeedbackLayer
from keras_wt.layers.base import _independent_initializer


@keras.saving.register_keras_serializable(package="keras_wt")
class ReversibleEmbedding(_Twin, FeedbackLayer, keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` whose reverse projection sends its error through `B`.

    Called on token ids the layer is a lookup, `E[ids]`: no error goes below integer ids, so it
    has nothing to transport, and its gradient (to the rows of `E` it read) is the stock one.
    Called with `reverse=True` on hidden states `h` it is a linear map, the output projection of
    a language model with tied embeddings: `h·Eᵀ` (`tie_weights=True`), or `h·R` with `R` the
    layer's `reverse_embeddings` (`tie_weights=False`). That map is the layer's `linear(x,
    kernel)`, and its input gradient goes through `B` as for every feedback layer: `dy·B` (tied:
    `B` has `E`'s shape `(input_dim, output_dim)`) or `dy·Bᵀ` (untied: `B` has `R`'s shape). Its
    weight gradient is the stock one, added to the lookup's.

    `kernel` is the weight of the reverse projection (`embeddings` when tied, else
    `reverse_embeddings`): what `B` stands in for, what Kolen–Pollack keeps `B` in step with and
    what the alignment metrics compare `B` to. `feedback_input_shape` is the reverse call's input
    shape, `(*ids_shape, output_dim)` until a call with known dimensions fills it in.

    Takes every stock argument plus the feedback arguments of `keras_wt.layers.Dense`; saves its
    variables as the stock layer does, plus `feedback_kernel`. `keras_wt.convert` turns the
    stock layer (and keras-hub's `keras_hub.layers.ReversibleEmbedding`, which adds nothing to
    it) into this one.

    Example:

    >>> embedding = keras_wt.layers.ReversibleEmbedding(100, 16, feedback="kp")
    >>> hidden = embedding(token_ids)                # (batch, length, 16): a lookup
    >>> logits = embedding(hidden, reverse=True)     # (batch, length, 100): h·Eᵀ, error via B
    >>> embedding.feedback_kernel.shape
    (100, 16)
    """

    @property
    def kernel(self):
        return self.embeddings if self.tie_weights else self.reverse_embeddings

    @property
    def bias(self):
        return None

    def build(self, input_shape=None):  # the stock build takes no shape (it needs none)
        super().build(input_shape)

    def build_feedback(self, input_shape):
        super().build_feedback(() if input_shape is None else input_shape)
        # Built on the ids; the reverse call reads vectors of `output_dim` (the mirror's noise).
        ids = (None,) if input_shape is None else tuple(input_shape)
        self.feedback_input_shape = ids + (self.output_dim,)

    def linear(self, x, kernel):
        if self.tie_weights:
            kernel = keras.ops.transpose(kernel)
        return keras.ops.matmul(x, kernel)

    def call(self, inputs, reverse=False):
        if not reverse:
            return super().call(inputs)
        kernel = self.kernel
        if self.reverse_dtype is not None:
            inputs = keras.ops.cast(inputs, self.reverse_dtype)
            kernel = keras.ops.cast(kernel, self.reverse_dtype)
        logits = self.linear_with_feedback(inputs, kernel)
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = keras.ops.multiply(keras.ops.tanh(keras.ops.divide(logits, cap)), cap)
        return logits

    def default_feedback_initializer(self):
        return _independent_initializer(self.embeddings_initializer)

    @property
    def feedback_fan_out(self):
        # Each of the `output_dim` input units of the projection feeds `input_dim` logits.
        return int(self.input_dim)

    def _forward_variables(self):
        return [self.embeddings] + ([] if self.tie_weights else [self.reverse_embeddings])
