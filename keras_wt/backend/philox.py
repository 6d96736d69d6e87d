"""TensorFlow's stateless Philox random bits, computed with `jax.numpy` and `jax.lax` alone.

`bits(shape, seed)` equals, bit for bit, `keras_wt.backend.tensorflow.stateless_bits(shape,
seed)`, i.e. `tf.random.stateless_uniform(shape, seed, alg="philox", dtype=tf.int32,
minval=None, maxval=None)`; `fold_in(seed, data)` equals
`tf.random.experimental.stateless_fold_in(seed, data)`. So a JAX run can draw the very numbers
a TensorFlow run draws from the same seeds. Nothing here imports TensorFlow, and everything
works eagerly and under `jax.jit` with traced seeds and data.

What TensorFlow computes (its kernels, its XLA lowering and its Python wrapper
`random_ops_util._philox_scramble_seed` agree; tests/test_philox.py checks the result):

1. A seed is two int64 numbers `s0, s1`; their two's-complement words form the 128-bit Philox
   counter `(lo(s0), hi(s0), lo(s1), hi(s1))` (TensorFlow casts the seed to uint64, which
   sign-extends an int32 seed: an int32 seed and an int64 seed of the same values agree).
2. The seed is scrambled: one Philox-4x32-10 block of that counter under the fixed key
   `(0x3EC8F720, 0x02461E29)` gives `m0, m1, m2, m3`; the key becomes `(m0, m1)` and the
   counter `(0, 0, m2, m3)`.
3. Block `i` (0, 1, 2, ...) of the output is Philox-4x32-10 of the counter plus `i` (a 128-bit
   add: the low word is `i` itself below 2**32 blocks); each block gives four uint32 numbers,
   laid out in order, the last block cut to the output's size. A full-range int32 is the uint32
   reinterpreted; a full-range int64 (`fold_in` with int64 data) is `w0 | w1 << 32` of a
   block's first two words.

Seeds. JAX runs with 64-bit types disabled, so a traced seed is usually int32. A seed is one of

* shape `(2,)`, any integer dtype: the int64 seed of the same values. A signed 32-bit seed
  (int32) is sign-extended as TensorFlow extends it, so it is bit-identical to TensorFlow's
  int32 or int64 seeds in `[-2**31, 2**31)`; uint32 values stand for themselves
  (`[0, 2**32)`); 64-bit seeds (numpy arrays, Python ints, or JAX arrays with
  `jax_enable_x64`) cover the whole int64 range. A host value (Python ints, a list, a numpy
  array) is read at full precision before JAX could truncate it.
* shape `(2, 2)`, int32 or uint32: a "wide" seed, the words `[[lo(s0), hi(s0)], [lo(s1),
  hi(s1)]]` of any int64 pair, which traced code can carry without 64-bit types. `fold_in`
  with int64 data returns one; `to_int64` turns any seed into TensorFlow's int64 pair.

`fold_in` equals `stateless_fold_in` as TensorFlow's kernels (CPU, GPU) run it: its default
`alg="auto_select"` picks Philox there. Under XLA (`jit_compile=True`) TensorFlow's
auto-selection derives another seed (TF 2.21 on CPU); `stateless_fold_in(..., alg="philox")`
gives the same seed everywhere, the one `fold_in` here gives.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Philox-4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
# SC 2011): the round multipliers, the Weyl increments added to the key between rounds, and
# the number of rounds. The same constants as TensorFlow's `random::PhiloxRandom`.
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
_ROUNDS = 10

# The key TensorFlow scrambles a seed under (the uint64 0x02461E293EC8F720, low word first).
_SCRAMBLE_KEY = (0x3EC8F720, 0x02461E29)

_MASK16 = 0xFFFF
_MASK32 = 0xFFFFFFFF


def _u32(value):
    return np.uint32(value)


def _mul_hi_lo(a, multiplier):
    """The high and low uint32 words of the 64-bit product of the uint32 array `a` and the
    constant `multiplier`, without 64-bit types: from the four products of 16-bit halves,
    each of which fits in 32 bits."""
    m_lo, m_hi = _u32(multiplier & _MASK16), _u32(multiplier >> 16)
    a_lo, a_hi = a & _u32(_MASK16), a >> _u32(16)
    lo_lo = a_lo * m_lo
    lo_hi = a_lo * m_hi
    hi_lo = a_hi * m_lo
    hi_hi = a_hi * m_hi
    # Bits 16..47 of the product, before their carry into the high word: three terms below
    # 2**16 each, so no overflow.
    middle = (lo_lo >> _u32(16)) + (lo_hi & _u32(_MASK16)) + (hi_lo & _u32(_MASK16))
    high = hi_hi + (lo_hi >> _u32(16)) + (hi_lo >> _u32(16)) + (middle >> _u32(16))
    low = a * _u32(multiplier)  # uint32 multiplication wraps: the low word as it is
    return high, low


def _philox(counter, key):
    """One Philox-4x32-10 block per element: `counter` four uint32 arrays (broadcastable),
    `key` two uint32 scalars. Returns the four uint32 output words. The 10 rounds are unrolled
    (a Python loop over rounds, vectorized over the elements)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(_ROUNDS):
        if round_index:
            k0 = k0 + _u32(_KEY_INCREMENTS[0])
            k1 = k1 + _u32(_KEY_INCREMENTS[1])
        high0, low0 = _mul_hi_lo(c0, _MULTIPLIERS[0])
        high1, low1 = _mul_hi_lo(c2, _MULTIPLIERS[1])
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
    return c0, c1, c2, c3


def _words(x):
    """The low and high uint32 words of the int64 value(s) of the JAX integer array `x`:
    signed types sign-extended, unsigned ones zero-extended, 64-bit ones split (only with
    `jax_enable_x64`)."""
    dtype = jnp.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"seeds and data must be integers, got dtype {dtype}")
    if dtype.itemsize == 8:
        unsigned = x.astype(jnp.uint64) if dtype.kind == "i" else x
        return ((unsigned & _MASK32).astype(jnp.uint32),
                (unsigned >> 32).astype(jnp.uint32))
    if dtype.kind == "u":
        return x.astype(jnp.uint32), jnp.zeros(x.shape, jnp.uint32)
    signed = x.astype(jnp.int32)
    low = jax.lax.bitcast_convert_type(signed, jnp.uint32)
    high = jnp.where(signed < 0, _u32(_MASK32), _u32(0))
    return low, high


def _host_words(x):
    """`_words` of a host value (numpy), at full 64-bit precision, as uint32 numpy arrays."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"seeds and data must be integers, got dtype {x.dtype}")
    unsigned = x.astype(np.int64).astype(np.uint64) if x.dtype.kind == "i" else x.astype(
        np.uint64)
    return (unsigned & _MASK32).astype(np.uint32), (unsigned >> 32).astype(np.uint32)


def _is_host(x):
    """Whether `x` is a value on the host (numpy, Python ints, lists of them), which is read at
    64-bit precision, rather than a JAX array (perhaps traced)."""
    if isinstance(x, (list, tuple)):
        return all(_is_host(element) for element in x)
    return isinstance(x, (int, np.integer, np.ndarray))


def _seed_counter(seed):
    """The four uint32 counter words `(lo(s0), hi(s0), lo(s1), hi(s1))` of a seed of either
    form (see the module's docstring), as a JAX array of shape (4,)."""
    if _is_host(seed):
        array = np.asarray(seed)
        if array.shape == (2,):
            low, high = _host_words(array)
            return jnp.asarray(np.stack([low, high], axis=-1).reshape(4))
        if array.shape == (2, 2):
            if array.dtype.kind not in "iu":
                raise TypeError(f"a seed must be integers, got dtype {array.dtype}")
            # Each entry is a 32-bit word: its value modulo 2**32.
            return jnp.asarray(_host_words(array)[0].reshape(4))
        raise ValueError(f"a seed has shape (2,) or (2, 2), got {array.shape}")
    seed = jnp.asarray(seed)
    if seed.shape == (2,):
        low, high = _words(seed)
        return jnp.stack([low, high], axis=-1).reshape(4)
    if seed.shape == (2, 2):
        if jnp.dtype(seed.dtype) not in (jnp.dtype(jnp.int32), jnp.dtype(jnp.uint32)):
            raise TypeError(f"a (2, 2) seed holds int32 or uint32 words, got {seed.dtype}")
        return jax.lax.bitcast_convert_type(seed, jnp.uint32).reshape(4)
    raise ValueError(f"a seed has shape (2,) or (2, 2), got {seed.shape}")


def _key_and_counter(seed):
    """TensorFlow's scrambling of a seed: the Philox key (two uint32 words) and the high half
    of the counter (its low half is 0) that the draws from `seed` start at."""
    counter = _seed_counter(seed)
    mixed = _philox(tuple(counter[i] for i in range(4)),
                    tuple(jnp.asarray(word, jnp.uint32) for word in _SCRAMBLE_KEY))
    return (mixed[0], mixed[1]), (mixed[2], mixed[3])


def bits(shape, seed):
    """Int32 numbers of `shape` (a static sequence of ints), each of their 32 bits uniform:
    bit for bit `tf.random.stateless_uniform(shape, seed, alg="philox", dtype=tf.int32,
    minval=None, maxval=None)` (`keras_wt.backend.tensorflow.stateless_bits`), for the seeds
    the module's docstring lists (a traced int32 pair: TensorFlow's seeds in
    `[-2**31, 2**31)`; a wide `(2, 2)` seed: any int64 pair). `seed` may be traced."""
    shape = tuple(int(dim) for dim in shape)
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"at most 2**32 - 1 numbers per draw, asked for {size}")
    index, words = block_words(size, seed)
    lane = index & _u32(3)
    flat = jnp.where(lane == 0, words[0],
                     jnp.where(lane == 1, words[1], jnp.where(lane == 2, words[2], words[3])))
    return jax.lax.bitcast_convert_type(flat, jnp.int32).reshape(shape)


def block_words(size, seed):
    """`(index, words)`: `index` the uint32 numbers `0 … size − 1` of a draw from `seed`, and
    `words` the four uint32 words of the Philox block each number lies in (number `j` is word
    `j % 4` of block `j // 4`). For transforms that read several words of a block per output
    (Box–Muller reads two) and must stay one elementwise pass (see `bits`)."""
    key, (high0, high1) = _key_and_counter(seed)
    # Number j is word j % 4 of block j // 4, whose counter is (j // 4, 0, high0, high1): the
    # 128-bit counter plus the block index, whose low word is 0 before the add (the last block
    # is cut to the size). Each number computes its whole block and keeps one word: four
    # times the arithmetic of one pass over the blocks, but one elementwise loop. (Computing
    # the four words per block and interleaving them, a concatenation, made XLA's CPU fusion
    # recompute the rounds so often that it ran 300 times slower.)
    index = jnp.arange(size, dtype=jnp.uint32)
    return index, _philox((index >> _u32(2), jnp.zeros((), jnp.uint32), high0, high1), key)


def _data_dtype(data, dtype):
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise ValueError(f"fold_in's dtype is int32 or int64, got {dtype}")
        return dtype
    if isinstance(data, int):
        # As tf.convert_to_tensor types a Python int.
        return np.dtype(np.int32 if -(2**31) <= data < 2**31 else np.int64)
    data_dtype = np.dtype(data.dtype if hasattr(data, "dtype") else np.asarray(data).dtype)
    return np.dtype(np.int64 if data_dtype.itemsize == 8 else np.int32)


def fold_in(seed, data, dtype=None):
    """A new seed from `seed` and the integer scalar `data`:
    `tf.random.experimental.stateless_fold_in(seed, data)`, where `data` has the TensorFlow
    dtype `dtype` ("int32" or "int64"; `None`: `data`'s own, a Python int typed as
    `tf.convert_to_tensor` types it). TensorFlow's result is `[r, data]` with `r` the first
    full-range number of `data`'s dtype drawn from `seed` (its seed and dtype as `bits`).

    * int32: returns int32 `[r, data]` of shape (2,), equal to TensorFlow's (int32 `data`).
    * int64: returns the wide seed `[[lo(r), hi(r)], [lo(data), hi(data)]]` (int32 words,
      shape (2, 2); `to_int64` gives TensorFlow's int64 pair), since JAX without 64-bit types
      cannot hold `r`. A 32-bit `data` is sign-extended to int64 (uint32: zero-extended).

    Pass `dtype="int64"` where TensorFlow's `data` is int64 but JAX's is int32 (a cast to
    "int64" without `jax_enable_x64`: keras_wt's mirror folds `ops.cast(replica, "int64")`).
    `seed` and `data` may be traced; `dtype` is static. (TensorFlow's kernels choose Philox
    for `stateless_fold_in`'s default `alg`; its XLA lowering does not: module docstring.)"""
    dtype = _data_dtype(data, dtype)
    key, (high0, high1) = _key_and_counter(seed)
    zero = jnp.zeros((), jnp.uint32)
    first = _philox((zero, zero, high0, high1), key)  # block 0 of the draw from `seed`
    if _is_host(data):
        low, high = (jnp.asarray(word) for word in _host_words(data))
    else:
        low, high = _words(jnp.asarray(data))
    if low.shape != ():
        raise ValueError(f"fold_in's data is a scalar, got shape {low.shape}")
    if dtype == np.dtype(np.int32):
        folded = jnp.stack([first[0], low])
    else:
        folded = jnp.stack([jnp.stack([first[0], first[1]]), jnp.stack([low, high])])
    return jax.lax.bitcast_convert_type(folded, jnp.int32)


def to_int64(seed):
    """The int64 pair (a numpy array of shape (2,)) that `seed`, of either form and concrete
    (not traced), stands for: TensorFlow's seed of the same numbers."""
    words = np.asarray(_seed_counter(seed)).astype(np.uint64).reshape(2, 2)
    return (words[:, 0] | (words[:, 1] << np.uint64(32))).astype(np.int64)
