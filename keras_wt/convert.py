"""`convert`: swap every weighted layer of an existing model for its feedback twin; `strip`: back.

Which stock layers have a twin is `keras_wt.layers.TWINS` (Dense, EinsumDense, every
convolution, MultiHeadAttention). Weights are copied by each layer's own weight order (the
feedback kernels left out, see `keras_wt.layers.stock_weights`), never by name, so a model
whose layers name their weights alike (MultiHeadAttention's four `kernel`s, ConvNeXt's
`variable_<n>`) converts like any other.
"""

import collections
import logging
import warnings

import keras

from keras_wt import _compat
from keras_wt import algorithms
from keras_wt import dfa
from keras_wt import layers as layers_lib
from keras_wt import unused_feedback

logger = logging.getLogger("keras_wt")


def convert(
    model, feedback, copy_weights=True, strict=False, keep_unused_feedback=False, **layer_kwargs
):
    """Returns a copy of `model` whose weighted layers learn with `feedback`.

    Every layer whose exact type is a stock layer with a keras_wt twin
    (`keras_wt.layers.TWINS`: Dense, EinsumDense, Conv1D/2D/3D and their transposes,
    DepthwiseConv1D/2D, SeparableConv1D/2D, MultiHeadAttention), in nested models too, is
    rebuilt as the twin with the same config; a keras_wt layer is rebuilt with `feedback`
    instead of its own (so `convert(model, "bp")` of a keras_wt model drops every `B`); all
    other layers are cloned untouched. Subclasses of stock layers are not converted: their
    `call` may compute something else.

    With `copy_weights=True` every weight is copied, so the copy computes exactly the outputs
    of `model`; feedback kernels are freshly initialized (`layer_kwargs` say how). For `"dfa"` the
    copy ends in a `keras_wt.dfa.DirectFeedback` marker (`keras_wt.dfa.direct_feedback_model`,
    which raises where DFA cannot apply). A report of
    what was converted is logged (logger `keras_wt`, level INFO). A layer left unconverted that
    holds a kernel (a weight whose name contains `kernel`: an LSTM cell, a custom subclass of
    Dense...) stays on exact backprop: those are named, by type and count, in a `UserWarning`,
    or a `ValueError` when `strict=True`.

    Args:
        model: a Sequential or Functional model (subclassed models cannot be cloned).
        feedback: one of `keras_wt.ALGORITHMS`.
        copy_weights: copy the weights of `model` into the copy.
        strict: raise instead of warning when a layer with a kernel is left unconverted.
        keep_unused_feedback: keep a `B` in the layers whose input gradient no weight needs
            (`keras_wt.unused_feedback`: the layers reading the model's input); by default
            those layers are built `feedback_used=False`, without one.
        **layer_kwargs: extra arguments of every converted layer (`feedback_initializer`,
            `feedback_scale`, `feedback_input`, `feedback_loss`).

    Returns:
        The converted `keras.Model`.

    Example:

    >>> model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    >>> kp_model = keras_wt.convert(model, "kp")
    """
    algorithms.get(feedback)
    unknown = set(layer_kwargs) - set(layers_lib.FEEDBACK_ARGUMENTS)
    if unknown:
        raise ValueError(
            f"convert() got {sorted(unknown)}; the extra arguments it passes to every converted "
            f"layer are {layers_lib.FEEDBACK_ARGUMENTS[1:]}."
        )
    converted = collections.Counter()
    unused = set()
    if not keep_unused_feedback:
        unused = {id(layer) for layer in unused_feedback.unused_input_error_layers(model)}

    def make(layer):
        if isinstance(layer, layers_lib.WithFeedback):
            twin = type(layer)
        else:
            twin = layers_lib.TWINS.get(type(layer))
        if twin is None:
            return None
        converted[type(layer).__name__] += 1
        config = _without_feedback(layer.get_config())
        config.update(feedback=feedback, **layer_kwargs)
        if id(layer) in unused and issubclass(twin, layers_lib.FeedbackLayer):
            config["feedback_used"] = False
        return twin.from_config(config)

    new_model, pairs = _rebuild(model, make, copy_weights)
    total = sum(converted.values())
    details = ", ".join(f"{count} {name}" for name, count in sorted(converted.items()))
    logger.info(
        "convert(%s, feedback=%r): %d layers converted (%s); %d other layers kept.",
        model.name,
        feedback,
        total,
        details or "none",
        len(pairs) - total,
    )
    left = unconverted_layers(new_model)
    if left:
        counts = collections.Counter(type(layer).__name__ for layer in left)
        listing = ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
        message = (
            f"convert({model.name!r}, feedback={feedback!r}): {len(left)} layers that hold a "
            f"kernel were not converted and stay on exact backprop: {listing}. keras_wt converts "
            "the exact stock types of keras_wt.layers.TWINS only; build these layers from "
            "keras_wt.layers yourself, or accept that they use backprop."
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message + " (strict=True makes this an error.)", UserWarning, stacklevel=2)
    # Direct feedback alignment needs its output error routed to every layer (keras_wt.dfa).
    return dfa.maybe_direct(new_model, feedback)


def strip(model, copy_weights=True):
    """Returns a copy of `model` made of stock Keras layers only, with the same weights.

    Every keras_wt layer becomes its stock twin (`keras_wt.layers.STOCK`) with the same
    config and weights, and no feedback kernel: the copy computes exactly the outputs of
    `model`, and what it saves (`.keras`, SavedModel, `model.export`) loads and serves without
    keras_wt.

    Args:
        model: a Sequential or Functional model.
        copy_weights: copy the weights of `model` into the copy.
    """

    def make(layer):
        if not isinstance(layer, layers_lib.WithFeedback):
            return None
        stock = layers_lib.STOCK.get(type(layer))
        if stock is None:
            raise ValueError(
                f"strip: layer {layer.name!r} is a {type(layer).__name__}, a subclass of a "
                "keras_wt layer with no stock twin in keras_wt.layers.STOCK."
            )
        return stock.from_config(_without_feedback(layer.get_config()))

    return _rebuild(model, make, copy_weights)[0]


def unconverted_layers(model):
    """The layers of `model` that hold a kernel of their own (a weight whose name contains
    `kernel`) and are not keras_wt feedback layers: the layers that learn by exact backprop."""
    left = []
    for layer in _compat.flatten_layers(model):
        if isinstance(layer, layers_lib.FeedbackLayer):
            continue
        nested = {
            id(weight)
            for sublayer in _compat.flatten_layers(layer)[1:]
            for weight in sublayer.weights
        }
        own = [weight for weight in layer.weights if id(weight) not in nested]
        if any("kernel" in weight.name for weight in own):
            left.append(layer)
    return left


def _without_feedback(config):
    return {
        key: value for key, value in config.items() if key not in layers_lib.FEEDBACK_CONFIG_KEYS
    }


def _rebuild(model, make, copy_weights):
    """Clones `model` with `make(layer)` (a new layer, or `None` to clone the layer from its
    config) and copies every layer's weights into its clone."""
    is_graph = isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model) and isinstance(model, keras.Function)
    )
    if not is_graph:
        raise ValueError(
            f"convert() needs a Sequential or Functional keras.Model; got "
            f"{type(model).__name__}, a subclassed model whose layers cannot be rebuilt from "
            "config. Build its Dense/Conv layers from keras_wt.layers directly instead (they "
            "take the stock arguments plus feedback=...), or wrap its layers in a Functional "
            "model."
        )
    pairs = []

    def clone(layer):
        new = make(layer)
        if new is None:
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone, recursive=True)
    if copy_weights:
        for old, new in pairs:
            _copy_weights(old, new)
    return new_model, pairs


def _copy_weights(old, new):
    """Copies the weights of `old` into `new` by their order in each layer, feedback kernels
    left out (those of `new` keep their initial values)."""
    sources = layers_lib.stock_weights(old)
    targets = layers_lib.stock_weights(new)
    shapes = [tuple(w.shape) for w in sources], [tuple(w.shape) for w in targets]
    if shapes[0] != shapes[1]:
        raise ValueError(
            f"convert: cannot copy the weights of layer {old.name!r} ({type(old).__name__}) "
            f"into its copy ({type(new).__name__}): their shapes differ, {shapes[0]} and "
            f"{shapes[1]}."
        )
    for target, source in zip(targets, sources):
        target.assign(source.numpy())
