"""Drop-in Keras layers whose error signal flows backwards through a feedback kernel `B`.

Every layer here subclasses its stock Keras twin, takes every stock argument, plus:

* `feedback`: one of `keras_wt.ALGORITHMS` (`"bp"`, `"fa"`, `"ss"`, `"wm"`, `"kp"`).
* `feedback_initializer`: initializer of the stored `B` (`fa`, `wm`, `kp`). `None` (default)
  draws `B` from the same distribution as the kernel, independently of it.
* `feedback_scale`: for `ss` (and `brsf`), the magnitude `s` in `B = sign(W)·s`; `None` means
  `sqrt(2 / fan_out)`.
* `feedback_input`: for the rules whose `B` learns from a local alignment loss (`sa`, `ia`, and
  `wm` on real inputs): `"real"` (the layer's input of the batch) or `"noise"`; `None`: the
  algorithm's default (`keras_wt.algorithms.Algorithm.inputs`).
* `feedback_loss`: `{primitive: coefficient}` of that loss (`keras_wt.local.PRIMITIVES`); `None`:
  the algorithm's (`Algorithm.local_loss`).

The forward pass is the stock one. Only the gradient with respect to the layer's input changes
(DESIGN.md §1); the gradients of `W` and of the bias are the stock ones.

Two kinds of layer:

* A `FeedbackLayer` holds one forward kernel `W` (`layer.kernel`) and its feedback kernel `B`
  (`layer.feedback_kernel`, W's shape) around one linear op `layer.linear(x, kernel)`: `Dense`,
  `EinsumDense`, `Conv1D/2D/3D`, `Conv1D/2D/3DTranspose`, `DepthwiseConv1D/2D`, and
  `ReversibleEmbedding` (its reverse projection `h·Eᵀ`; the lookup stays a lookup). The mirror,
  the Kolen–Pollack optimizer and the alignment metrics see only these.
* A layer with several kernels (`SeparableConv1D/2D`, `MultiHeadAttention`, the recurrent
  layers and cells) is built from
  `FeedbackLayer` sublayers, one per kernel, so every (W, B) pair is a `FeedbackLayer` of the
  model and no other code needs to know about the composite. Its weights, with the feedback
  kernels left out, come in the stock layer's order.

What stays exact: the attention products `QKᵀ` and `AV` of `MultiHeadAttention` multiply two
activations and hold no weight, so there is no `W` to hide and they keep their exact gradients;
likewise normalisation, pooling, embeddings and every other layer without a kernel.

One module per family: `arguments` (`WithFeedback`: the feedback arguments), `base`
(`FeedbackLayer`: `B` and the custom gradient), `core` (`Dense`, `EinsumDense`), `convolutional`
(every convolution), `attention` (`MultiHeadAttention`), `embedding` (`ReversibleEmbedding`),
`recurrent` (`SimpleRNN`, `LSTM`, `GRU`, `ConvLSTM1D/2D/3D` and their cells: `B_in` and `B_rec`;
a subpackage, one module per family). `TWINS` below is the one registry of stock layer → twin;
`twin_of` also knows the subclasses that add nothing to a stock layer (`SAME_AS_STOCK`).
"""

import collections

import keras

from keras_wt import _compat
from keras_wt.layers.arguments import FEEDBACK_ARGUMENTS
from keras_wt.layers.arguments import FEEDBACK_CONFIG_KEYS
from keras_wt.layers.arguments import WithFeedback
from keras_wt.layers.attention import MultiHeadAttention
from keras_wt.layers.base import FeedbackLayer
from keras_wt.layers.base import stock_weights
from keras_wt.layers.convolutional import Conv1D
from keras_wt.layers.convolutional import Conv1DTranspose
from keras_wt.layers.convolutional import Conv2D
from keras_wt.layers.convolutional import Conv2DTranspose
from keras_wt.layers.convolutional import Conv3D
from keras_wt.layers.convolutional import Conv3DTranspose
from keras_wt.layers.convolutional import DepthwiseConv1D
from keras_wt.layers.convolutional import DepthwiseConv2D
from keras_wt.layers.convolutional import SeparableConv1D
from keras_wt.layers.convolutional import SeparableConv2D
from keras_wt.layers.core import Dense
from keras_wt.layers.core import EinsumDense
from keras_wt.layers.embedding import ReversibleEmbedding
from keras_wt.layers.recurrent import GRU
from keras_wt.layers.recurrent import ConvLSTM1D
from keras_wt.layers.recurrent import ConvLSTM2D
from keras_wt.layers.recurrent import ConvLSTM3D
from keras_wt.layers.recurrent import ConvLSTMCell
from keras_wt.layers.recurrent import LSTM
from keras_wt.layers.recurrent import GRUCell
from keras_wt.layers.recurrent import LSTMCell
from keras_wt.layers.recurrent import SimpleRNN
from keras_wt.layers.recurrent import SimpleRNNCell

__all__ = [
    "FEEDBACK_ARGUMENTS", "FEEDBACK_CONFIG_KEYS", "FEEDBACK_LAYERS", "STOCK", "TWINS",
    "WithFeedback", "FeedbackLayer", "feedback_keys", "feedback_layers", "feedback_pairs",
    "stock_weights",
    "Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
    "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
    "SeparableConv2D", "MultiHeadAttention", "ReversibleEmbedding", "SAME_AS_STOCK", "twin_of",
    "SimpleRNNCell", "LSTMCell", "GRUCell", "SimpleRNN", "LSTM", "GRU", "ConvLSTMCell",
    "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D",
]

# The one registry: every stock Keras layer with a kernel that keras_wt replaces, and its twin.
TWINS = {
    keras.layers.Dense: Dense,
    keras.layers.EinsumDense: EinsumDense,
    keras.layers.Conv1D: Conv1D,
    keras.layers.Conv2D: Conv2D,
    keras.layers.Conv3D: Conv3D,
    keras.layers.Conv1DTranspose: Conv1DTranspose,
    keras.layers.Conv2DTranspose: Conv2DTranspose,
    keras.layers.Conv3DTranspose: Conv3DTranspose,
    keras.layers.DepthwiseConv1D: DepthwiseConv1D,
    keras.layers.DepthwiseConv2D: DepthwiseConv2D,
    keras.layers.SeparableConv1D: SeparableConv1D,
    keras.layers.SeparableConv2D: SeparableConv2D,
    keras.layers.MultiHeadAttention: MultiHeadAttention,
    keras.layers.ReversibleEmbedding: ReversibleEmbedding,
    keras.layers.SimpleRNNCell: SimpleRNNCell,
    keras.layers.LSTMCell: LSTMCell,
    keras.layers.GRUCell: GRUCell,
    keras.layers.SimpleRNN: SimpleRNN,
    keras.layers.LSTM: LSTM,
    keras.layers.GRU: GRU,
    keras.layers.ConvLSTM1D: ConvLSTM1D,
    keras.layers.ConvLSTM2D: ConvLSTM2D,
    keras.layers.ConvLSTM3D: ConvLSTM3D,
}
STOCK = {ours: stock for stock, ours in TWINS.items()}

# Subclasses of a stock layer that add nothing to it (no method, no property of their own), by
# their registered name (so that keras_wt need not import their library): they compute what the
# stock layer computes, and convert to its twin. Any other subclass may compute something else
# and is left alone.
SAME_AS_STOCK = {
    "keras_hub>ReversibleEmbedding": keras.layers.ReversibleEmbedding,
}


def twin_of(cls):
    """The keras_wt twin of the stock layer class `cls` (`TWINS`, or `SAME_AS_STOCK`'s stock
    layer's twin), else `None` (keras_wt layers included: they are twins already)."""
    twin = TWINS.get(cls)
    if twin is not None:
        return twin
    stock = SAME_AS_STOCK.get(keras.saving.get_registered_name(cls))
    if stock is None or cls.__bases__ != (stock,):
        return None
    own = [
        name for name, value in vars(cls).items()
        if callable(value) or isinstance(value, (property, classmethod, staticmethod))
    ]
    return None if own else TWINS[stock]


FEEDBACK_LAYERS = tuple(cls for cls in TWINS.values() if issubclass(cls, FeedbackLayer))


def feedback_layers(model):
    """All keras_wt feedback layers of `model` (nested models and the sublayers of separable
    convolutions, attention and recurrent cells included), in order: every (W, B) pair of the
    model."""
    return [
        layer for layer in _compat.flatten_layers(model) if isinstance(layer, FeedbackLayer)
    ]


def feedback_keys(model):
    """`{layer: key}` for every feedback layer of `model`, in the order of `feedback_layers`: the
    names under which keras_wt reports and looks up a layer (`keras_wt.feedback_pairs`, the
    alignment metrics, `MirrorCallback`'s per-layer `batch_size`).

    A layer's key is its name when no other feedback layer of the model has that name, so a model
    whose layers are named apart is keyed by its layer names. Layers that share a name (the
    `query` projection of every Transformer block of a keras-hub model) are keyed by their place
    in the model: the names of the layers containing them, outermost first (the model itself left
    out), and their own, joined by `/`, e.g. `transformer_layer_0/self_attention_layer/query`.
    Keras names cannot contain `/`, so such a path never equals a name. Where even the paths
    coincide (two sublayers of one parent given the same name), the second and later, in model
    order, get `#2`, `#3`, ...
    """
    layers = feedback_layers(model)
    count = collections.Counter(layer.name for layer in layers)
    if all(count[layer.name] == 1 for layer in layers):
        return {layer: layer.name for layer in layers}
    parents = _parents(model)
    keys, seen = {}, collections.Counter()
    for layer in layers:
        key = layer.name
        if count[key] > 1:
            names, node = [], layer
            while node is not None and node is not model:
                names.append(node.name)
                node = parents.get(id(node))
            key = "/".join(reversed(names))
        seen[key] += 1
        keys[layer] = key if seen[key] == 1 else f"{key}#{seen[key]}"
    return keys


def _parents(model):
    """`{id(layer): the layer it was found in}` for every sublayer of `model` (depth first, as
    `_compat.flatten_layers` visits them: a layer held by several parents is found in the first).
    In that depth-first order each layer's parent is the nearest layer before it whose sublayers
    include it."""
    parents, stack = {}, []
    for node in _compat.flatten_layers(model):
        while stack and id(node) not in stack[-1][1]:
            stack.pop()
        if stack:
            parents[id(node)] = stack[-1][0]
        stack.append((node, {id(n) for n in _compat.flatten_layers(node)}))
    return parents


def feedback_pairs(model):
    """`{key: (W, B)}`: every forward kernel of `model` with the feedback kernel stored for it, at
    any depth (nested models, composite layers such as `SeparableConv2D` and
    `MultiHeadAttention`), in model order, keyed as `feedback_keys`.

    A pair exists where a `B` variable is stored: the rules whose `B` is a variable (`fa`, `wm`,
    `kp`, `frsf`, `sa`, `ia`), in layers whose `B` some gradient uses (`feedback_used=True`).
    `bp`, `ss` and `brsf` compute their `B` from `W` at each step, and `dfa` keeps its matrices
    in the `keras_wt.dfa.DirectFeedback` marker: none of these has a pair.

    Example:

    >>> for key, (w, b) in keras_wt.feedback_pairs(model).items():
    ...     print(key, w.shape, keras_wt.alignment.angle(w.numpy(), b.numpy()))
    """
    return {
        key: (layer.kernel, layer.feedback_kernel)
        for layer, key in feedback_keys(model).items()
        if layer.feedback_kernel is not None
    }
