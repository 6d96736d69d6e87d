"""Promotion and replacement: a stock layer below another becomes its feedback twin in place,
and back (`keras_wt.nested`'s docstring)."""

import collections

import keras

from keras_wt import _compat
from keras_wt import layers as layers_lib
from keras_wt.layers.base import _KolenPollackGuard

# What `FeedbackLayer.__init__` and `_init_feedback` add to a stock layer (removed by `strip`).
_FEEDBACK_ATTRIBUTES = (
    "algorithm", "feedback", "feedback_initializer", "feedback_scale", "feedback_input",
    "feedback_loss", "feedback_used", "feedback_kernel", "feedback_state",
    "feedback_input_shape", "_traced_feedback",
)


def is_plain_graph(layer):
    """Whether `layer` is a Sequential or Functional model whose configuration is its graph
    (Keras's own `get_config`): one `keras.models.clone_model` rebuilds and whose saved
    config holds each of its layers' configs. A Functional subclass with its own `get_config`
    (keras-hub's models) is not."""
    if isinstance(layer, keras.Sequential):
        return True
    return (
        isinstance(layer, keras.Model)
        and isinstance(layer, keras.Function)
        and type(layer).get_config.__module__.split(".")[0] == "keras"
    )


def is_graph(layer):
    """Whether `layer` is a Sequential or Functional model (a subclass included)."""
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and isinstance(layer, keras.Function)
    )


def _is_node(parent, layer):
    return isinstance(parent, keras.Function) and any(op is layer for op in parent.operations)


class Conversion:
    """One conversion: the feedback arguments every converted layer takes, the layers whose `B`
    no gradient uses, and the report.

    Attributes:
        config: the `FEEDBACK_ARGUMENTS` given to every converted layer.
        unused: ids of the layers to build `feedback_used=False`.
        converted: `Counter` of the converted layers' stock class names.
        left: `{id(layer): reason}` of the layers that could not be converted.
    """

    def __init__(self, feedback, layer_kwargs, unused=()):
        self.config = dict(feedback=feedback, **layer_kwargs)
        self.unused = set(unused)
        self.converted = collections.Counter()
        self.left = {}

    def convert_below(self, root):
        """Converts in place every layer below `root` (at any depth, `root` itself excepted)
        that has a twin (`keras_wt.layers.twin_of`) or is a keras_wt layer (which gets this
        conversion's feedback instead of its own). Returns how many were converted."""
        before = sum(self.converted.values())
        seen = set()

        def visit(layer):
            for child in _compat.children(layer):
                if id(child) in seen or isinstance(child, keras.layers.InputLayer):
                    continue
                seen.add(id(child))
                if isinstance(child, layers_lib.WithFeedback):
                    twin = type(child)
                else:
                    twin = layers_lib.twin_of(type(child))
                if twin is None:
                    visit(child)
                    continue
                used = id(child) not in self.unused
                reason = convert_layer(layer, child, twin, self.config, used)
                if reason is None:
                    self.converted[_stock_name(child, twin)] += 1
                else:
                    self.left[id(child)] = reason

        visit(root)
        return sum(self.converted.values()) - before


def _stock_name(layer, twin):
    return layers_lib.STOCK.get(twin, type(layer)).__name__


def convert_layer(parent, layer, twin, config, used=True, name=None):
    """Makes `layer`, a sublayer of `parent`, the feedback layer `twin` with the feedback
    arguments `config` (and `feedback_used=used`), named `name`: in place (promotion) when
    `twin` is a `FeedbackLayer`, else by replacing it in `parent`. Returns `None`, or why it
    could not."""
    config = {key: config.get(key) for key in layers_lib.FEEDBACK_ARGUMENTS}
    if issubclass(twin, layers_lib.FeedbackLayer):
        shape = None
        if layer.built:
            build = layer.get_build_config() or {}
            if "input_shape" not in build and not isinstance(layer, keras.layers.Embedding):
                return ("it was built without a recorded input shape (Keras records it when "
                        "build() is called through the layer), so its B has no shape to match")
            shape = build.get("input_shape")
        if isinstance(layer, layers_lib.FeedbackLayer):
            _remove_feedback(layer)
            if type(layer) is not twin:
                _compat.set_class(layer, twin)
        else:
            _compat.set_class(layer, twin)
        if name is not None:
            layer.name = name
        layer.feedback_used = bool(used)
        layer._init_feedback(**config)
        if layer.built:
            with _compat.unlocked(layer):
                layer.build_feedback(shape)
        return None
    new_config = _without_feedback(layer.get_config())
    new_config.update(config)
    if name is not None:
        new_config["name"] = name
    return _replace(parent, layer, twin, new_config)


def _replace(parent, layer, cls, config):
    if parent is None:
        return "it is the model itself"
    if _is_node(parent, layer):
        return (f"it is a node of the graph of {parent.name!r} ({type(parent).__name__}), and "
                f"a {cls.__name__} twin is a different object (made of feedback sublayers) "
                "that convert cannot put in a graph it does not rebuild")
    new = cls.from_config(config)
    if layer.built:
        build = layer.get_build_config()
        if build is None:
            return "it was built without a recorded input shape"
        new.build_from_config(build)
    sources, targets = layers_lib.stock_weights(layer), layers_lib.stock_weights(new)
    if [tuple(w.shape) for w in sources] != [tuple(w.shape) for w in targets]:
        return f"its weights do not match those of a {cls.__name__} built from its config"
    for target, source in zip(targets, sources):
        target.assign(source.numpy())
    if not _compat.replace_child(parent, layer, new):
        return (f"its parent {parent.name!r} ({type(parent).__name__}) holds it in no "
                "attribute, list or dict that convert could set")
    return None


def _remove_feedback(layer):
    """Takes from a `FeedbackLayer` what feedback added to the stock layer."""
    for _, variable in layer.feedback_variables():
        _compat.untrack_variable(layer, variable)
    if layer.built:
        kernel = layer.kernel
        if isinstance(kernel.constraint, _KolenPollackGuard):
            kernel.constraint = kernel.constraint.constraint
    for attribute in _FEEDBACK_ATTRIBUTES:
        if attribute in vars(layer):
            object.__delattr__(layer, attribute)


def _without_feedback(config):
    return {
        key: value for key, value in config.items() if key not in layers_lib.FEEDBACK_CONFIG_KEYS
    }


def strip_layers(root):
    """Makes every keras_wt layer below `root` its stock twin, in place (composite twins are
    replaced in their parent); `keras_wt.nested.strip_below` also unwraps the `Converted`
    layers.

    Raises:
        ValueError: a keras_wt layer has no stock twin, or cannot be replaced.
    """
    seen = set()

    def visit(layer):
        for child in _compat.children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            if not isinstance(child, layers_lib.WithFeedback):
                visit(child)
                continue
            stock = layers_lib.STOCK.get(type(child))
            if stock is None:
                raise ValueError(
                    f"strip: layer {child.name!r} is a {type(child).__name__}, a subclass of a "
                    "keras_wt layer with no stock twin in keras_wt.layers.STOCK."
                )
            if isinstance(child, layers_lib.FeedbackLayer):
                _remove_feedback(child)
                _compat.set_class(child, stock)
                continue
            reason = _replace(layer, child, stock, _without_feedback(child.get_config()))
            if reason is not None:
                raise ValueError(f"strip: layer {child.name!r} cannot be made stock: {reason}.")

    visit(root)
