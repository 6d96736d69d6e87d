"""Saving a layer whose sublayers were converted in place: the `Converted` subclass of a root,
its record, its re-application on load (`keras_wt.nested`'s docstring, "Saving"), and the copy
of a model through `keras.saving` that `keras_wt.convert` converts."""

import copy
import warnings

import keras

from keras_wt import _compat
from keras_wt import layers as layers_lib
from keras_wt.nested.inplace import convert_layer
from keras_wt.nested.inplace import is_plain_graph


@keras.saving.register_keras_serializable(package="keras_wt", name="Converted")
class Converted:
    """The mixin of `Converted[<class>]`: the class of a layer or model some of whose sublayers
    keras_wt converted in place (`keras_wt.nested`'s docstring, "Saving")."""

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
            "__module__": "keras_wt.nested",  # its public path
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
