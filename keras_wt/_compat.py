"""The private Keras internals keras_wt cannot avoid, each with why and a guard.

Each function checks that the internal it relies on still exists and raises a RuntimeError that
names it otherwise. Every use of a private Keras attribute in keras_wt goes through this module, so that a Keras
upgrade that breaks one breaks here, with a message, and nowhere else.
"""

import keras

_TESTED = ((3, 0), (3, 15))  # the Keras versions these workarounds were written against


def _version():
    return tuple(int(part) for part in keras.__version__.split(".")[:2])


def _unsupported(what):
    return RuntimeError(
        f"keras_wt needs {what}, which Keras {keras.__version__} no longer provides (keras_wt "
        f"was tested with Keras {'.'.join(map(str, _TESTED[0]))} to "
        f"{'.'.join(map(str, _TESTED[1]))}). Please report this at the keras_wt issue tracker."
    )


def flatten_layers(layer):
    """`layer` and all its sublayers (nested models and layers inside layers), depth first.

    Keras has no public way to list the sublayers of a layer that is not a model (for instance
    the four `EinsumDense` projections of a `MultiHeadAttention`); `Layer._flatten_layers` is
    the method Keras itself uses for this (no upstream issue asking for a public one was found;
    tracked in keras_wt's report for issue 9).
    """
    if not isinstance(layer, keras.layers.Layer):
        return [layer]  # a bare `keras.Operation` of a functional graph
    if not hasattr(layer, "_flatten_layers"):
        raise _unsupported("Layer._flatten_layers")
    # Depth first, children in the order they were created (Keras's own recursive walk visits
    # them in reverse).
    layers, seen = [], set()

    def visit(node):
        if id(node) in seen:
            return
        seen.add(id(node))
        layers.append(node)
        for child in node._flatten_layers(include_self=False, recursive=False):
            visit(child)

    visit(layer)
    return layers


def replace_sublayer(parent, attribute, new):
    """Sets `parent.<attribute> = new` in place of the built sublayer there, keeping its place
    in `parent`'s weight order and dropping the old sublayer's weights from `parent`.

    Keras tracks a sublayer when it is assigned to an attribute and has no public way to stop
    tracking it (assigning another layer appends it, and the old weights stay in
    `parent.weights`); the tracker's own `replace_tracked_value` does exactly the swap. Used by
    `keras_wt.layers.MultiHeadAttention`, whose projections the stock `build` creates as stock
    `EinsumDense` layers with no hook to create another class.
    """
    tracker = getattr(parent, "_tracker", None)
    if tracker is None or not hasattr(tracker, "replace_tracked_value"):
        raise _unsupported("the layer tracker's replace_tracked_value")
    old = getattr(parent, attribute)
    tracker.replace_tracked_value("layers", old, new)
    setattr(parent, attribute, new)
