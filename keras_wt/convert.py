"""`convert`: swap every Dense/Conv1D/Conv2D of an existing model for its feedback twin."""

import logging

import keras

from keras_wt import algorithms
from keras_wt import layers as layers_lib

logger = logging.getLogger("keras_wt")

_TWINS = (
    (keras.layers.Conv1D, layers_lib.Conv1D),
    (keras.layers.Conv2D, layers_lib.Conv2D),
    (keras.layers.Dense, layers_lib.Dense),
)


def _twin(layer):
    for stock, ours in _TWINS:
        if isinstance(layer, stock):
            return ours
    return None


def convert(model, feedback, copy_weights=True, **layer_kwargs):
    """Returns a copy of `model` whose Dense, Conv1D and Conv2D layers use `feedback`.

    Every such layer (in nested models too) is rebuilt as the keras_wt layer with the same
    config; all other layers are cloned untouched. With `copy_weights=True` every weight is
    copied, so the converted model computes exactly the same outputs; feedback kernels are
    freshly initialized. Layers that already are keras_wt layers switch to `feedback`. A report
    of what was converted is logged (logger `keras_wt`, level INFO).

    Args:
        model: a Sequential or Functional model (subclassed models cannot be cloned).
        feedback: one of `keras_wt.ALGORITHMS`.
        copy_weights: copy the weights of `model` into the copy.
        **layer_kwargs: extra arguments of every converted layer (`feedback_initializer`,
            `feedback_scale`).

    Returns:
        The converted `keras.Model`.
    """
    algorithms.get(feedback)
    if not isinstance(model, keras.Model) or not (
        isinstance(model, keras.Sequential) or model.__class__.__name__ == "Functional"
        or getattr(model, "_is_graph_network", False)
    ):
        raise ValueError(
            f"convert() needs a Sequential or Functional keras.Model; got "
            f"{type(model).__name__}, a subclassed model whose layers cannot be rebuilt from "
            "config. Build its Dense/Conv layers from keras_wt.layers directly instead (they "
            "take the stock arguments plus feedback=...), or wrap its layers in a Functional "
            "model."
        )
    pairs = []
    converted = {}

    def clone(layer):
        twin = _twin(layer)
        if twin is None:
            new = layer.__class__.from_config(layer.get_config())
        else:
            config = layer.get_config()
            for key in ("feedback", "feedback_initializer", "feedback_scale"):
                config.pop(key, None)
            config.update(layer_kwargs)
            new = twin(feedback=feedback, **config)
            converted[type(layer).__name__] = converted.get(type(layer).__name__, 0) + 1
        pairs.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone, recursive=True)
    if copy_weights:
        for old, new in pairs:
            if old.weights:
                _copy_weights(old, new)
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
    return new_model


def _copy_weights(old, new):
    """Copies every weight of `old` into the same-named weight of `new` (feedback kernels and
    other weights that `old` lacks keep their initial values)."""
    targets = {_short_name(w): w for w in new.weights}
    for weight in old.weights:
        name = _short_name(weight)
        if name not in targets:
            raise ValueError(
                f"convert: layer {new.name!r} has no weight {name!r} to copy into "
                f"(it has {sorted(targets)})."
            )
        targets[name].assign(weight.numpy())


def _short_name(weight):
    return weight.path.split("/")[-1]
