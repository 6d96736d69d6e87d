"""Learning-rate schedules and the SGD recipe of the trainer.

* `WarmupSchedule`, `learning_rate_schedule`: a peak rate (for ImageNet 0.1 per 256 images,
  scaled linearly with the global batch), a linear warm-up, then a constant rate, a step decay
  (x0.1 at epochs 30, 60, 80) or a cosine decay to 0.
* `decoupled_weight_decay`: the decoupled decay equivalent to an L2 coefficient under momentum.
* `create_optimizer`: SGD with momentum and decoupled weight decay of the kernels only; for an
  algorithm whose `B` learns through the optimizer (`kp`) the same decay of `W` and `B` through
  `keras_wt.optimizers.KolenPollack`.
* `OptimizerConfig`: every setting of the schedule and the optimizer, defined, defaulted and
  checked in one place; it builds both.

Weight decay has two strengths in keras_wt, each under its own name: `l2` (also of the
`keras_wt.models` ResNets; and `create_optimizer`'s `weight_decay`) is the conventional coupled L2
coefficient, added to the gradient as `l2·W`; `decoupled_decay` `λ` (Keras's optimizers' and
`KolenPollack`'s `weight_decay`) shrinks `W` by `lr·λ·W` per step, outside the momentum.
"""

import dataclasses
import logging
import math
import numbers

import keras

from keras_wt import algorithms
from keras_wt import optimizers as optimizers_lib

SCHEDULES = ("constant", "step", "cosine")
logger = logging.getLogger("keras_wt")

# Variables that are never decayed: biases, batch-norm scale and offset. Feedback kernels are not
# trainable (the optimizer never sees them); the name is listed so that this stays true if a
# model ever makes them trainable.
NO_WEIGHT_DECAY = ("bias", "gamma", "beta", "feedback_kernel")


def peak_learning_rate(batch_size, lr_per_256=0.1):
    """`lr_per_256 · batch_size / 256`: the linear scaling rule of Goyal et al. (2017)."""
    return lr_per_256 * batch_size / 256.0


@keras.saving.register_keras_serializable(package="keras_wt")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up to `peak_learning_rate`, then a step or cosine decay.

    At step `t` (0-based, the number of updates already made):

    * `t < warmup_steps`: `peak · (t + 1) / warmup_steps`;
    * `"constant"`: `peak`;
    * `"step"`: `peak · decay_rate^k`, `k` the number of `boundaries` that are `<= t`;
    * `"cosine"`: `peak · ½(1 + cos(π·p))`, `p = (t − warmup_steps) / (total_steps −
      warmup_steps)` clipped to `[0, 1]`.

    Args:
        peak_learning_rate: the learning rate at the end of the warm-up.
        warmup_steps: steps of linear warm-up (0: none).
        decay: `"constant"`, `"step"` or `"cosine"`.
        boundaries: for `"step"`: the steps at which the rate is multiplied by `decay_rate`.
        decay_rate: for `"step"`.
        total_steps: for `"cosine"`: the step at which the rate reaches 0.
    """

    def __init__(
        self,
        peak_learning_rate,
        warmup_steps=0,
        decay="step",
        boundaries=(),
        decay_rate=0.1,
        total_steps=None,
    ):
        if decay not in SCHEDULES:
            raise ValueError(f"decay={decay!r} is not one of {SCHEDULES}")
        if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError(
                f"A cosine decay needs total_steps > warmup_steps; got total_steps={total_steps}"
                f", warmup_steps={warmup_steps}."
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.boundaries = tuple(int(b) for b in boundaries)
        self.decay_rate = float(decay_rate)
        self.total_steps = None if total_steps is None else int(total_steps)

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        peak = ops.convert_to_tensor(self.peak_learning_rate, "float32")
        if self.decay == "constant":
            decayed = peak
        elif self.decay == "step":
            k = ops.zeros((), "float32")
            for boundary in self.boundaries:
                k += ops.cast(step >= boundary, "float32")
            decayed = peak * ops.power(ops.convert_to_tensor(self.decay_rate, "float32"), k)
        else:
            span = float(self.total_steps - self.warmup_steps)
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            decayed = 0.5 * peak * (1.0 + ops.cos(math.pi * progress))
        if not self.warmup_steps:
            return decayed
        warmup = peak * (step + 1.0) / float(self.warmup_steps)
        return ops.where(step < self.warmup_steps, warmup, decayed)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "boundaries": list(self.boundaries),
            "decay_rate": self.decay_rate,
            "total_steps": self.total_steps,
        }


def learning_rate_schedule(
    learning_rate,
    steps_per_epoch,
    epochs,
    schedule="step",
    warmup_epochs=5,
    decay_epochs=(30, 60, 80),
    decay_rate=0.1,
):
    """`learning_rate` after `warmup_epochs` of linear warm-up, then constant (`"constant"`),
    ×`decay_rate` at each of `decay_epochs` (`"step"`, the ImageNet schedule) or a cosine to 0
    at `epochs` (`"cosine"`). Epochs may be fractional; they are converted to steps. A constant
    rate without warm-up is returned as the float itself."""
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if schedule == "constant" and not warmup_steps:
        return float(learning_rate)
    return WarmupSchedule(
        learning_rate,
        warmup_steps=warmup_steps,
        decay=schedule,
        boundaries=[int(round(e * steps_per_epoch)) for e in decay_epochs],
        decay_rate=decay_rate,
        total_steps=int(round(epochs * steps_per_epoch)) if schedule == "cosine" else None,
    )


def decay_for_budget(schedule, total_steps, budget):
    """The decoupled decay `λ` for which `Σ_t lr_t·λ = budget` over `total_steps` steps of
    `schedule` (a float or a `LearningRateSchedule`).

    Kolen–Pollack's `B − W` shrinks by `Π_t (1 − lr_t·λ) ≈ exp(−Σ_t lr_t·λ)` over a run, so the
    budget, not `λ` itself, says how far `B` has come to `W` at the end (5: to 0.7 % of the
    initial difference), whatever the length of the run and the schedule.
    """
    if callable(schedule):
        rates = schedule(keras.ops.arange(total_steps, dtype="int32"))
        total, peak = float(keras.ops.sum(rates)), float(keras.ops.max(rates))
    else:
        total, peak = float(schedule) * total_steps, float(schedule)
    decay = budget / total
    if peak * decay >= 1:
        raise ValueError(
            f"A decay budget of {budget} over {total_steps} steps needs λ = {decay:.3g}, and "
            f"lr·λ = {peak * decay:.3g} >= 1 at the peak learning rate: the run is too short for "
            "that budget. Give the decay itself, or train longer."
        )
    return decay


def decoupled_weight_decay(weight_decay, momentum):
    """The decoupled decay `λ` (`W ← W − lr·λ·W` per step) equivalent to an L2 coefficient.

    The usual ImageNet recipe (`weight_decay=1e-4`, He et al.; the TPU and torchvision
    references) adds `weight_decay·W` to the gradient, which SGD's momentum then accumulates:
    the steady-state shrinkage per step is `lr·weight_decay / (1 − momentum)`. Keras's
    `SGD(weight_decay=λ)` and `KolenPollack(weight_decay=λ)` apply `lr·λ·W` directly, without
    momentum, so the same strength needs `λ = weight_decay / (1 − momentum)` (1e-3 for the
    recipe's 1e-4 with momentum 0.9).
    """
    if weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(
            f"Need weight_decay >= 0 and 0 <= momentum < 1; got weight_decay={weight_decay}, "
            f"momentum={momentum}."
        )
    return weight_decay / (1.0 - momentum)


def create_optimizer(feedback, learning_rate, momentum=0.9, weight_decay=1e-4, nesterov=False):
    """SGD with momentum and weight decay of the kernels only, for the algorithm `feedback`.

    `weight_decay` is the conventional L2 coefficient; it is applied as the decoupled decay
    `decoupled_weight_decay(weight_decay, momentum)` (see there).

    * `"kp"`: `KolenPollack(SGD(...), weight_decay=λ)`: the kernel `W` and the feedback kernel `B`
      of every `kp` layer get identical updates and the identical decay; biases and batch norm
      are not decayed. (Every Dense and convolution of a `keras_wt.models` network is a `kp`
      layer; the kernels of other layers would not be decayed.)
    * otherwise: `SGD(..., weight_decay=λ)` decaying every variable except biases and batch-norm
      `gamma`/`beta` (`NO_WEIGHT_DECAY`).

    Args:
        feedback: one of `keras_wt.ALGORITHMS`.
        learning_rate: a float or a `LearningRateSchedule`.
        momentum: SGD momentum.
        weight_decay: the L2 coefficient (0 for none).
        nesterov: Nesterov momentum.
    """
    return sgd(feedback, learning_rate, momentum=momentum,
               decoupled_decay=decoupled_weight_decay(weight_decay, momentum), nesterov=nesterov)


def sgd(feedback, learning_rate, momentum=0.9, decoupled_decay=0.0, nesterov=False):
    """`create_optimizer` with the decoupled decay `λ` itself (`W ← W − lr·λ·W` per step, no
    conversion): `KolenPollack(SGD(...), weight_decay=λ)` for an algorithm whose `B` learns
    through the optimizer, else `SGD(..., weight_decay=λ)` excluding `NO_WEIGHT_DECAY`."""
    decay = decoupled_decay
    if algorithms.get(feedback).learns_feedback == algorithms.Learning.OPTIMIZER:
        sgd = keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov)
        return optimizers_lib.KolenPollack(sgd, weight_decay=decay)
    optimizer = keras.optimizers.SGD(
        learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=decay or None
    )
    if decay:
        optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return optimizer


def _check(name, value, ok, allowed, optional=False):
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
        raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The schedule and the optimizer of a run: SGD with momentum, a learning-rate schedule and
    one decay of the kernels (see the module docstring for the two strengths of decay).

    Args:
        learning_rate: the peak learning rate (after the warm-up), > 0 (required).
        schedule: `"constant"`, `"step"` (×`decay_rate` at each of `decay_epochs`) or
            `"cosine"` (to 0 at the last epoch) (`learning_rate_schedule`).
        warmup_epochs: epochs of linear warm-up (may be fractional), >= 0.
        decay_epochs: for `"step"`: the epochs of the decays.
        decay_rate: for `"step"`: the factor of each decay.
        momentum: SGD momentum, in [0, 1).
        nesterov: Nesterov momentum.
        l2: the coupled L2 coefficient of the kernels (conventional: He et al.'s 1e-4), applied
            as the equivalent decoupled decay `l2 / (1 − momentum)` (`decoupled_weight_decay`).
        decoupled_decay: `λ` itself, applied as is (for `kp`: Kolen–Pollack's decay of `W` and
            `B`), instead of `l2`.
        kp_decay_budget: for an algorithm whose `B` learns through the optimizer (`kp`): the
            decoupled `λ` for which `Σ_t lr_t·λ` over the run is this budget
            (`decay_for_budget`), instead of `l2` or `decoupled_decay`; other algorithms get no
            decay.

    Raises:
        ValueError: a setting out of range, or more than one of `l2`, `decoupled_decay` and
            `kp_decay_budget`.
    """

    learning_rate: float
    schedule: str = "step"
    warmup_epochs: float = 5.0
    decay_epochs: tuple = (30, 60, 80)
    decay_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    l2: float = 1e-4
    decoupled_decay: float = None
    kp_decay_budget: float = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        finite = math.isfinite
        _check("learning_rate", self.learning_rate, lambda v: finite(v) and v > 0,
               "a finite number > 0")
        _check("momentum", self.momentum, lambda v: 0 <= v < 1, "a number in [0, 1)")
        _check("decay_rate", self.decay_rate, lambda v: finite(v) and v > 0, "a finite number > 0")
        for name in ("warmup_epochs", "l2"):
            _check(name, getattr(self, name), lambda v: finite(v) and v >= 0,
                   "a finite number >= 0")
        _check("decoupled_decay", self.decoupled_decay, lambda v: finite(v) and v >= 0,
               "a finite number >= 0 (or None: from l2)", optional=True)
        _check("kp_decay_budget", self.kp_decay_budget, lambda v: finite(v) and v > 0,
               "a finite number > 0 (or None)", optional=True)
        object.__setattr__(self, "decay_epochs", tuple(self.decay_epochs))
        for epoch in self.decay_epochs:
            _check("decay_epochs", epoch, lambda v: finite(v) and v >= 0, "numbers >= 0")
        given = ["l2"] if self.l2 else []
        given += [name for name in ("decoupled_decay", "kp_decay_budget")
                  if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(
                f"{' and '.join(f'{n}={getattr(self, n)!r}' for n in given)}: these are "
                "alternative ways to give one decay of the kernels; give one (l2=0 and "
                "the others None)."
            )

    def learning_rate_schedule(self, steps_per_epoch, epochs):
        """The schedule over `epochs` epochs of `steps_per_epoch` steps (a float when
        constant without warm-up; `learning_rate_schedule`)."""
        return learning_rate_schedule(
            self.learning_rate, steps_per_epoch, epochs, schedule=self.schedule,
            warmup_epochs=self.warmup_epochs, decay_epochs=self.decay_epochs,
            decay_rate=self.decay_rate,
        )

    def decoupled_decay_for(self, feedback, schedule, total_steps):
        """The decoupled `λ` the optimizer applies for the algorithm `feedback` over
        `total_steps` steps of `schedule`."""
        if self.kp_decay_budget is not None:
            if algorithms.get(feedback).learns_feedback != algorithms.Learning.OPTIMIZER:
                return 0.0
            decay = decay_for_budget(schedule, total_steps, self.kp_decay_budget)
            logger.info("Kolen-Pollack decay λ = %.4g (Σ lr·λ = %g over the run)", decay,
                        self.kp_decay_budget)
            return decay
        if self.decoupled_decay is not None:
            return float(self.decoupled_decay)
        return decoupled_weight_decay(self.l2, self.momentum)

    def create(self, feedback, steps_per_epoch, epochs):
        """`(optimizer, schedule)` for the algorithm `feedback` over `epochs` epochs of
        `steps_per_epoch` optimizer steps (`sgd`)."""
        schedule = self.learning_rate_schedule(steps_per_epoch, epochs)
        decay = self.decoupled_decay_for(feedback, schedule, epochs * steps_per_epoch)
        optimizer = sgd(feedback, schedule, momentum=self.momentum, decoupled_decay=decay,
                        nesterov=self.nesterov)
        return optimizer, schedule
