"""The JAX implementation of keras_wt's backend interface (`keras_wt.backend`).

The names and contracts are those of `keras_wt.backend.tensorflow` (each docstring there says
what this module provides). What differs in kind:

* **Order by data.** Keras's JAX trainer runs a step as one pure function of the model's state
  (`stateless_call`, `stateless_apply`), so the ordering races that TensorFlow's graph executor
  needed control edges for cannot occur: `after`, `barrier` and `control_dependencies` do
  nothing, and `in_graph()` is `False` (no per-trace bookkeeping of `B`'s reads is needed).
* **No tape.** `gradient_tape` raises: `keras_wt.alignment` measures the deltas on JAX by
  differentiating with respect to zero probes added to the linear outputs instead.
* **Random numbers** are TensorFlow's: its stateless Philox-4x32-10 bits, written in JAX
  (`keras_wt.backend.philox`), and its float transforms, so a random rule (`brsf`, noise inputs)
  draws the same numbers from the same `[seed, counter]` on both backends (the erfinv and
  Box–Muller transforms to within a few ulp). Where TensorFlow folds int64 data into a seed
  (the mirror's replica index) JAX, without x64, folds int32: the mirror's noise is then other
  numbers of the same distribution.
* **One program, several devices.** Under `keras.distribution` the step is one SPMD program
  over the device mesh: there is one "replica", whose arrays XLA shards; the mirror's noise
  batch and its all-reduce are parts of that one program.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import keras

from keras_wt.backend import philox

# A step is a pure function of the state (`keras_wt.backend.tensorflow.STATELESS`): what a
# backward pass assigns is lost, and what the optimizer assigns is kept only for trainable
# variables. So the backward hooks of `keras_wt.layers` run at the end of the forward pass,
# and a Kolen–Pollack `B` is a trainable variable, which `KolenPollack` writes (copying `W`'s
# update; the wrapped optimizer never sees it).
STATELESS = True

# ---------------------------------------------------------------------------------------------
# Gradients.


def custom_gradient(fn):
    """`jax.custom_gradient`, with a `None` gradient sent as zeros (JAX needs one cotangent per
    argument). Side effects in `grad` run when the backward pass is traced."""

    @jax.custom_gradient
    def wrapped(*args):
        y, grad = fn(*args)

        def vjp(dy):
            grads = grad(dy)
            if not isinstance(grads, (tuple, list)):
                grads = (grads,)
            return tuple(
                jnp.zeros_like(arg) if g is None else g for arg, g in zip(args, grads)
            )

        return y, vjp

    return wrapped


def vjp(fn, primals, cotangent=None):
    """`jax.vjp`; with `cotangent=None` the output is a scalar and its gradient is taken."""
    primals = tuple(primals)
    output, pullback = jax.vjp(fn, *primals)
    if cotangent is None:
        cotangent = jnp.ones_like(output)
    return tuple(pullback(jnp.asarray(cotangent, output.dtype)))


def gradient_tape():
    raise NotImplementedError(
        "JAX has no gradient tape: differentiate a function instead (keras_wt.backend.vjp; "
        "keras_wt.alignment measures deltas on JAX with zero probes added to the linear "
        "outputs, keras_wt.feedback.tap_linear_outputs(probes=...))."
    )


# ---------------------------------------------------------------------------------------------
# Values and ordering.


def read_value(x):
    if isinstance(x, keras.Variable):
        return x.value
    return x


def add_n(tensors):
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total


def identity(x):
    return x


def after(dependencies, value):
    return value


def barrier(dependencies, name):
    return []


def control_dependencies(dependencies):
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Tracing and compiling.


def in_graph():
    return False


def trace_key():
    raise RuntimeError("trace_key() is only defined while in_graph(), never on JAX")


def eager_scope():
    return jax.ensure_compile_time_eval()


def function(fn, jit_compile=None):
    """`fn` as it is: a Keras variable is read through the `StatelessScope` of the step that
    calls it, which `jax.jit` of `fn` alone would not see; the caller's `jax.jit` (Keras's
    trainer) compiles it with the step."""
    return fn


def fori_loop(count, body, state=()):
    """`jax.lax.fori_loop` for a loop that carries state; a loop run for its side effects
    (variable assignments, which JAX's loops cannot hold) runs as a Python loop, so its `count`
    must be known (a Python int or a concrete array)."""
    if state == ():
        for i in range(int(count)):
            body(jnp.asarray(i, jnp.asarray(count).dtype), ())
        return ()
    count = jnp.asarray(count)
    return jax.lax.fori_loop(jnp.zeros([], count.dtype), count, body, state)


KERNEL_ERRORS = (TypeError,)


def is_tensor_spec(value):
    if isinstance(value, jax.ShapeDtypeStruct):
        return True
    # A tf.data pipeline's element spec (tf.data feeds JAX as it is): recognized by name, so
    # that this module does not import TensorFlow.
    return type(value).__name__ == "TensorSpec" and hasattr(value, "shape")


# ---------------------------------------------------------------------------------------------
# Stateless random numbers: TensorFlow's Philox bits (`keras_wt.backend.philox`), and its float
# transforms written out, so that both backends draw the same numbers from the same seeds.


def fold_in(seed, data):
    """TensorFlow's `stateless_fold_in(seed, data, alg="philox")` for int32 `data` (JAX holds
    int64 as int32 unless x64 is enabled, so int64 data folds as int32 data would: the same
    numbers as TensorFlow's for a fold-in of int32 data)."""
    return philox.fold_in(seed, data)


def stateless_bits(shape, seed):
    """TensorFlow's full-range int32 Philox numbers, bit for bit (seeds in [−2³¹, 2³¹))."""
    return philox.bits(tuple(shape), seed)


def _unit_float(bits):
    """TensorFlow's `Uint32ToFloat`: 23 random mantissa bits under exponent 0, minus 1, a float32
    uniform in `[0, 1)`."""
    mantissa = jnp.bitwise_or(jnp.bitwise_and(bits.astype(jnp.uint32), 0x7FFFFF), 0x3F800000)
    return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0


def stateless_normal(shape, seed):
    """`√2·erfinv(2u − 1)` of 23 bits each, as `keras_wt.backend.tensorflow.stateless_normal`
    (equal to TensorFlow's XLA kernel; to its own kernel within 2.2e-5, only where |x| > 3)."""
    bits = stateless_bits(shape, seed)
    u = (jnp.bitwise_and(bits, 0x7FFFFF).astype(jnp.float32) + 0.5) / float(1 << 23)
    return jnp.sqrt(2.0).astype(jnp.float32) * jax.scipy.special.erfinv(2.0 * u - 1.0)


def stateless_uniform(shape, seed, minval, maxval):
    """TensorFlow's `stateless_uniform` float32: `minval + (maxval − minval)·Uint32ToFloat`."""
    u = _unit_float(stateless_bits(shape, seed))
    return (minval + (maxval - minval) * u).astype(jnp.float32)


def stateless_rademacher(shape, seed, scale=1.0):
    return jnp.where(stateless_bits(shape, seed) < 0, -scale, scale).astype(jnp.float32)


def generator_normal(shape, seed, stddev=1.0):
    """TensorFlow's `stateless_normal` (Box–Muller on consecutive pairs of Philox words: word
    `2k` gives the radius `√(−2·log u)` (u at least 1e-7), word `2k + 1` the angle `2π·v`;
    number `2k` is `r·sin`, number `2k + 1` is `r·cos`), times `stddev`. Number `i` reads the
    two words of its pair from its own Philox block (`philox.block_words`): one elementwise
    pass (reading them from a drawn array of words made XLA recompute the rounds, 20x slower)."""
    shape = tuple(int(dim) for dim in shape)
    index, words = philox.block_words(math.prod(shape), seed)
    upper = (index & 2) != 0  # the pair is words 2, 3 of the block (else 0, 1)
    radius_word = jnp.where(upper, words[2], words[0])
    angle_word = jnp.where(upper, words[3], words[1])
    radius = jnp.sqrt(-2.0 * jnp.log(jnp.maximum(_unit_float(radius_word), 1.0e-7)))
    angle = 2.0 * jnp.float32(jnp.pi) * _unit_float(angle_word)
    numbers = jnp.where((index & 1) == 0, jnp.sin(angle), jnp.cos(angle)) * radius
    return (stddev * numbers).reshape(shape).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Distribution: `keras.distribution` runs one SPMD program, which is one replica here.


class _OneReplica:
    """The replica context, and the strategy, of a JAX step: one program (XLA shards it over
    the devices of a `keras.distribution`), so one replica, whose all-reduce is the identity."""

    num_replicas_in_sync = 1
    replica_id_in_sync_group = 0

    def all_reduce(self, reduction, values):
        return values

    def scope(self):
        return contextlib.nullcontext()

    def run(self, fn, args=(), kwargs=None):
        return fn(*args, **(kwargs or {}))


_ONE_REPLICA = _OneReplica()


def current_strategy():
    return _ONE_REPLICA


def replica_context():
    return _ONE_REPLICA


def in_cross_replica_context():
    return False


def merge_call(fn, strategy, *args):
    return fn(strategy, *args)


def assign_on_every_replica(strategy, variables, values):
    for variable, value in zip(variables, values):
        variable.assign(jnp.asarray(value).astype(variable.dtype))


def is_multi_worker(strategy):
    return False


def is_distributed_value(value):
    return False
