"""Feedback that no gradient uses: the layers whose input gradient training never needs.

A feedback layer sends the error below itself through `B`. When nothing below it has a
trainable weight — it reads the model's input directly, or only through weightless layers
(`Flatten`, `Reshape`, padding, `Rescaling`, `Dropout`, pooling, a `Normalization` with
fixed statistics...) — that error reaches no weight: the layer's `B` takes part in no
gradient. Storing it, decaying and updating it (Kolen–Pollack) or mirroring it (weight
mirror) is work for nothing: in the reference MLP that layer holds 99% of the feedback
entries.

`unused_feedback_layers(model)` finds these layers from the graph of a Sequential or
Functional model (nested ones included, and Functional subclasses such as keras-hub's models: the
graph is read from its nodes, not from `get_config`); a layer called several times, or in several
graphs, keeps its `B` if any call needs it. A subclassed model has no graph to read, and keeps
every `B`, as do the sublayers of a layer that is not a graph (a custom layer).
`drop_unused_feedback(model)` marks them `feedback_used=False`
(`keras_wt.layers.FeedbackLayer`): such a layer stores no `B`, computes no input gradient
(its input is read through `stop_gradient`), and neither `KolenPollack` nor the mirror
touches it (`W`'s own update and decay are unchanged, so every other weight trains bit for bit
as with the `B` kept). The flag is part of the layer's config, so `keras.saving.load_model`
rebuilds the layer without `B` and the saved variables match.

`keras_wt.convert`, `keras_wt.app.training.train` and the `keras_wt.models` builders drop unused
feedback unless told to keep it (`keep_unused_feedback=True`: for figures that show that
layer's weight angle; the reference `keras-wt-train --model mlp` keeps it, as published).
"""

import keras

from keras_wt import _compat
from keras_wt import layers as layers_lib


def _carries_weights(layer):
    """Whether an error reaching `layer`'s output is needed below it: the layer (or a layer
    inside it) has a trainable weight, or is frozen (it may be unfrozen later)."""
    weights = getattr(layer, "weights", None)  # None: an operation of the graph, not a layer
    if not weights:
        return False
    return not layer.trainable or any(weight.trainable for weight in weights)


def _is_graph(model):
    return isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model) and isinstance(model, keras.Function)
    )


def _inbound_layer_names(inbound_nodes):
    """The names of the layers feeding a layer, in order, from its `get_config()` inbound nodes
    (every serialized `__keras_tensor__` in them)."""
    names = []

    def visit(value):
        if isinstance(value, dict):
            if value.get("class_name") == "__keras_tensor__":
                names.append(value["config"]["keras_history"][0])
                return
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(inbound_nodes)
    return names


def _input_errors(model, inputs_need_error, needed, order):
    """Records, for every layer of graph model `model` and of the graph models nested in it,
    whether the gradient at its input is needed by some weight (`needed[id(layer)]`, or-ed
    over every graph the layer is called in), given whether it is needed at `model`'s inputs;
    `order` lists the layers in graph order, each nested model's layers right after it."""
    if isinstance(model, keras.Sequential):
        above = inputs_need_error  # the error at the previous layer's output is needed
        entries = []
        for layer in model.layers:
            entries.append((layer, above))
            above = above or _carries_weights(layer)
    else:
        # Per operation, its parents over all its calls in this graph: a layer called several
        # times (keras-hub's tied embedding: a lookup at the input, a projection at the output)
        # needs its input's error if any call does.
        parents = _compat.graph_parents(model)
        carries = {}

        def error_needed_above(operation):
            # Whether the error at the output of `operation` reaches a weight (at or below it).
            key = id(operation)
            if key not in carries:
                if isinstance(operation, keras.layers.InputLayer):
                    carries[key] = inputs_need_error
                else:
                    carries[key] = _carries_weights(operation) or any(
                        error_needed_above(parent) for parent in parents.get(key, ())
                    )
            return carries[key]

        entries = [
            (operation, any(error_needed_above(p) for p in parents.get(id(operation), ())))
            for operation in model.operations
        ]
    for layer, need in entries:
        if id(layer) not in needed:
            order.append(layer)
        needed[id(layer)] = needed.get(id(layer), False) or need
        if _is_graph(layer):
            _input_errors(layer, need, needed, order)


def unused_input_error_layers(model):
    """The layers of `model`, of any type, whose input gradient no trainable weight needs, in
    graph order, the layers of nested Sequential or Functional models (keras-hub's backbones
    too) included; a layer called in several graphs or several times is listed only if none of
    its calls needs one. `[]` for a subclassed model (no graph to read); the sublayers of a
    layer that is not a graph (a custom layer) are not listed: they keep their `B`."""
    if not _is_graph(model):
        return []
    needed, order = {}, []
    _input_errors(model, False, needed, order)
    return [layer for layer in order if not needed[id(layer)]]


def unused_feedback_layers(model):
    """The feedback layers of `model` whose input gradient no trainable weight needs (they
    read the model's input, directly or through weightless layers), in graph order.

    A subclassed model (no graph to read) has none: every `B` is kept. A nested Sequential or
    Functional model is searched when its own input carries no needed error.
    """
    return [
        layer
        for layer in unused_input_error_layers(model)
        if isinstance(layer, layers_lib.FeedbackLayer)
    ]


def drop_unused_feedback(model):
    """Marks the `unused_feedback_layers` of `model` `feedback_used=False` and deletes their
    feedback variables (`B`, and the per-step state of `brsf`); returns those layers.

    Call it on a built model before compiling (or let `keras_wt.convert`, `keras_wt.models`
    or `keras_wt.app.training.train` do it); `W`, the bias and every other weight are untouched.

    Raises:
        ValueError: the model's optimizer is already built (it may hold a dropped `B`).
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        raise ValueError(
            f"drop_unused_feedback({model.name!r}): the model's optimizer is already built "
            "and may hold the feedback kernels to drop; call it before compiling and training."
        )
    layers = unused_feedback_layers(model)
    for layer in layers:
        for name, variable in layer.feedback_variables():
            _compat.untrack_variable(layer, variable)
            setattr(layer, name, None)
        layer.feedback_used = False
    return layers
