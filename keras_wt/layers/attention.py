"""`MultiHeadAttention` whose four projections are feedback `EinsumDense` layers."""

import keras

from keras_wt import _compat
from keras_wt.layers.arguments import WithFeedback
from keras_wt.layers.arguments import _Twin
from keras_wt.layers.base import stock_weights
from keras_wt.layers.core import EinsumDense


@keras.saving.register_keras_serializable(package="keras_wt")
class MultiHeadAttention(_Twin, WithFeedback, keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` whose query, key, value (and gate) and output
    projections are feedback `keras_wt.layers.EinsumDense` layers.

    Takes every stock argument plus `feedback`, `feedback_initializer` and `feedback_scale`,
    passed to every projection. The projections are named `<name>_query`, `<name>_key`,
    `<name>_value` and `<name>_attention_output` (so the alignment metrics of several
    attention layers do not collide); `query_dense`, `key_dense`, `value_dense` and
    `output_dense` return them as on the stock layer.

    The attention products `softmax(QKᵀ/√d)` and `A·V` multiply two activations and hold no
    weight: there is no weight to transport, and their gradients stay exact (as do the
    softmax, the dropout and the masks). Only the error crossing a projection uses `B`.

    Example:

    >>> mha = keras_wt.layers.MultiHeadAttention(num_heads=4, key_dim=16, feedback="kp")
    >>> y = mha(x, x)
    """

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        # The stock build creates stock EinsumDense projections; each becomes its feedback twin
        # with the same config, build shape and (initial) weights, in the same place.
        for attribute, sublayer in list(vars(self).items()):
            if type(sublayer) is not keras.layers.EinsumDense:
                continue
            config = sublayer.get_config()
            config.update(self.feedback_config(), name=f"{self.name}_{sublayer.name}")
            twin = EinsumDense.from_config(config)
            twin.build_from_config(sublayer.get_build_config())
            for new, old in zip(stock_weights(twin), sublayer.weights):
                new.assign(old)
            _compat.replace_sublayer(self, attribute, twin)
        # The stock build gives the output projection an unknown sequence length; it is the
        # query's (the mirror draws noise of this shape).
        output = self.output_dense
        output.feedback_input_shape = (
            tuple(query_shape[:-1]) + tuple(output.feedback_input_shape[len(query_shape) - 1 :])
        )
