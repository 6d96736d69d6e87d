"""keras_wt.backend.philox draws TensorFlow's stateless Philox bits and folds seeds as
TensorFlow does, bit for bit, in JAX: compared here with TensorFlow in the same process, eagerly
and under `jax.jit` with traced seeds (whatever Keras backend the suite runs on)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from keras_wt.backend import philox
from keras_wt.backend import tensorflow as tf_backend

SHAPES = [(), (1,), (3,), (4,), (5, 7), (1000,), (0,), (2, 0, 3)]

# Int64 seeds that a JAX int32 pair holds (TensorFlow sign-extends an int32 seed).
INT32_SEEDS = [
    (0, 0),
    (1, 2),
    (-1, -5),
    (2**31 - 1, 2**31 - 1),
    (-(2**31), 0),
    (123456789, -987654321),
    (0, 2**31 - 1),
]
# Int64 seeds outside it: host values, wide (2, 2) seeds, or 64-bit JAX arrays.
WIDE_SEEDS = [
    (2**31, 0),
    (2**32, 1),
    (-(2**31) - 1, 5),
    (2**40 + 3, -(2**62) - 7),
    (2**63 - 1, -(2**63)),
]
INT32_DATA = [0, 1, 3, -1, 2**31 - 1, -(2**31)]
INT64_DATA = INT32_DATA + [2**31, 2**40 + 1, -(2**63)]

_jit_bits = jax.jit(philox.bits, static_argnums=0)
_jit_fold_in = jax.jit(philox.fold_in, static_argnums=2)


def tf_bits(shape, seed):
    """The reference: keras_wt's TensorFlow `stateless_bits`."""
    return tf_backend.stateless_bits(shape, seed).numpy()


def tf_fold_in(seed, data, dtype):
    return tf_backend.fold_in(tf.constant(seed, tf.int64), tf.constant(data, dtype)).numpy()


def wide(seed):
    """The (2, 2) int32 words of an int64 pair: [[lo, hi], [lo, hi]]."""
    return np.asarray(seed, np.int64).view(np.uint32).reshape(2, 2).view(np.int32)


def assert_same(actual, expected):
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("seed", INT32_SEEDS)
def test_bits_of_int32_seeds_equal_tensorflows(seed):
    for shape in SHAPES:
        expected = tf_bits(shape, tf.constant(seed, tf.int64))
        # TensorFlow's int32 seed of the same values draws the same bits (sign extension).
        assert_same(tf_bits(shape, tf.constant(seed, tf.int32)), expected)
        int32_seed = jnp.asarray(seed, jnp.int32)
        assert_same(philox.bits(shape, int32_seed), expected)
        assert_same(_jit_bits(shape, int32_seed), expected)
        assert_same(philox.bits(list(shape), seed), expected)  # host ints, list shape


@pytest.mark.parametrize("seed", WIDE_SEEDS)
def test_bits_of_any_int64_seed_equal_tensorflows(seed):
    for shape in [(), (3,), (5, 7), (1000,)]:
        expected = tf_bits(shape, tf.constant(seed, tf.int64))
        assert_same(philox.bits(shape, np.asarray(seed, np.int64)), expected)
        assert_same(philox.bits(shape, seed), expected)
        assert_same(philox.bits(shape, wide(seed)), expected)
        assert_same(_jit_bits(shape, jnp.asarray(wide(seed))), expected)
        np.testing.assert_array_equal(philox.to_int64(wide(seed)), seed)


def test_uint32_seeds_stand_for_their_values():
    seed = (2**32 - 1, 7)
    expected = tf_bits((9,), tf.constant(seed, tf.int64))
    assert_same(_jit_bits((9,), jnp.asarray(seed, jnp.uint32)), expected)


def test_64_bit_jax_seeds_and_data_with_x64_enabled():
    with jax.enable_x64(True):
        bits = jax.jit(philox.bits, static_argnums=0)
        fold_in = jax.jit(philox.fold_in)
        for seed in INT32_SEEDS[:3] + WIDE_SEEDS:
            assert_same(bits((11,), jnp.asarray(seed, jnp.int64)),
                        tf_bits((11,), tf.constant(seed, tf.int64)))
            for data in (-1, 2**40 + 1):
                folded = fold_in(jnp.asarray(seed, jnp.int64), jnp.asarray(data, jnp.int64))
                assert_same(philox.to_int64(folded), tf_fold_in(seed, data, tf.int64))


@pytest.mark.parametrize("seed", INT32_SEEDS[:4] + WIDE_SEEDS[-2:])
def test_fold_in_int32_data_equals_tensorflows(seed):
    """As `keras_wt.layers.base` folds a replica's int32 index into an int64 seed."""
    for data in INT32_DATA:
        expected = tf_fold_in(seed, data, tf.int32)
        # TensorFlow's int32 seed of the same values folds the same.
        if seed in INT32_SEEDS:
            assert_same(tf_backend.fold_in(tf.constant(seed, tf.int32),
                                           tf.constant(data, tf.int32)).numpy(), expected)
            traced_seed = jnp.asarray(seed, jnp.int32)
        else:
            traced_seed = jnp.asarray(wide(seed))
        assert_same(philox.fold_in(seed, jnp.asarray(data, jnp.int32)), expected)
        assert_same(philox.fold_in(seed, np.int32(data)), expected)
        assert_same(_jit_fold_in(traced_seed, jnp.asarray(data, jnp.int32), None), expected)
        assert_same(_jit_fold_in(traced_seed, jnp.asarray(data, jnp.int32), "int32"), expected)
        # The folded seed draws TensorFlow's bits from its folded seed.
        assert_same(_jit_bits((5, 7), jnp.asarray(expected)), tf_bits((5, 7), expected))


@pytest.mark.parametrize("seed", INT32_SEEDS[:4] + WIDE_SEEDS[-2:])
def test_fold_in_int64_data_equals_tensorflows(seed):
    """As `keras_wt.mirror.core` folds `ops.cast(replica, "int64")` into an int64 seed: JAX
    without 64-bit types holds that cast as int32, so the caller says `dtype="int64"`."""
    traced_seed = jnp.asarray(seed, jnp.int32) if seed in INT32_SEEDS else jnp.asarray(wide(seed))
    for data in INT64_DATA:
        expected = tf_fold_in(seed, data, tf.int64)
        folded = philox.fold_in(seed, np.int64(data))  # a host int64: int64 inferred
        assert folded.shape == (2, 2) and folded.dtype == jnp.int32
        assert_same(philox.to_int64(folded), expected)
        if -(2**31) <= data < 2**31:  # traced data beyond int32 would need 64-bit types
            traced = _jit_fold_in(traced_seed, jnp.asarray(data, jnp.int32), "int64")
            assert_same(philox.to_int64(traced), expected)
        else:
            traced = folded
        # A wide folded seed draws TensorFlow's bits, and folds again as TensorFlow does.
        assert_same(_jit_bits((1000,), traced), tf_bits((1000,), expected))
        again = _jit_fold_in(traced, jnp.asarray(2, jnp.int32), "int64")
        assert_same(philox.to_int64(again), tf_fold_in(expected, 2, tf.int64))


def test_fold_in_types_python_ints_as_tensorflow_does():
    seed = (1, 2)
    for data in (3, -7, 2**31, 2**40):
        expected = tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), data)
        folded = philox.fold_in(seed, data)
        actual = folded if folded.shape == (2,) else philox.to_int64(folded)
        assert_same(actual, expected.numpy())
    # The example of TensorFlow's documentation.
    assert_same(philox.fold_in(jnp.asarray([1, 2]), 3), np.asarray([1105988140, 3], np.int32))


def test_the_reference_draws_the_same_bits_under_xla():
    """TensorFlow's XLA kernels draw what its own kernels draw (what the JAX bits equal).
    Its `fold_in` under XLA does so only with `alg="philox"`: with its default
    `alg="auto_select"` (`keras_wt.backend.tensorflow.fold_in`), XLA on CPU derives another
    seed (TF 2.21) than its kernels, which choose Philox and which `philox.fold_in` equals."""
    seed = tf.constant([123456789, -987654321], tf.int64)
    xla_bits = tf.function(tf_backend.stateless_bits, jit_compile=True)
    for shape in [(5, 7), (1000,)]:
        np.testing.assert_array_equal(xla_bits(shape, seed).numpy(), tf_bits(shape, seed))
    # (XLA takes int32 seeds only.)
    int32_seed = tf.cast(seed, tf.int32)
    xla_fold_in = tf.function(
        lambda seed, data: tf.random.experimental.stateless_fold_in(seed, data, alg="philox"),
        jit_compile=True)
    expected = tf_backend.fold_in(int32_seed, tf.constant(5, tf.int32)).numpy()
    np.testing.assert_array_equal(xla_fold_in(int32_seed, tf.constant(5, tf.int32)).numpy(),
                                  expected)
    assert_same(philox.fold_in(jnp.asarray([123456789, -987654321], jnp.int32), 5), expected)


def _normal(bits):
    """`keras_wt.backend.tensorflow.stateless_normal`'s transform, in JAX: 23 bits to
    `u ∈ (0, 1)`, then `√2·erfinv(2u − 1)`."""
    u = ((bits & 0x7FFFFF).astype(jnp.float32) + 0.5) / float(1 << 23)
    return math.sqrt(2.0) * jax.scipy.special.erfinv(2.0 * u - 1.0)


def test_the_erfinv_normal_from_philox_bits_nearly_equals_tensorflows():
    """The same bits give the same normals up to erfinv's float32 rounding. Measured (TF 2.21,
    jax 0.10, CPU) over all 2**23 inputs of the transform: JAX's erfinv equals TensorFlow's
    under XLA exactly (both are XLA's ErfInv), and differs from TensorFlow's own kernel by at
    most 2.2e-5 (92 ulp, relative 5.9e-6) in the tails (|x| > 3; below 3 at most 2.2e-6). So
    `stateless_normal` itself differs by as much between TensorFlow's kernel and XLA."""
    seed = tf.constant([3, 4], tf.int64)
    expected = tf_backend.stateless_normal((100000,), seed).numpy()
    actual = np.asarray(jax.jit(lambda s: _normal(philox.bits((100000,), s)))(
        jnp.asarray([3, 4], jnp.int32)))
    assert np.abs(actual - expected).max() <= 3e-5

    every_input = np.arange(1 << 23, dtype=np.int32)
    jax_normals = np.asarray(jax.jit(_normal)(every_input))
    # `stateless_normal`'s transform, applied to every input, by TensorFlow's kernels and XLA.
    bits = tf.constant(every_input)
    u = (tf.cast(tf.bitwise.bitwise_and(bits, 0x7FFFFF), tf.float32) + 0.5) / float(1 << 23)
    eager = (math.sqrt(2.0) * tf.math.erfinv(2.0 * u - 1.0)).numpy()
    xla = tf.function(lambda u: math.sqrt(2.0) * tf.math.erfinv(2.0 * u - 1.0),
                      jit_compile=True)(u).numpy()
    difference = np.abs(jax_normals - eager)
    assert difference.max() <= 3e-5
    assert difference[np.abs(eager) < 3].max() <= 3e-6
    assert np.abs(jax_normals - xla).max() <= 1e-6


def test_bits_are_one_elementwise_pass():
    """A draw of 64000 numbers takes well under a second (an interleaving of per-block words
    once took XLA's CPU fusion 0.1 s per call: see `bits`)."""
    import time

    seed = jnp.asarray([1, 2], jnp.int32)
    _jit_bits((64000,), seed).block_until_ready()
    start = time.perf_counter()
    for _ in range(10):
        _jit_bits((64000,), seed).block_until_ready()
    assert (time.perf_counter() - start) / 10 < 0.05


@pytest.mark.parametrize("seed", [(1, 2), (123456, 7), (-5, 99)])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (1000,), (0,)])
def test_the_jax_backends_float_transforms_equal_tensorflows(seed, shape):
    """`keras_wt.backend.jax`'s uniform and generator normal (TensorFlow's `Uint32ToFloat`
    and Box–Muller over the same Philox words) against TensorFlow's own kernels."""
    from keras_wt.backend import jax as jax_backend

    jax_seed = jnp.asarray(seed, jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(jax_backend.stateless_uniform(shape, jax_seed, -2.0, 3.0)),
        tf.random.stateless_uniform(shape, seed, minval=-2.0, maxval=3.0, alg="philox").numpy(),
    )
    np.testing.assert_allclose(
        np.asarray(jax_backend.generator_normal(shape, jax_seed, 0.7)),
        tf.random.stateless_normal(shape, seed, stddev=0.7, alg="philox").numpy(),
        rtol=0, atol=2e-6,  # sin, cos and log: a few ulp apart
    )
    np.testing.assert_array_equal(
        np.asarray(jax_backend.stateless_rademacher(shape, jax_seed, 0.5)),
        tf_backend.stateless_rademacher(shape, tf.constant(seed, tf.int64), 0.5).numpy(),
    )
