"""The TensorFlow implementation of keras_wt's backend interface (`keras_wt.backend`).

Each function's docstring says what it does here and what an implementation for another
Keras backend (JAX) must provide under the same name. "Tensor" means a tensor of the backend;
"traced" means: while a function is being compiled (`tf.function` here, `jax.jit` there).
"""

import math

import tensorflow as tf

# The stateless generator of every random draw (Philox: counter-based, the same integer bits on
# TensorFlow's CPU and GPU kernels and under XLA).
_ALGORITHM = "philox"

# Whether a training step is one pure function of the model's state, whose variables change
# only where the forward pass (non-trainable variables) or the optimizer (trainable and
# optimizer variables) assigns them (Keras's JAX trainer), rather than a graph whose every
# assignment sticks, the backward pass's included (TensorFlow).
STATELESS = False

# ---------------------------------------------------------------------------------------------
# Gradients.


def custom_gradient(fn):
    """Decorator: `fn(*tensors)` returns `(y, grad)`, with `grad(dy)` returning one gradient per
    argument of `fn` (`None`: none). The decorated function computes `y` and, in the backward
    pass, sends `grad(dy)` to the arguments instead of their own gradients.

    `grad` may have side effects that run once per backward pass being built (`tf.function`) or
    run (eagerly). A JAX version wraps `jax.custom_vjp` (`y` and what `grad` closes over become
    residuals; a `None` gradient becomes zeros); side effects in `grad` need a callback there.
    """
    return tf.custom_gradient(fn)


def vjp(fn, primals, cotangent=None):
    """The vector-Jacobian product of `fn` at `primals`: the gradients, with respect to each
    tensor of the tuple `primals`, of `fn(*primals)` weighted by `cotangent` (a tensor of the
    output's shape; `None`: `fn` returns a scalar, whose plain gradient is taken). Returns a
    tuple, `None` where the output does not depend on a primal (a JAX version may return
    zeros). What `fn` closes over is held constant only where the caller stops its gradient.
    """
    primals = tuple(primals)
    with tf.GradientTape() as tape:
        for primal in primals:
            tape.watch(primal)
        output = fn(*primals)
    return tuple(tape.gradient(output, list(primals), output_gradients=cotangent))


def gradient_tape():
    """A context recording an eager computation, whose `.gradient(target, sources)` gives the
    gradients of `target` with respect to `sources` (variables, or tensors computed inside it:
    the linear outputs `keras_wt.alignment` measures deltas at). Eager measurements only. JAX
    has no tape: a JAX version of the measurement differentiates a function of zero probes
    added to those outputs instead (as the recurrent twins already do for split kernels)."""
    return tf.GradientTape()


# ---------------------------------------------------------------------------------------------
# Values and ordering.


def read_value(x):
    """`x` as a tensor: a variable (Keras's `x.value`, autocast where Keras autocasts it) read
    now, so that what is computed from it uses this value even if the variable is assigned later
    in the same traced function; a tensor as it is. (`keras.ops.convert_to_tensor` returns a
    TensorFlow variable as it is.) A JAX version returns `x.value` for a variable, else `x`."""
    return tf.convert_to_tensor(x)


def add_n(tensors):
    """The sum of the tensors of the list `tensors` (one shape and dtype), as one op (`tf.add_n`).
    Under XLA a chain of `+` compiles (fuses) differently and changes the last bits of what is
    computed around it; this keeps the graph, and results, as they were. A JAX version sums them
    left to right."""
    return tf.add_n(tensors)


def identity(x):
    """A new tensor equal to `x`: a point where gradients meet (TensorFlow sums the gradients of
    a tensor's uses there) and the fresh output `tf.custom_gradient` needs. A JAX version returns
    `x`."""
    return tf.identity(x)


def after(dependencies, value):
    """`value` (a tensor or a structure of tensors), computed after every one of
    `dependencies` (tensors or ops) in the function being traced; `value` itself when there is
    nothing to wait for or nothing is traced (eager code runs in program order). A JAX version
    orders by data (e.g. `jax.lax.optimization_barrier` over both) or returns `value`."""
    if not dependencies or not tf.inside_function():
        return value
    with tf.control_dependencies(dependencies):
        return tf.nest.map_structure(tf.identity, value)


def barrier(dependencies, name):
    """`[op]`: one op that runs after every one of `dependencies` (tensors, `IndexedSlices` or
    ops), for `control_dependencies`: whatever waits for the barrier waits for all of them
    through one control edge each, not one per dependency. `[]` when there is nothing to wait
    for or no function is traced. A JAX version returns `[]` (JAX orders by data)."""
    if not dependencies or not tf.inside_function():
        return []
    with tf.control_dependencies(dependencies):
        return [tf.no_op(name=name)]


def control_dependencies(dependencies):
    """Context manager: the ops created inside it run after `dependencies` (in the function
    being traced; eagerly, a no-op). A JAX version is a null context (order by data)."""
    return tf.control_dependencies(dependencies)


# ---------------------------------------------------------------------------------------------
# Tracing and compiling.


def in_graph():
    """Whether a function is being traced (`tf.function`), rather than run eagerly."""
    return tf.inside_function()


def trace_key():
    """A hashable, weak-referenceable object identifying the function being traced (its
    graph), for state kept per traced function and forgotten with it. Only while
    `in_graph()`. A JAX version returns an object of the current trace."""
    return tf.compat.v1.get_default_graph()


def eager_scope():
    """Context manager: the ops inside it run eagerly now, even while a function is traced
    (computations on constants only). A JAX version is `jax.ensure_compile_time_eval()`."""
    return tf.init_scope()


def function(fn, jit_compile=None):
    """`fn` compiled: traced once per input signature, then run as one graph (`tf.function`;
    `jit_compile=True`: with XLA, `None`: as the caller's function is). Its Python loops over
    tensors are not converted: use `fori_loop`. A JAX version is `jax.jit` (with the variables
    made explicit, as Keras's JAX trainer does)."""
    return tf.function(fn, jit_compile=jit_compile, autograph=False)


def fori_loop(count, body, state=()):
    """`state = body(i, state)` for `i = 0, …, count − 1` (`i` a tensor of `count`'s dtype),
    as one loop of the function being traced, so that `count` may be a tensor and the function
    is traced once for any count; returns the final `state` (a structure of tensors, `()` for
    a loop run for its side effects, such as variable assignments). A JAX version is
    `jax.lax.fori_loop`."""
    count = tf.convert_to_tensor(count)
    _, state = tf.while_loop(
        lambda i, _: i < count,
        lambda i, state: (i + 1, body(i, state)),
        (tf.zeros([], count.dtype), state),
    )
    return state


# The errors a kernel raises on inputs it rejects (e.g. a convolution window wider than its
# input), besides `ValueError`. A JAX version lists its own (e.g. `TypeError`).
KERNEL_ERRORS = (tf.errors.OpError,)


def is_tensor_spec(value):
    """Whether `value` describes a tensor's shape and dtype (`tf.TensorSpec`, as a
    `tf.data.Dataset`'s `element_spec` holds; `.shape` and `.dtype`). A JAX version recognizes
    `jax.ShapeDtypeStruct`."""
    return isinstance(value, tf.TensorSpec)


# ---------------------------------------------------------------------------------------------
# Stateless random numbers. `seed` is a pair of int64 (a tensor of shape (2,)); the same seed
# gives the same numbers, eagerly and under XLA.


def fold_in(seed, data):
    """A new seed derived from `seed` and the integer `data` (a replica's index, say)."""
    return tf.random.experimental.stateless_fold_in(seed, data)


def stateless_bits(shape, seed):
    """Int32 numbers of `shape`, each of its 32 bits uniform, from Philox: the bits every other
    distribution here is made from, identical on TensorFlow's kernels and under XLA. A JAX
    version must give the same bits for the same seed (Philox-4x32-10, TensorFlow's counter
    layout) for runs to agree across backends, or document that they do not."""
    return tf.random.stateless_uniform(
        shape, seed=seed, alg=_ALGORITHM, dtype=tf.int32, minval=None, maxval=None
    )


def stateless_normal(shape, seed):
    """Standard normal float32 numbers of `shape`, the same with and without XLA: Philox's
    integer bits agree between TensorFlow's kernels and XLA (its floats do not), so 23 of them
    are mapped to `u ∈ (0, 1)` and to `√2·erfinv(2u − 1)` here."""
    bits = stateless_bits(shape, seed)
    u = (tf.cast(tf.bitwise.bitwise_and(bits, 0x7FFFFF), tf.float32) + 0.5) / float(1 << 23)
    return math.sqrt(2.0) * tf.math.erfinv(2.0 * u - 1.0)


def stateless_uniform(shape, seed, minval, maxval):
    """Float32 numbers of `shape`, uniform in `[minval, maxval)`, from Philox (TensorFlow's own
    float transform: it may differ in the last bit between its kernels and XLA)."""
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, alg=_ALGORITHM)


def stateless_rademacher(shape, seed, scale=1.0):
    """Float32 numbers of `shape`, `±scale` with equal probability: the sign of one number of
    `stateless_bits` each (no float transform: the same everywhere)."""
    return tf.where(stateless_bits(shape, seed) < 0, -scale, scale)


def generator_normal(shape, seed, stddev=1.0):
    """Normal float32 numbers of `shape`, mean 0, from Philox through TensorFlow's own float
    transform (`tf.random.stateless_normal`: its results differ between TensorFlow's kernels
    and XLA; `stateless_normal` does not)."""
    return tf.random.stateless_normal(shape, seed, stddev=stddev, alg=_ALGORITHM)


# ---------------------------------------------------------------------------------------------
# Distribution (`tf.distribute` here; `keras.distribution` for a JAX version).


def current_strategy():
    """The distribution strategy in scope (the default one, a single device, when none is)."""
    return tf.distribute.get_strategy()


def replica_context():
    """The replica context being run (`None` in the cross-replica context): an object with
    `num_replicas_in_sync`, `replica_id_in_sync_group` (an int32 tensor or int) and
    `all_reduce("sum", values)`, also what identifies the replica a function is traced for."""
    return tf.distribute.get_replica_context()


def in_cross_replica_context():
    """Whether code runs in a strategy's cross-replica context (not inside `strategy.run`)."""
    return tf.distribute.in_cross_replica_context()


def merge_call(fn, strategy, *args):
    """Runs `fn(strategy, *args)` in the cross-replica context, from a replica context or from
    outside any.

    The public `ReplicaContext.merge_call` fails outside a replica context; Keras's own
    optimizers use this same internal (`tf.__internal__.distribute.interim.maybe_merge_call`)
    for their variable updates. A JAX version calls `fn(strategy, *args)`.
    """
    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)


def assign_on_every_replica(strategy, variables, values):
    """Assigns `values` to `variables` on every replica, each replica its own value (which the
    callers compute identically: the Kolen–Pollack update and the all-reduced mirror step),
    cast to each variable's dtype. A JAX version assigns them."""

    def update(distribution, variables, values):
        for variable, value in zip(variables, values):
            distribution.extended.update(
                variable.value,
                lambda var, val: var.assign(tf.cast(val, var.dtype)),
                args=(value,),
                group=False,
            )

    merge_call(update, strategy, variables, values)


def is_multi_worker(strategy):
    """Whether `strategy` spans several worker processes (the test Keras's trainer uses)."""
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def is_distributed_value(value):
    """Whether `value` holds one value per replica (`tf.distribute.DistributedValues`)."""
    return isinstance(value, tf.distribute.DistributedValues)
