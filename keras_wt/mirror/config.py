"""`MirrorConfig`: every setting of the weight mirror, defined, defaulted and checked once;
`MirrorSettings`, which reads them as attributes of the objects that take one."""

import collections.abc
import dataclasses
import math
import numbers

import keras

from keras_wt.mirror.law import _check_fixed_point
from keras_wt.mirror.noise import NOISE_DISTRIBUTIONS

AUTO = "auto"
# What a layer whose `"auto"` noise batch would exceed `max_batch_size` gives up: its angle (it
# keeps `η` and settles at a larger residual angle) or its rate (it keeps `target_angle` with a
# smaller `η`, so `B` follows `W` more slowly: a lag of about `1/(η·λ)` mirror steps).
CAP_POLICIES = ("angle", "rate")
# `warmup_steps="auto"`: `WARMUP_LAGS` lags `1/(η·λ)` at the mirror's own rate `η` (the initial
# `B`'s share falls to e⁻¹⁰: the convnet recipe's 200 steps at η = 0.05 before issue #21), and at
# least `WARMUP_SLOW_LAGS` lags of the slowest layer (`cap_policy="rate"`; e⁻³ ≈ 5%, which its
# training steps keep averaging away).
WARMUP_LAGS = 10
WARMUP_SLOW_LAGS = 3


def check_batch_size(batch_size):
    """Returns `batch_size` (ints as Python ints, a mapping as a dict) if it is a positive int,
    `"auto"`, a mapping from layer names to positive ints, or a callable; else raises a
    `ValueError`."""
    if isinstance(batch_size, str):
        if batch_size != AUTO:
            raise ValueError(f"batch_size={batch_size!r} is not an int, a dict, a callable or 'auto'")
        return batch_size
    if isinstance(batch_size, collections.abc.Mapping):
        return {name: _check_size(n, f"batch_size[{name!r}]") for name, n in batch_size.items()}
    if callable(batch_size):
        return batch_size
    return _check_size(batch_size, "batch_size")


def _check_size(n, what):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{what}={n!r} must be a positive int")
    return int(n)


@dataclasses.dataclass(frozen=True)
class MirrorConfig:
    """Every setting of the weight mirror, in keras_wt's units (`η`, `σ`, `λ`): the one place
    where each is defined, defaulted and checked. `WeightMirror` and `MirrorCallback` take one
    (`config=`), or keyword arguments of the same names, which make one.

    The defaults are the library's (no decay, a noise batch of 128); the trainer's recipe for the
    convnets and ImageNet passes its own values (`keras_wt.app.config.RECIPE_MIRROR`), and the
    reference MLP's come from the published units (`keras_wt.app.published`).

    Args:
        learning_rate: `η`, the mirror learning rate (>= 0; required).
        noise_std: `σ`, the standard deviation of the noise (> 0; required).
        decay: `λ`, the mirror decay of `B` (>= 0; `B → (σ²/λ)·W` when `λ > 0`).
        every: mirror after every `every` training batches (`MirrorCallback`).
        steps: mirror steps each time (`MirrorCallback`).
        batch_size: `n`, noise samples per layer and step: an int, a `{key: n}` dict, a
            callable `layer -> n`, or `"auto"` (needs `decay > 0` and `η·λ < 2`): see
            `WeightMirror`.
        warmup_steps: mirror steps before the first training step (`MirrorCallback`), or
            `"auto"` (needs `decay > 0`): ten lags `1/(η·λ)` at `learning_rate` (`WARMUP_LAGS`),
            or three lags of the slowest layer (`WARMUP_SLOW_LAGS`, a layer slowed by
            `cap_policy="rate"`) if that is longer.
        noise_distribution: `"rademacher"` (the default: ±σ), `"normal"` or `"uniform"`, all of
            variance `σ²`. Rademacher noise is the cheapest to draw (one random bit per sample,
            no float transform) and, having the smallest fourth moment, leaves the smallest
            residual angle for a given noise batch (`mirror_fan_in`); BENCHMARKS.md and
            RESULTS.md measure both. Configs saved before this setting existed read as
            `"normal"`, the only noise then. The trainer's convnet recipe draws Rademacher
            noise too (its earlier runs drew normal noise, RESULTS.md).
        seed: integer seed of the noise.
        target_angle: for `batch_size="auto"`: the residual angle in degrees, in (0, 90).
        max_batch_size: for `batch_size="auto"`: the cap on a layer's noise batch (>= 1).
        cap_policy: for `batch_size="auto"`, what a layer that needs more than
            `max_batch_size` samples gives up: `"angle"` (it keeps `η` and settles at the
            larger residual angle of the capped batch, with a warning) or `"rate"` (its own
            `η_l < η`, the largest at which the capped batch reaches `target_angle`: the same
            angle at the cost of a longer lag `1/(η_l·λ)` behind a moving `W`).
        in_train_step: run the mirror steps inside the compiled training step
            (`MirrorCallback`).
        max_cost: for `batch_size="auto"`: a cap on what a mirror step costs, as a noise batch
            (> 0, or `None` for none): the layers' noise batches are capped at one common size,
            the largest at which their mean weighted by each layer's multiply-adds per sample
            is at most `max_cost` (`keras_wt.mirror.law.cost_cap`), on top of
            `max_batch_size`; a layer capped this way gives up what `cap_policy` says. A
            training step costs about `3·B` samples' products of every layer (`B` its batch)
            and a mirror step `2·n`, so `max_cost = 1.5·f·B` holds the mirror's products at a
            fraction `f` of the step's (what the trainer's recipe does,
            `keras_wt.app.config.TrainConfig.mirror_cost`).

    Raises:
        ValueError: a setting out of range, named with the value given.
    """

    learning_rate: float
    noise_std: float
    decay: float = 0.0
    every: int = 1
    steps: int = 1
    batch_size: object = 128
    warmup_steps: int = 0
    noise_distribution: str = "rademacher"
    seed: int = 0
    target_angle: float = 5.0
    max_batch_size: int = 4096
    cap_policy: str = "angle"
    in_train_step: bool = True
    max_cost: float = None

    def __post_init__(self):
        def setting(name, value):  # frozen: normalised values are set once, here
            object.__setattr__(self, name, value)

        if self.noise_distribution not in NOISE_DISTRIBUTIONS:
            raise ValueError(
                f"noise_distribution={self.noise_distribution!r} is not one of "
                f"{NOISE_DISTRIBUTIONS}"
            )
        for name, low, strict in (("learning_rate", 0, False), ("noise_std", 0, True),
                                  ("decay", 0, False)):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value)
                    and (value > low if strict else value >= low)):
                raise ValueError(
                    f"{name}={value!r} must be a finite number {'>' if strict else '>='} {low}"
                )
            setting(name, float(value))
        if self.cap_policy not in CAP_POLICIES:
            raise ValueError(f"cap_policy={self.cap_policy!r} is not one of {CAP_POLICIES}")
        for name, low in (("every", 1), ("steps", 1), ("warmup_steps", 0),
                          ("max_batch_size", 1)):
            value = getattr(self, name)
            if name == "warmup_steps" and value == AUTO:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                also = " or 'auto'" if name == "warmup_steps" else ""
                raise ValueError(f"{name}={value!r} must be an integer >= {low}{also}")
            setting(name, int(value))
        if self.max_cost is not None:
            if not (isinstance(self.max_cost, numbers.Real) and not isinstance(self.max_cost, bool)
                    and math.isfinite(self.max_cost) and self.max_cost > 0):
                raise ValueError(f"max_cost={self.max_cost!r} must be a finite number > 0 or None")
            setting("max_cost", float(self.max_cost))
        if not (isinstance(self.target_angle, numbers.Real) and 0 < self.target_angle < 90):
            raise ValueError(f"target_angle={self.target_angle!r} must be in (0, 90) degrees")
        setting("target_angle", float(self.target_angle))
        setting("seed", int(self.seed))
        setting("in_train_step", bool(self.in_train_step))
        setting("batch_size", check_batch_size(self.batch_size))
        if self.batch_size == AUTO or self.warmup_steps == AUTO:
            _check_fixed_point(self.learning_rate, self.decay)

    @classmethod
    def of(cls, config=None, **settings):
        """`config` (default: the defaults) with `settings` replaced: how `WeightMirror` and
        `MirrorCallback` turn their keyword arguments into one config. A setting given as `None`
        is not given."""
        settings = {k: v for k, v in settings.items() if v is not None}
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"{unknown} are not mirror settings: they are {sorted(names)}")
        if config is None:
            missing = [name for name in ("learning_rate", "noise_std") if name not in settings]
            if missing:
                raise ValueError(
                    f"The weight mirror needs {' and '.join(missing)} (its η and σ): give them, "
                    "or config=MirrorConfig(...)."
                )
            return cls(**settings)
        if not isinstance(config, cls):
            raise ValueError(f"config={config!r} is not a {cls.__name__}")
        return dataclasses.replace(config, **settings) if settings else config

    def get_config(self):
        """The settings as a JSON-able dict (a callable `batch_size` serialized by Keras)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        if isinstance(self.batch_size, collections.abc.Mapping):
            values["batch_size"] = {name: int(n) for name, n in self.batch_size.items()}
        elif callable(self.batch_size):
            values["batch_size"] = keras.saving.serialize_keras_object(self.batch_size)
        return values

    @classmethod
    def from_config(cls, values):
        """The inverse of `get_config`."""
        values = dict(values)
        # Saved before the setting existed, when the noise was always normal (issue #21 item 2).
        values.setdefault("noise_distribution", "normal")
        batch_size = values.get("batch_size")
        # A serialized callable, not a {layer_name: int} map (whose values are all ints).
        if isinstance(batch_size, dict) and isinstance(batch_size.get("class_name"), str):
            values["batch_size"] = keras.saving.deserialize_keras_object(batch_size)
        return cls(**values)


class MirrorSettings:
    """Reads the settings of `self.config` (a `MirrorConfig`) as attributes: `mirror.decay` is
    `mirror.config.decay`. They are set once, through the constructor."""

    def __getattr__(self, name):
        if name in _MIRROR_SETTINGS and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in _MIRROR_SETTINGS:
            raise AttributeError(
                f"{name} is a setting of the frozen MirrorConfig `config`: give it to the "
                "constructor"
            )
        super().__setattr__(name, value)


_MIRROR_SETTINGS = frozenset(field.name for field in dataclasses.fields(MirrorConfig))
