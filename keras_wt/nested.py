"""Conversion inside layers that are not graphs: custom layers, wrappers, keras-hub models.

`keras_wt.convert` rebuilds the layers of a Sequential or Functional graph with
`keras.models.clone_model`. The sublayers of any other layer are made by that layer's own code
— a user's `Layer` holding `Dense` sublayers, `TimeDistributed`, `Bidirectional`, keras-hub's
`TransformerEncoder`, and the Functional subclasses whose class and methods a user keeps
(keras-hub's backbones and tasks, `GPT2CausalLM.generate`) — so they are converted in place,
in a copy of the model (`keras_wt.convert` makes it):

* **Promotion.** A stock layer whose twin is a `FeedbackLayer` (`Dense`, `EinsumDense`, the
  convolutions but separable ones, `ReversibleEmbedding`) becomes an instance of its twin
  (`_compat.set_class`) and gets its `B` (`FeedbackLayer.build_feedback`): the same object, with
  the same weight variables, in the same place — an attribute, a list, or a node of a graph.
* **Replacement.** A stock layer whose twin is made of feedback sublayers
  (`SeparableConv1D/2D`, `MultiHeadAttention`, and any such twin of `keras_wt.layers.TWINS`) is
  replaced by that twin, built from its config and build shapes, its weights copied, in every
  attribute, list or dict of its parent that holds it (`_compat.replace_child`). A node of a
  graph Keras did not clone cannot be replaced: it is reported (`Conversion.left`).

A converted layer keeps its name: where several feedback layers share one (the `query` of every
Transformer block), the keys of the alignment metrics, `feedback_pairs` and the mirror are paths
of ancestor names (`keras_wt.layers.feedback_keys`), and a wrapper that names its sublayers
after its own (`Bidirectional`'s `forward_<name>`) names them the same when it is loaded.

**Saving.** Such a layer's `get_config` holds only its constructor arguments: loaded, it would
rebuild stock sublayers, which do not take the feedback variables saved. So the *root* of an
in-place conversion (the topmost layer or model holding converted sublayers whose configuration
is not a graph's: see `wrap_roots`) becomes an instance of `Converted[<its class>]`, a subclass
of its own class (one per class, named as the class, so that Keras saves its weights at the same
paths), registered for saving as `keras_wt>Converted`. Its `get_config` is
`{"layer": <the layer serialized as its own class>, "feedback_layers": [{"path", "class_name",
"name", "config"}, ...]}`, one entry per feedback layer below it (the child indices from the
root, the twin's registered name, its name and feedback arguments); `Converted.from_config`
deserializes the layer, converts the sublayers at those paths again (`apply`) — so that
`keras.saving.load_model` (after `import keras_wt`) then loads every `B` saved — and returns it.
`keras_wt.strip` turns it back into its own class.
"""

import collections
import copy
import warnings

import keras

from keras_wt import _compat
from keras_wt import layers as layers_lib
from keras_wt.layers.base import _KolenPollackGuard

# What `FeedbackLayer.__init__` and `_init_feedback` add to a stock layer (removed by `strip`).
_FEEDBACK_ATTRIBUTES = (
    "algorithm", "feedback", "feedback_initializer", "feedback_scale", "feedback_input",
    "feedback_loss", "feedback_used", "feedback_kernel", "feedback_state",
    "feedback_input_shape", "feedback_learner", "_traced_feedback",
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
        if "_keras_wt_layer" in getattr(kernel, "__dict__", {}):
            del kernel._keras_wt_layer
    for attribute in _FEEDBACK_ATTRIBUTES:
        if attribute in vars(layer):
            object.__delattr__(layer, attribute)


def _without_feedback(config):
    return {
        key: value for key, value in config.items() if key not in layers_lib.FEEDBACK_CONFIG_KEYS
    }


def strip_below(root):
    """Makes every keras_wt layer below `root` its stock twin, in place (composite twins are
    replaced in their parent), and every `Converted` layer at or below it an instance of its
    own class again.

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
    unwrap(root)


# --------------------------------------------------------------------------------------------
# Saving: the Converted subclass of a root, its record, and its re-application on load.


@keras.saving.register_keras_serializable(package="keras_wt", name="Converted")
class Converted:
    """The mixin of `Converted[<class>]`: the class of a layer or model some of whose sublayers
    keras_wt converted in place (module docstring, "Saving")."""

    def get_config(self):
        return {
            "layer": _serialize_as(self, original_class(type(self))),
            "feedback_layers": record(self),
        }

    @classmethod
    def from_config(cls, config):
        layer = keras.saving.deserialize_keras_object(config["layer"])
        apply(layer, config["feedback_layers"])
        wrap(layer)
        return layer


_CONVERTED = {}


def converted_class(cls):
    """`Converted[cls]`: a subclass of `cls` named as it is, saved as `keras_wt>Converted`."""
    if issubclass(cls, Converted):
        return cls
    if cls not in _CONVERTED:
        sub = type(cls.__name__, (Converted, cls), {
            "__module__": __name__,
            "__qualname__": f"Converted[{cls.__qualname__}]",
            "__doc__": f"{cls.__name__} with sublayers converted in place by keras_wt "
                       "(keras_wt.nested.Converted).",
        })
        # Saved under the one shared name, whose class (the static mixin) loads any of them.
        keras.saving.register_keras_serializable(package="keras_wt", name="Converted")(sub)
        keras.saving.register_keras_serializable(package="keras_wt", name="Converted")(Converted)
        _CONVERTED[cls] = sub
    return _CONVERTED[cls]


def original_class(cls):
    """The class `Converted[...]` was made from (`cls` itself if it is not one)."""
    if issubclass(cls, Converted):
        return next(base for base in cls.__mro__[1:] if not issubclass(base, Converted))
    return cls


def wrap(layer):
    if not isinstance(layer, Converted):
        _compat.set_class(layer, converted_class(type(layer)))


def unwrap(root):
    """Every `Converted` layer at or below `root` becomes an instance of its own class."""
    for layer in _compat.flatten_layers(root):
        if isinstance(layer, Converted):
            _compat.set_class(layer, original_class(type(layer)))


def _holds_feedback(layer):
    return any(
        isinstance(sub, layers_lib.WithFeedback) for sub in _compat.flatten_layers(layer)[1:]
    )


def wrap_roots(layer):
    """Makes `Converted` every root of an in-place conversion at or below `layer`: `layer`
    itself if it holds feedback layers and is not a plain graph (whose saved config holds its
    layers'), else, in a plain graph, each such layer of it (recursively through nested plain
    graphs). Returns the roots."""
    if isinstance(layer, layers_lib.WithFeedback) or not _holds_feedback(layer):
        return []
    if not is_plain_graph(layer):
        wrap(layer)
        return [layer]
    roots = []
    for child in _compat.children(layer):
        roots.extend(wrap_roots(child))
    return roots


def _serialize_as(layer, cls):
    """`keras.saving.serialize_keras_object(layer)` as if `layer` were a `cls` (its class for a
    moment), without its compile configuration (the `Converted` one holds it)."""
    own = type(layer)
    object.__setattr__(layer, "__class__", cls)
    try:
        config = keras.saving.serialize_keras_object(layer)
    finally:
        object.__setattr__(layer, "__class__", own)
    config.pop("compile_config", None)
    return config


def record(root):
    """The feedback layers below `root` as `Converted.get_config` saves them: per layer, its
    path of child indices from `root`, its class's registered name, name and feedback
    arguments (with `feedback_used`); the sublayers of a feedback layer are its own."""
    entries, seen = [], set()

    def visit(layer, path):
        for index, child in enumerate(_compat.children(layer)):
            if id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, layers_lib.WithFeedback):
                config = child.feedback_config()
                if isinstance(child, layers_lib.FeedbackLayer):
                    config["feedback_used"] = child.feedback_used
                entries.append({
                    "path": path + [index],
                    "class_name": keras.saving.get_registered_name(type(child)),
                    "name": child.name,
                    "config": config,
                })
            else:
                visit(child, path + [index])

    visit(root, [])
    return entries


def apply(root, entries):
    """Converts the sublayers of `root` (freshly deserialized) that `entries` (`record`) name,
    as they were when recorded.

    Raises:
        ValueError: a path leads to no layer, or to a layer whose twin is not the recorded one
            (the layer's class builds other sublayers than when it was saved).
    """
    for entry in entries:
        parent, layer, names = None, root, [root.name]
        for index in entry["path"]:
            children = _compat.children(layer)
            if index >= len(children):
                layer = None
                break
            parent, layer = layer, children[index]
            names.append(layer.name)
        twin = keras.saving.get_registered_object(entry["class_name"])
        where = "/".join(names)
        if layer is None or twin is None or not (
            type(layer) is twin or layers_lib.twin_of(type(layer)) is twin
        ):
            found = "nothing" if layer is None else f"a {type(layer).__name__}"
            raise ValueError(
                f"Cannot restore the feedback layers of {root.name!r} "
                f"({type(root).__name__}): the saved configuration has a "
                f"{entry['class_name']} at {where} (child indices {entry['path']}), the "
                f"layer rebuilt from it has {found} there. Was it saved with another version "
                "of its class?"
            )
        config = dict(entry["config"])
        used = config.pop("feedback_used", True)
        if type(layer) is twin and layer.feedback_config() == config and (
            getattr(layer, "feedback_used", True) == used
        ):
            layer.name = entry["name"]
            continue
        reason = convert_layer(parent, layer, twin, config, used, entry["name"])
        if reason is not None:
            raise ValueError(
                f"Cannot restore the feedback layer {entry['name']!r} of {root.name!r} at "
                f"{where}: {reason}."
            )


def copy_model(model, compile=True):
    """A copy of `model` (a layer or model with `get_config`/`from_config`) made by a
    `keras.saving` round trip, and the `(source, copy)` pairs of its weights; without its
    compile configuration when `compile=False` (and a keras-hub task is then made with
    `compile=False`). A keras-hub task's copy shares the source's preprocessor.

    Raises:
        ValueError: the round trip fails or gives other weights.
    """
    cls = original_class(type(model))
    task = _is_keras_hub_task(model)
    # A keras-hub task's preprocessor holds no weights, and its tokenizer's vocabulary is an
    # asset of the saved file, not part of its config: the copy shares the source's.
    preprocessor = getattr(model, "preprocessor", None) if task else None
    try:
        config = keras.saving.serialize_keras_object(model)
        inner = config["config"]["layer"] if isinstance(model, Converted) else config
        if not compile:
            config.pop("compile_config", None)
            if task:
                inner["config"]["compile"] = False
        if preprocessor is not None:
            inner["config"]["preprocessor"] = None
        with warnings.catch_warnings():
            # A model whose class overrides `compile` (keras-hub's tasks, which compile
            # themselves with their defaults when made) is not recompiled from its config;
            # Keras warns about it at every copy. The copy is compiled as such a class makes it.
            warnings.filterwarnings("ignore", message=r"`compile\(\)` was not called")
            new = keras.saving.deserialize_keras_object(
                copy.deepcopy(config), custom_objects={cls.__name__: cls}
            )
    except (TypeError, ValueError, NotImplementedError, KeyError, AttributeError) as error:
        raise ValueError(
            f"convert() copies {model.name!r} ({cls.__name__}) through keras.saving "
            f"(get_config/from_config), which failed: {error}. Pass in_place=True to convert "
            "this model object itself, or make the class serializable (get_config returning "
            "its constructor arguments, keras.saving.register_keras_serializable)."
        ) from error
    if preprocessor is not None:
        new.preprocessor = preprocessor
    sources, targets = model.weights, new.weights
    if [tuple(w.shape) for w in sources] != [tuple(w.shape) for w in targets]:
        raise ValueError(
            f"convert() copied {model.name!r} ({cls.__name__}) through keras.saving, but the "
            f"copy has other weights ({len(targets)} against {len(sources)}): its "
            "from_config does not rebuild the same layers. Pass in_place=True to convert this "
            "model object itself."
        )
    return new, list(zip(sources, targets))


def _is_keras_hub_task(model):
    import sys

    hub = sys.modules.get("keras_hub")
    return hub is not None and isinstance(model, hub.models.Task)
