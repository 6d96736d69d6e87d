"""Direct feedback alignment (Nøkland 2016): the output error reaches every layer directly.

In a `dfa` model every hidden feedback layer `l` receives the output error `e` projected by its
own fixed random matrix `Bₗ`, instead of the error backpropagated from the layer above:

    δhₗ = e·Bₗ          (then ⊙ f'(aₗ) through the layer's own activation)

where `hₗ` is the layer's output (after its activation), `e` the gradient of the loss with
respect to the *top* feedback layer's output, and `Bₗ` a `(n_out, units_l)` matrix (`n_out`: the
top layer's output size, `units_l`: the size of one example of `hₗ`, all its axes flattened, so
convolutions take part too). The top layer receives `e` itself.

Mechanism, all inside Keras's compiled train step:

* every `dfa` feedback layer sends nothing down (its input gradient uses `B = 0`,
  `keras_wt.algorithms`), so nothing of the backpropagated error reaches the layers below;
* `DirectFeedback`, a marker layer inserted right after the top feedback layer, takes
  `[a, h_1, …, h_L]` and returns `a` unchanged; its custom gradient passes the incoming gradient
  `e` on to `a` and `e·Bₗ` to every `hₗ`. It holds the `Bₗ` (its weights: saved, restored and
  identical on every replica, since they never change).

With the top layer linear followed by a sigmoid or softmax `Activation` (keras_wt's models), `e`
is the error at the output units' input, `ŷ − y` for the (summed) sigmoid and the softmax
cross-entropies, as in Nøkland's paper.

`direct_feedback_model(model)` inserts the marker. It applies to a *chain*: one input, one
output, every layer fed by the one before it, feedback layers (Dense, EinsumDense, every
convolution) separated only by layers without weights (activations, pooling, flatten, reshape,
dropout). It refuses, with a `ValueError`: subclassed models; branches and merges (residual
connections: the skip path would carry a backpropagated error past the cut feedback paths);
layers with weights of their own that are not feedback layers (batch or layer normalisation,
embeddings: under DFA no error reaches them, as a normalisation between `hₗ` and the next layer
sits after the point where `e·Bₗ` is injected); nested models and composite layers holding
feedback layers (separable convolutions, attention), whose inner outputs it cannot reach.

Alignment: `weight_angle` and `norm_ratio` are undefined for `dfa` layers (`Bₗ` does not have
`W`'s shape) and absent; `delta_angle` compares `e·Bₗ ⊙ f'` with the backprop delta as for every
algorithm (under `keras_wt.feedback.force_backprop` the marker passes the exact gradient).
"""

import math

import keras
from keras import ops

from keras_wt import _compat
from keras_wt import backend
from keras_wt import algorithms
from keras_wt import feedback as feedback_lib
from keras_wt import layers as layers_lib
from keras_wt.unused_feedback import _inbound_layer_names, _is_graph


def _default_initializer(n_out, units):
    # FA's reference scale, N(0, 1/(fan_in + fan_out)) of the (n_out, units) matrix: with one
    # hidden layer, the reference MLP's DFA draws Bₗ from the distribution FA draws Bᵀ from.
    return keras.initializers.RandomNormal(stddev=math.sqrt(1.0 / (n_out + units)))


@keras.saving.register_keras_serializable(package="keras_wt")
class DirectFeedback(keras.layers.Layer):
    """Marker of a DFA model: returns its first input, sends the error `e` it receives to it
    and `e·Bₗ` to each further input `hₗ` (module docstring).

    Args:
        feedback_initializer: initializer of every `Bₗ`; `None`: `N(0, 1/(n_out + units_l))`.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).

    Call arguments:
        inputs: a list `[a, h_1, …, h_L]`: the top feedback layer's output, then the outputs of
            the hidden feedback layers.
    """

    def __init__(self, feedback_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.feedback_initializer = (
            None if feedback_initializer is None
            else keras.initializers.get(feedback_initializer)
        )
        self.direct_kernels = []

    def build(self, input_shape):
        top, *hidden = [tuple(shape) for shape in input_shape]
        for shape in [top] + hidden:
            if any(d is None for d in shape[1:]):
                raise ValueError(
                    f"DirectFeedback needs fully known shapes (apart from the batch); got "
                    f"{shape}. Build the model with a fixed input size."
                )
        n_out = math.prod(top[1:])
        self.direct_kernels = []
        for i, shape in enumerate(hidden):
            units = math.prod(shape[1:])
            initializer = self.feedback_initializer or _default_initializer(n_out, units)
            self.direct_kernels.append(self.add_weight(
                name=f"direct_feedback_{i}",
                shape=(n_out, units),
                initializer=initializer,
                trainable=False,
                aggregation="only_first_replica",
            ))

    def call(self, inputs):
        top, *hidden = inputs
        if feedback_lib.backprop_forced():
            return top  # the hidden outputs then get only their backprop gradients
        kernels = [backend.read_value(k) for k in self.direct_kernels]
        return _route(top, hidden, kernels)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config["feedback_initializer"] = (
            None if self.feedback_initializer is None
            else keras.initializers.serialize(self.feedback_initializer)
        )
        return config


def _route(top, hidden, kernels):
    count = len(hidden)

    @backend.custom_gradient
    def route(*args):
        top, hidden, kernels = args[0], args[1:1 + count], args[1 + count:]

        def grad(dy):
            e = ops.reshape(dy, (ops.shape(dy)[0], -1))
            sent = [
                ops.reshape(ops.matmul(e, ops.cast(b, e.dtype)), ops.shape(h))
                for h, b in zip(hidden, kernels)
            ]
            return (dy, *[ops.cast(s, h.dtype) for s, h in zip(sent, hidden)],
                    *[None] * len(kernels))

        return backend.identity(top), grad

    return route(top, *hidden, *kernels)


def direct_feedback_model(model):
    """Returns `model` with a `DirectFeedback` marker after its top feedback layer, so that its
    `dfa` layers learn by direct feedback alignment (module docstring). The new model shares
    `model`'s layers (and weights).

    Raises:
        ValueError: `model` is not a chain of feedback layers and weightless layers (module
            docstring), or holds a feedback layer whose algorithm is not a direct one.
    """
    name = getattr(model, "name", type(model).__name__)

    def refuse(reason):
        raise ValueError(
            f"Direct feedback alignment cannot apply to model {name!r}: {reason}. It needs a "
            "chain (one input, one output, each layer fed by the one before) of keras_wt "
            "feedback layers separated only by layers without weights; see keras_wt.dfa."
        )

    if not _is_graph(model):
        refuse(f"it is a {type(model).__name__}, a subclassed model (its graph is unknown)")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        refuse(f"it has {len(model.inputs)} inputs and {len(model.outputs)} outputs")
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not isinstance(model, keras.Sequential):
        previous = model.layers[0].name  # the InputLayer
        nodes = {layer["name"]: layer["inbound_nodes"] for layer in model.get_config()["layers"]}
        for layer in layers:
            sources = _inbound_layer_names(nodes[layer.name])
            if sources != [previous]:
                refuse(f"layer {layer.name!r} is fed by {sources or 'nothing'}, not by "
                       f"{previous!r} alone (a branch, a merge or a residual connection)")
            previous = layer.name
    feedback = []
    for layer in layers:
        if isinstance(layer, layers_lib.FeedbackLayer):
            if not layer.algorithm.direct:
                refuse(f"layer {layer.name!r} has feedback={layer.feedback!r}; convert the "
                       "model with keras_wt.convert(model, 'dfa')")
            feedback.append(layer)
        elif isinstance(layer, DirectFeedback):
            refuse("it already has a DirectFeedback marker")
        elif any(isinstance(sub, layers_lib.FeedbackLayer)
                 for sub in _compat.flatten_layers(layer)[1:]):
            refuse(f"layer {layer.name!r} ({type(layer).__name__}) holds feedback layers that "
                   "the marker cannot reach")
        elif layer.weights:
            refuse(f"layer {layer.name!r} ({type(layer).__name__}) has weights of its own, "
                   "which no error would reach under DFA (normalisation, embeddings)")
    if not feedback:
        refuse("it has no keras_wt feedback layer")
    top = feedback[-1]
    marker = DirectFeedback(name="direct_feedback")
    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype,
                         name=model.inputs[0].name)
    x, hidden = inputs, []
    for layer in layers:
        x = layer(x)
        if layer is top:
            x = marker([x] + hidden)
        elif isinstance(layer, layers_lib.FeedbackLayer):
            hidden.append(x)
    return keras.Model(inputs, x, name=model.name)


def maybe_direct(model, feedback):
    """`direct_feedback_model(model)` when the algorithm `feedback` sends its error directly
    (`dfa`), else `model`."""
    if algorithms.get(feedback).direct:
        return direct_feedback_model(model)
    return model
