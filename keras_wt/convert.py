"""`convert`: swap every weighted layer of an existing model for its feedback twin; `strip`: back.

Which stock layers have a twin is `keras_wt.layers.TWINS` (Dense, EinsumDense, every
convolution, MultiHeadAttention, ReversibleEmbedding). Graphs are rebuilt with
`keras.models.clone_model`; the sublayers of other layers (custom layers, wrappers, keras-hub
models) are converted in place by `keras_wt.nested`. Weights are copied by each layer's own
weight order (the feedback kernels left out, see `keras_wt.layers.stock_weights`), never by
name, so a model whose layers name their weights alike (MultiHeadAttention's four `kernel`s,
ConvNeXt's `variable_<n>`) converts like any other.
"""

import collections
import logging
import warnings

import keras

from keras_wt import _compat
from keras_wt import algorithms
from keras_wt import dfa
from keras_wt import layers as layers_lib
from keras_wt import nested
from keras_wt import unused_feedback

logger = logging.getLogger("keras_wt")


def convert(
    model, feedback, copy_weights=True, strict=False, keep_unused_feedback=False, in_place=False,
    **layer_kwargs,
):
    """Returns a copy of `model` whose weighted layers learn with `feedback`.

    Every layer whose exact type is a stock layer with a keras_wt twin
    (`keras_wt.layers.TWINS`: Dense, EinsumDense, Conv1D/2D/3D and their transposes,
    DepthwiseConv1D/2D, SeparableConv1D/2D, MultiHeadAttention, ReversibleEmbedding; and the
    subclasses that add nothing to one, `keras_wt.layers.SAME_AS_STOCK`), at any depth, becomes
    the twin with the same config and weights; a keras_wt layer gets `feedback` instead of its
    own (so `convert(model, "bp")` of a keras_wt model drops every `B`); all other layers are
    kept as they are. Subclasses of stock layers are not converted: their `call` may compute
    something else.

    How each part of the model is reached:

    * a Sequential or Functional graph (nested ones too) is rebuilt with
      `keras.models.clone_model`, its converted layers made from their configs;
    * the sublayers of a layer that is not such a graph — a custom layer, `TimeDistributed`,
      `Bidirectional`, keras-hub's `TransformerEncoder`, a Functional subclass such as a
      keras-hub backbone or task — are converted in place in the copy of that layer
      (`keras_wt.nested`); such a layer saves and loads with its converted sublayers (its class
      becomes `keras_wt.nested.Converted[<its class>]`);
    * a model that is not a plain graph (a keras-hub model, a subclassed model with its own
      `get_config`) is copied with a `keras.saving` round trip, keeping its class and methods,
      then converted in place; a subclassed model without `get_config` is converted only with
      `in_place=True`.

    With `copy_weights=True` every weight is copied, so the copy computes exactly the outputs
    of `model`; feedback kernels are freshly initialized (`layer_kwargs` say how). For `"dfa"` the
    copy ends in a `keras_wt.dfa.DirectFeedback` marker (`keras_wt.dfa.direct_feedback_model`,
    which raises where DFA cannot apply). A report of
    what was converted is logged (logger `keras_wt`, level INFO). A layer left unconverted that
    holds a kernel (a weight whose name contains `kernel`: an LSTM cell, a custom subclass of
    Dense...) stays on exact backprop: those are named, with their parent layer and the reason,
    in a `UserWarning`, or a `ValueError` when `strict=True`.

    Args:
        model: a `keras.Model`: Sequential, Functional, a Functional subclass (keras-hub), or a
            subclassed model (with its own `get_config`, or `in_place=True`).
        feedback: one of `keras_wt.ALGORITHMS`.
        copy_weights: copy the weights of `model` into the copy.
        strict: raise instead of warning when a layer with a kernel is left unconverted.
        keep_unused_feedback: keep a `B` in the layers whose input gradient no weight needs
            (`keras_wt.unused_feedback`: the layers reading the model's input); by default
            those layers are built `feedback_used=False`, without one. A layer inside a layer
            that is not a graph always keeps its `B` (its data flow is not known).
        in_place: convert `model` itself instead of a copy, and return it (its layers keep
            their weights; a composite twin cannot replace a node of a graph in place, and is
            reported as unconverted).
        **layer_kwargs: extra arguments of every converted layer (`feedback_initializer`,
            `feedback_scale`, `feedback_input`, `feedback_loss`).

    Returns:
        The converted `keras.Model`.

    Raises:
        ValueError: no layer of `model` could be converted; `strict=True` and a layer with a
            kernel was left; `model` is a subclassed model that cannot be copied.

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
    conversion = nested.Conversion(feedback, layer_kwargs)

    def unused_in(graph):
        if keep_unused_feedback:
            return set()
        return {id(layer) for layer in unused_feedback.unused_input_error_layers(graph)}

    if in_place or not nested.is_plain_graph(model):
        if in_place:
            new_model = model
        else:
            _check_copyable(model, "convert")
            new_model, pairs = nested.copy_model(model)
            if copy_weights:
                _assign(pairs)
        conversion.unused = unused_in(new_model)
        conversion.convert_below(new_model)
        nested.wrap_roots(new_model)
        kept = len([
            layer for layer in _compat.flatten_layers(new_model)[1:]
            if not isinstance(layer, (layers_lib.WithFeedback, keras.layers.InputLayer))
            and not nested.is_graph(layer)
        ]) - _inside_feedback_layers(new_model)
    else:
        unused = unused_in(model)
        converted = collections.Counter()

        def make(layer):
            if isinstance(layer, layers_lib.WithFeedback):
                twin = type(layer)
            else:
                twin = layers_lib.twin_of(type(layer))
            if twin is None:
                return None
            converted[type(layer).__name__] += 1
            config = _without_feedback(layer.get_config())
            config.update(feedback=feedback, **layer_kwargs)
            if id(layer) in unused and issubclass(twin, layers_lib.FeedbackLayer):
                config["feedback_used"] = False
            return twin.from_config(config)

        def finish(old, new):
            # A layer that is not a graph (a custom layer, a wrapper, a keras-hub model):
            # its sublayers are converted in place, keeping their B (unless a nested graph's
            # reading of the model's input says otherwise).
            if isinstance(new, layers_lib.WithFeedback):
                return
            conversion.unused = _mapped(old, new, unused)
            conversion.convert_below(new)
            nested.wrap_roots(new)

        new_model, pairs = _rebuild(model, make, copy_weights, finish)
        conversion.converted.update(converted)
        kept = len(pairs) - sum(converted.values())
    total = sum(conversion.converted.values())
    details = ", ".join(
        f"{count} {name}" for name, count in sorted(conversion.converted.items())
    )
    logger.info(
        "convert(%s, feedback=%r): %d layers converted (%s); %d other layers kept.",
        model.name,
        feedback,
        total,
        details or "none",
        kept,
    )
    left = unconverted_layers(new_model)
    reasons = _reasons(new_model, left, conversion.left)
    if total == 0:
        raise ValueError(
            f"convert({model.name!r}, feedback={feedback!r}): no layer could be converted. "
            + (reasons if left else "It has no layer of a type keras_wt converts "
               f"(keras_wt.layers.TWINS: {', '.join(c.__name__ for c in layers_lib.TWINS)}).")
        )
    if left:
        counts = collections.Counter(type(layer).__name__ for layer in left)
        listing = ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
        message = (
            f"convert({model.name!r}, feedback={feedback!r}): {len(left)} layers that hold a "
            f"kernel were not converted and stay on exact backprop: {listing}. {reasons} Build "
            "these layers from keras_wt.layers yourself, or accept that they use backprop."
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message + " (strict=True makes this an error.)", UserWarning, stacklevel=2)
    # Direct feedback alignment needs its output error routed to every layer (keras_wt.dfa).
    return dfa.maybe_direct(new_model, feedback)


def strip(model, copy_weights=True):
    """Returns an uncompiled copy of `model` made of stock Keras layers only, same weights.

    Every keras_wt layer becomes its stock twin (`keras_wt.layers.STOCK`) with the same
    config and weights, and no feedback kernel, at any depth (the sublayers `convert` converted
    in place too, and a `keras_wt.nested.Converted` layer becomes its own class again): the copy
    computes exactly the outputs of `model`, and what it saves (`.keras`, SavedModel,
    `model.export`) loads and serves without keras_wt. It is not compiled (the training
    optimizer, `KolenPollack` for instance, belongs to keras_wt): compile it to train it.

    Args:
        model: a Sequential or Functional model, a Functional subclass (keras-hub), or a
            subclassed model with its own `get_config`.
        copy_weights: copy the weights of `model` into the copy.
    """
    if not nested.is_plain_graph(model):
        _check_copyable(model, "strip")
        new_model, pairs = nested.copy_model(model, compile=False)
        if copy_weights:
            _assign(pairs)
        nested.strip_below(new_model)
        return new_model

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

    def finish(old, new):
        if not isinstance(new, layers_lib.WithFeedback):
            nested.strip_below(new)

    return _uncompiled(_rebuild(model, make, copy_weights, finish)[0])


def unconverted_layers(model):
    """The layers of `model` that learn by exact backprop: those that hold a kernel of their
    own (a weight whose name contains `kernel`) and are not keras_wt feedback layers, and the
    stock layers with a feedback twin (`keras_wt.layers.twin_of`) that were not converted."""
    left = []
    for layer in _compat.flatten_layers(model):
        if isinstance(layer, layers_lib.FeedbackLayer):
            continue
        twin = layers_lib.twin_of(type(layer))
        if twin is not None and issubclass(twin, layers_lib.FeedbackLayer):
            left.append(layer)
            continue
        nested_weights = {
            id(weight)
            for sublayer in _compat.flatten_layers(layer)[1:]
            for weight in sublayer.weights
        }
        own = [weight for weight in layer.weights if id(weight) not in nested_weights]
        if any("kernel" in weight.name for weight in own):
            left.append(layer)
    return left


def _check_copyable(model, caller):
    """Raises the advice for a model `caller` cannot copy: a subclassed model (not a graph)
    without a `get_config` of its own class."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"{caller}() takes a keras.Model; got {type(model).__name__}. Wrap the layer in a "
            "model, or pass in_place=True to convert it itself."
        )
    if nested.is_graph(model):
        return
    own = nested.original_class(type(model)).get_config
    if own.__module__.split(".")[0] == "keras" and not isinstance(model, nested.Converted):
        raise ValueError(
            f"{caller}() cannot copy {model.name!r}: it is a {type(model).__name__}, a "
            "subclassed model whose layers Keras cannot rebuild without a get_config of its "
            "own. Either pass in_place=True to convert this model object itself (its Dense, "
            "Conv... sublayers become feedback layers in place, keeping their weights), or "
            "give the class get_config() returning its constructor arguments (then convert "
            "copies it through keras.saving), or build its layers from keras_wt.layers "
            "directly (they take the stock arguments plus feedback=...), or wrap them in a "
            "Functional model."
        )


def _assign(pairs):
    for source, target in pairs:
        target.assign(source.numpy())


def _mapped(old, new, ids):
    """The layers of `new` (a copy of `old`) matching those of `old` listed in `ids`, by their
    place in the two layer trees (`set()` when the trees differ)."""
    if not ids:
        return set()
    a, b = _compat.flatten_layers(old), _compat.flatten_layers(new)
    if len(a) != len(b) or any(type(x).__name__ != type(y).__name__ for x, y in zip(a, b)):
        return set()
    return {id(y) for x, y in zip(a, b) if id(x) in ids}


def _inside_feedback_layers(model):
    return sum(
        len(_compat.flatten_layers(layer)) - 1
        for layer in _compat.flatten_layers(model)
        if isinstance(layer, layers_lib.WithFeedback)
    )


def _reasons(model, left, recorded):
    """One sentence per layer of `left`: its name, type, parent and why it was not converted
    (`recorded`: `{id(layer): reason}` of the conversions that failed, found on the layer or
    on the nearest of its ancestors)."""
    parents = {}
    for layer in _compat.flatten_layers(model):
        for child in _compat.children(layer):
            parents.setdefault(id(child), layer)
    sentences = []
    for layer in left:
        parent = parents.get(id(layer))
        where = (f"{layer.name!r} ({type(layer).__name__})" + (
            "" if parent is None else f" in {parent.name!r} ({type(parent).__name__})"))
        ancestor, reason = layer, None
        while ancestor is not None and reason is None:
            reason = recorded.get(id(ancestor))
            if reason is not None and ancestor is not layer:
                reason = (f"it belongs to {ancestor.name!r} ({type(ancestor).__name__}), "
                          f"which was not converted: {reason}")
            ancestor = parents.get(id(ancestor))
        if reason is None:
            reason = _default_reason(layer)
        sentences.append(f"{where}: {reason}.")
    return " ".join(sentences)


def _default_reason(layer):
    cls = type(layer)
    bases = [stock for stock in layers_lib.TWINS if issubclass(cls, stock)]
    if bases:
        return (f"it is a subclass of {bases[0].__name__}, whose call may compute something "
                "else; keras_wt converts only the stock classes of keras_wt.layers.TWINS (and "
                "those of keras_wt.layers.SAME_AS_STOCK)")
    return f"keras_wt has no feedback twin of {cls.__name__} (keras_wt.layers.TWINS)"


def _without_feedback(config):
    return {
        key: value for key, value in config.items() if key not in layers_lib.FEEDBACK_CONFIG_KEYS
    }


def _rebuild(model, make, copy_weights, finish=None):
    """Clones graph model `model` with `make(layer)` (a new layer, or `None` to clone the layer
    from its config), copies every layer's weights into its clone, then calls
    `finish(old, new)` on every pair made. Nested plain graphs are cloned the same way; any
    other layer (a Functional subclass included) is cloned from its config."""
    pairs, cache = [], {}

    def clone(layer):
        if id(layer) in cache:
            return cache[id(layer)]
        if nested.is_plain_graph(layer):
            new = keras.models.clone_model(layer, clone_function=clone)
        else:
            new = make(layer)
            if new is None:
                new = layer.__class__.from_config(layer.get_config())
            pairs.append((layer, new))
        cache[id(layer)] = new
        return new

    new_model = keras.models.clone_model(model, clone_function=clone)
    if copy_weights:
        for old, new in pairs:
            _copy_weights(old, new)
    if finish is not None:
        for old, new in pairs:
            finish(old, new)
    return new_model, pairs


def _uncompiled(model):
    """`model`, or, if `keras.models.clone_model` compiled it as its source was, an
    uncompiled model of the same layers."""
    if not model.compiled:
        return model
    if isinstance(model, keras.Sequential):
        inputs = model.inputs if model.built else []
        head = [keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name) for x in inputs]
        return keras.Sequential(head + list(model.layers), name=model.name)
    return type(model)(model.input, model.output, name=model.name)


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
