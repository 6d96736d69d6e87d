"""Small models of every keras_wt layer family, shared by the backend-neutral tests
(test_backends.py) and the cross-backend parity worker (parity_worker.py)."""

import keras

from keras_wt import layers as wt

# (name, make(feedback) -> layer, input shape)
FAMILIES = [
    ("dense", lambda f: wt.Dense(4, feedback=f), (3, 5)),
    ("conv1d", lambda f: wt.Conv1D(4, 3, strides=2, feedback=f), (2, 9, 3)),
    ("conv2d", lambda f: wt.Conv2D(4, 3, padding="same", feedback=f), (2, 6, 6, 3)),
    ("conv3d", lambda f: wt.Conv3D(2, 2, feedback=f), (2, 4, 4, 4, 2)),
    ("conv2d_transpose", lambda f: wt.Conv2DTranspose(3, 3, strides=2, feedback=f), (2, 4, 4, 2)),
    ("depthwise2d", lambda f: wt.DepthwiseConv2D(3, depth_multiplier=2, feedback=f), (2, 6, 6, 3)),
    ("separable2d", lambda f: wt.SeparableConv2D(4, 3, feedback=f), (2, 6, 6, 3)),
    ("einsum", lambda f: wt.EinsumDense("abc,cde->abde", (3, 4, 5), bias_axes="de",
                                         feedback=f), (2, 3, 6)),
    ("attention", lambda f: wt.MultiHeadAttention(2, 4, feedback=f), (2, 5, 6)),
    ("lstm", lambda f: wt.LSTM(4, return_sequences=True, feedback=f), (2, 5, 3)),
    ("gru", lambda f: wt.GRU(4, feedback=f), (2, 5, 3)),
    ("simple_rnn", lambda f: wt.SimpleRNN(4, feedback=f), (2, 5, 3)),
    ("conv_lstm2d", lambda f: wt.ConvLSTM2D(2, 3, padding="same", feedback=f), (2, 3, 5, 5, 2)),
    # A tied output projection, h·Eᵀ (called with reverse=True on hidden states).
    ("tied_projection", lambda f: wt.ReversibleEmbedding(7, 6, feedback=f), (2, 5, 6)),
]


def family_model(make, feedback, shape):
    """A functional model of the one layer `make(feedback)` on inputs of `shape`."""
    inputs = keras.Input(batch_shape=shape)
    layer = make(feedback)
    if isinstance(layer, keras.layers.MultiHeadAttention):
        outputs = layer(inputs, inputs)
    elif isinstance(layer, wt.ReversibleEmbedding):
        outputs = layer(inputs, reverse=True)
    else:
        outputs = layer(inputs)
    return keras.Model(inputs, outputs)
