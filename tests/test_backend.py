"""The backend module: keras_wt refuses a Keras backend other than TensorFlow, with advice, and
each primitive of `keras_wt.backend` does what its docstring says (the math, where it has one)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_wt import backend
from keras_wt.backend import check_backend

SEED = np.array([7, 11], np.int64)


def test_tensorflow_backend_passes():
    assert check_backend() == "tensorflow"


@pytest.mark.parametrize("name", ["torch", "numpy"])
def test_a_backend_without_an_implementation_is_refused(monkeypatch, name):
    monkeypatch.setattr(keras.backend, "backend", lambda: name)
    monkeypatch.setenv("KERAS_BACKEND", name)
    with pytest.raises(ImportError, match=rf"backend='{name}'.*KERAS_BACKEND=tensorflow"):
        check_backend()


def test_jax_backend_passes(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert check_backend() == "jax"


# Gradients.


def test_custom_gradient_sends_its_own_gradient_and_none():
    @backend.custom_gradient
    def f(x, y):
        def grad(dy):
            return 3.0 * dy, None

        return backend.identity(x * 1.0), grad

    x, y = tf.constant([1.0, -2.0]), tf.constant([5.0, 5.0])
    with backend.gradient_tape() as tape:
        tape.watch([x, y])
        out = ops.sum(f(x, y) * tf.constant([1.0, 2.0]))
    dx, dy = tape.gradient(out, [x, y])
    np.testing.assert_array_equal(dx.numpy(), [3.0, 6.0])
    assert dy is None


def test_vjp_of_a_matmul_is_the_two_transposed_products():
    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (3, 2), (4, 2)))
    dx, dw = backend.vjp(ops.matmul, (tf.constant(x), tf.constant(w)), tf.constant(dy))
    np.testing.assert_allclose(dx.numpy(), dy @ w.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw.numpy(), x.T @ dy, rtol=1e-6, atol=1e-6)


def test_vjp_of_a_scalar_without_cotangent_is_its_gradient_and_none_where_unused():
    x, c = tf.constant([1.0, -3.0]), tf.constant(2.0)
    dx, dc = backend.vjp(lambda x, c: 0.5 * ops.sum(ops.square(x)), (x, c))
    np.testing.assert_array_equal(dx.numpy(), [1.0, -3.0])
    assert dc is None


def test_gradient_tape_gives_the_gradient_at_an_intermediate_tensor():
    x = tf.constant([1.0, 2.0])
    with backend.gradient_tape() as tape:
        tape.watch(x)
        h = 3.0 * x
        loss = ops.sum(ops.square(h))
    np.testing.assert_allclose(tape.gradient(loss, h).numpy(), [6.0, 12.0])


# Values and ordering.


def test_read_value_keeps_the_value_read_before_a_later_assignment():
    v = keras.Variable(1.0)

    @backend.function
    def read_then_assign():
        value = backend.read_value(v)
        v.assign(2.0)
        return value

    assert float(read_then_assign()) == 1.0 and float(v.numpy()) == 2.0
    t = tf.constant(4.0)
    assert backend.read_value(t) is t


def test_add_n_is_the_sum():
    parts = [tf.constant([1.0, 2.0]), tf.constant([0.5, -1.0]), tf.constant([0.25, 4.0])]
    np.testing.assert_array_equal(backend.add_n(parts).numpy(), [1.75, 5.0])


def test_after_and_barrier_and_control_dependencies_add_the_edges_only_in_a_graph():
    v = tf.Variable(0.0)
    x = tf.constant(5.0)
    assert backend.after([v.assign_add(1.0)], x) is x  # eagerly: program order
    assert backend.barrier([x], "b") == [] and backend.barrier([], "b") == []
    seen = {}

    @tf.function(autograph=False)
    def traced(x):
        update = v.assign_add(1.0)
        seen["after"] = backend.after([update], {"y": x})["y"]
        seen["barrier"] = backend.barrier([update], "done")
        with backend.control_dependencies(seen["barrier"]):
            seen["inside"] = backend.identity(x)
        return seen["after"]

    assert float(traced(x)) == 5.0
    assert seen["after"].op.control_inputs == [seen["barrier"][0].control_inputs[0]]
    assert seen["barrier"][0].name.startswith("done")
    assert seen["barrier"][0] in seen["inside"].op.control_inputs


# Tracing and compiling.


def test_in_graph_trace_key_and_eager_scope():
    assert not backend.in_graph()
    seen = []

    def probe():
        with backend.eager_scope():
            eager = ops.convert_to_tensor(1.0)
        seen.append((backend.in_graph(), backend.trace_key(), backend.trace_key(), eager))
        return eager + 1.0

    backend.function(probe)()
    backend.function(probe)()
    (inside, key, again, eager), (_, other, _, _) = seen
    assert inside and key is again and key is not other
    assert float(eager.numpy()) == 1.0  # computed eagerly, although the function was traced


def test_function_compiles_with_and_without_xla_to_the_same_result():
    x = tf.constant(np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4))
    plain = backend.function(lambda x: ops.sum(ops.tanh(x) * x, axis=1))(x)
    xla = backend.function(lambda x: ops.sum(ops.tanh(x) * x, axis=1), jit_compile=True)(x)
    np.testing.assert_allclose(plain.numpy(), xla.numpy(), rtol=1e-6)


def test_fori_loop_carries_state_and_runs_side_effects_once_per_step():
    v = tf.Variable(0, dtype=tf.int64)
    traces = []

    def steps(count):
        traces.append(count)
        total = backend.fori_loop(count, lambda i, total: total + i * i, tf.constant(0, tf.int64))
        backend.fori_loop(count, lambda i, state: (v.assign_add(i), state)[1])
        return total

    compiled = backend.function(steps)
    assert int(compiled(tf.constant(4, tf.int64))) == 0 + 1 + 4 + 9
    assert int(compiled(tf.constant(3, tf.int64))) == 0 + 1 + 4
    assert int(v.numpy()) == (0 + 1 + 2 + 3) + (0 + 1 + 2)
    assert len(traces) == 1  # one trace for every count


def test_kernel_errors_and_tensor_specs():
    with pytest.raises((ValueError, *backend.KERNEL_ERRORS)):
        ops.reshape(ops.zeros(6), (4,))  # 6 values into 4: refused by the kernel
    assert backend.is_tensor_spec(tf.TensorSpec((None, 3), tf.float32))
    assert not backend.is_tensor_spec(keras.KerasTensor((None, 3)))


# Stateless random numbers.


def _eager_and_xla(fn, *args):
    return fn(*args).numpy(), backend.function(fn, jit_compile=True)(*args).numpy()


def test_stateless_bits_and_fold_in_are_reproducible_and_the_same_under_xla():
    eager, xla = _eager_and_xla(lambda seed: backend.stateless_bits((1000,), seed), SEED)
    np.testing.assert_array_equal(eager, xla)
    assert eager.dtype == np.int32 and 0.45 < np.mean(eager < 0) < 0.55
    np.testing.assert_array_equal(eager, backend.stateless_bits((1000,), SEED).numpy())
    folded = [backend.fold_in(SEED, i).numpy() for i in (0, 1, 1)]
    np.testing.assert_array_equal(folded[1], folded[2])
    assert not np.array_equal(folded[0], folded[1]) and not np.array_equal(folded[0], SEED)
    np.testing.assert_array_equal(*_eager_and_xla(backend.fold_in, SEED, tf.constant(3)))


def test_stateless_normal_is_the_inverse_normal_cdf_of_23_bits_under_xla_too():
    eager, xla = _eager_and_xla(lambda seed: backend.stateless_normal((20000,), seed), SEED)
    # The same bits and map; XLA's erfinv and TensorFlow's CPU kernel's differ in the last bits.
    np.testing.assert_allclose(eager, xla, rtol=1e-5, atol=1e-6)
    bits = backend.stateless_bits((20000,), SEED).numpy()
    u = ((bits & 0x7FFFFF).astype(np.float64) + 0.5) / 2.0**23
    cdf = np.array([0.5 * (1.0 + math.erf(z / math.sqrt(2.0))) for z in eager.astype(np.float64)])
    np.testing.assert_allclose(cdf, u, atol=1e-5)  # Φ(x) = u
    assert abs(eager.mean()) < 0.03 and abs(eager.std() - 1.0) < 0.03


def test_stateless_uniform_rademacher_and_generator_normal():
    uniform = backend.stateless_uniform((20000,), SEED, -3.0, 1.0).numpy()
    assert uniform.min() >= -3.0 and uniform.max() < 1.0 and abs(uniform.mean() + 1.0) < 0.05
    eager, xla = _eager_and_xla(lambda seed: backend.stateless_rademacher((1000,), seed, 0.5), SEED)
    np.testing.assert_array_equal(eager, xla)
    bits = backend.stateless_bits((1000,), SEED).numpy()
    np.testing.assert_array_equal(eager, np.where(bits < 0, -0.5, 0.5).astype(np.float32))
    normal = backend.generator_normal((20000,), SEED, stddev=2.0).numpy()
    np.testing.assert_array_equal(normal, backend.generator_normal((20000,), SEED, 2.0).numpy())
    assert abs(normal.mean()) < 0.06 and abs(normal.std() - 2.0) < 0.06


# Distribution.


def test_replica_context_outside_any_strategy():
    assert backend.current_strategy() is tf.distribute.get_strategy()
    assert not backend.in_cross_replica_context()
    context = backend.replica_context()
    assert context.num_replicas_in_sync == 1
    assert not backend.is_multi_worker(backend.current_strategy())
    assert not backend.is_distributed_value(tf.constant(1.0))


def test_assign_on_every_replica_under_mirrored_strategy(two_cpu_strategy):
    strategy = two_cpu_strategy
    with strategy.scope():
        assert backend.current_strategy() is strategy and backend.in_cross_replica_context()
        assert backend.replica_context() is None
        v = keras.Variable(np.zeros(2, np.float32), aggregation="only_first_replica")

    def step():
        context = backend.replica_context()
        seen = (context.num_replicas_in_sync, context.replica_id_in_sync_group)
        total = context.all_reduce("sum", tf.constant([1.0, 2.0], tf.float64))
        backend.assign_on_every_replica(strategy, [v], [total])  # cast to float32
        return tf.constant(seen[0]), tf.cast(seen[1], tf.int32)

    counts, ids = strategy.run(tf.function(step, autograph=False))
    assert backend.is_distributed_value(ids)
    assert [int(i) for i in strategy.experimental_local_results(ids)] == [0, 1]
    assert [int(c) for c in strategy.experimental_local_results(counts)] == [2, 2]
    for replica in strategy.experimental_local_results(v.value):
        np.testing.assert_array_equal(replica.numpy(), [2.0, 4.0])
    assert not backend.is_multi_worker(strategy)
    merged = backend.merge_call(lambda s, a: (s is strategy, a + 1), strategy, 1)
    assert merged == (True, 2)
