"""The weight mirror's noise: its distributions, their fourth moments, and `draw_noise`."""

import math

from keras_wt import backend

NOISE_DISTRIBUTIONS = ("normal", "uniform", "rademacher")
# κ = E[x⁴]/σ⁴ of each noise distribution (enters the residual-angle law: `mirror_fan_in`).
NOISE_KURTOSIS = {"normal": 3.0, "uniform": 1.8, "rademacher": 1.0}


def noise_kurtosis(noise_distribution):
    """`κ = E[x⁴]/σ⁴` of `noise_distribution`: 3 (normal), 1.8 (uniform), 1 (Rademacher)."""
    if noise_distribution not in NOISE_KURTOSIS:
        raise ValueError(
            f"noise_distribution={noise_distribution!r} is not one of {NOISE_DISTRIBUTIONS}"
        )
    return NOISE_KURTOSIS[noise_distribution]


def draw_noise(shape, seed, noise_distribution, noise_std):
    """Float32 noise of `shape`, mean 0 and standard deviation `noise_std`, from the stateless
    seed `seed` (two int64s): `"normal"`, `"uniform"` (`U(−σ√3, σ√3)`) or `"rademacher"` (`±σ`,
    the sign of one random int32 per sample: no float transform of the generator's output)."""
    # Philox throughout (the backend's generator): XLA's default on CPU (ThreeFry) draws ~30x
    # slower.
    if noise_distribution == "normal":
        return backend.generator_normal(shape, seed, stddev=noise_std)
    if noise_distribution == "rademacher":
        return backend.stateless_rademacher(shape, seed, scale=noise_std)
    limit = noise_std * math.sqrt(3.0)
    return backend.stateless_uniform(shape, seed, minval=-limit, maxval=limit)
