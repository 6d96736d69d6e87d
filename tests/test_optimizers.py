"""Kolen–Pollack: B − W shrinks by exactly (1 − lr_t·λ) at every step, for any optimizer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from keras_wt import layers as wt
from keras_wt.optimizers import KolenPollack

X = np.random.RandomState(0).randn(96, 6).astype("float32")
Y = np.random.RandomState(1).randint(0, 3, 96)
BATCH = 16  # 6 steps per epoch


def _kp_model(conv=False):
    if conv:
        return keras.Sequential(
            [
                keras.Input((6, 1)),
                wt.Conv1D(4, 3, padding="same", activation="relu", feedback="kp"),
                keras.layers.Flatten(),
                wt.Dense(3, feedback="kp"),
            ]
        )
    return keras.Sequential(
        [
            keras.Input((6,)),
            wt.Dense(8, activation="relu", feedback="kp"),
            wt.Dense(8, activation="tanh", feedback="kp"),
            wt.Dense(3, feedback="kp"),
        ]
    )


def _differences(model):
    return [
        layer.feedback_kernel.numpy() - layer.kernel.numpy()
        for layer in keras_wt.layers.feedback_layers(model)
    ]


class _RecordDifferences(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.history = [_differences(self.model)]

    def on_train_batch_end(self, batch, logs=None):
        self.history.append(_differences(self.model))


def _check_invariant(history, learning_rates, weight_decay):
    assert len(history) == len(learning_rates) + 1 >= 4
    for step, lr in enumerate(learning_rates):
        for before, after in zip(history[step], history[step + 1]):
            np.testing.assert_allclose(after, (1 - lr * weight_decay) * before, rtol=0, atol=2e-6)
    # The difference really shrank, and it was not negligible to begin with.
    assert np.abs(history[0][0]).max() > 0.1
    total = np.prod([1 - lr * weight_decay for lr in learning_rates])
    np.testing.assert_allclose(history[-1][0], total * history[0][0], atol=5e-6)


def _fit_and_check(make_optimizer, learning_rates, weight_decay, conv=False, jit_compile=False, strategy=None):
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        model = _kp_model(conv)
        model.compile(
            KolenPollack(make_optimizer(), weight_decay=weight_decay),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
    record = _RecordDifferences()
    x = X[..., None] if conv else X
    model.fit(x, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    _check_invariant(record.history, learning_rates, weight_decay)
    return model


def test_sgd_with_momentum():
    _fit_and_check(lambda: keras.optimizers.SGD(0.1, momentum=0.9), [0.1] * 6, weight_decay=0.5)


def test_adam_with_a_learning_rate_schedule():
    schedule = lambda: keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.8)
    lrs = [0.05 * 0.8**t for t in range(6)]
    _fit_and_check(lambda: keras.optimizers.Adam(schedule()), lrs, weight_decay=2.0, conv=True)


def test_without_decay_b_minus_w_is_constant():
    _fit_and_check(lambda: keras.optimizers.SGD(0.2, momentum=0.5), [0.2] * 6, weight_decay=0.0)


def test_under_xla():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.02])
    lrs = [0.1, 0.1, 0.1, 0.02, 0.02, 0.02]
    _fit_and_check(lambda: keras.optimizers.SGD(schedule, momentum=0.9), lrs, weight_decay=1.0, jit_compile=True)


def test_under_mirrored_strategy_replicas_agree(two_cpu_strategy):
    model = _fit_and_check(
        lambda: keras.optimizers.Adam(0.05), [0.05] * 6, weight_decay=1.0, strategy=two_cpu_strategy
    )
    for layer in keras_wt.layers.feedback_layers(model):
        for variable in (layer.kernel, layer.feedback_kernel):
            replicas = two_cpu_strategy.experimental_local_results(variable.value)
            assert len(replicas) == 2
            np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())


def test_under_mirrored_strategy_with_xla_per_replica(two_cpu_strategy):
    """Keras cannot jit-compile `fit` under MirroredStrategy (keras-team/keras#19005, stock
    models too); a TPU compiles each replica's step, which this custom loop mirrors."""
    with two_cpu_strategy.scope():
        model = _kp_model()
        optimizer = KolenPollack(keras.optimizers.SGD(0.1, momentum=0.9), weight_decay=0.5)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    @tf.function(jit_compile=True)
    def gradients(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) / (2 * BATCH)
        return tape.gradient(loss, model.trainable_variables)

    def replica_step(x, y):
        optimizer.apply(gradients(x, y), model.trainable_variables)

    @tf.function
    def step(x, y):
        two_cpu_strategy.run(replica_step, args=(x, y))

    data = two_cpu_strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((X, Y)).batch(2 * BATCH)  # 3 global steps
    )
    history = [_differences(model)]
    for x, y in data:
        step(x, y)
        history.append(_differences(model))
    _check_invariant(history, [0.1] * 3, weight_decay=0.5)
    for layer in keras_wt.layers.feedback_layers(model):
        replicas = two_cpu_strategy.experimental_local_results(layer.feedback_kernel.value)
        np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())


def test_kp_model_with_another_optimizer_fails_loudly():
    model = _kp_model()
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    w0 = model.layers[0].kernel.numpy()
    with pytest.raises(ValueError, match="KolenPollack"):
        model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), w0)


def test_kp_model_with_another_optimizer_fails_in_a_custom_loop():
    model = _kp_model()
    optimizer = keras.optimizers.Adam()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(X))
    grads = tape.gradient(loss, model.trainable_variables)
    with pytest.raises(ValueError, match="feedback='kp'"):
        optimizer.apply(grads, model.trainable_variables)


def test_only_kp_kernels_are_decayed_and_biases_are_not():
    model = keras.Sequential(
        [keras.Input((6,)), wt.Dense(4, feedback="kp"), wt.Dense(3, feedback="fa")]
    )
    optimizer = KolenPollack(keras.optimizers.SGD(0.1), weight_decay=0.5)
    optimizer.build(model.trainable_variables)
    assert [(w.path, b.path) for w, b in optimizer.kp_pairs] == [
        (model.layers[0].kernel.path, model.layers[0].feedback_kernel.path)
    ]
    before = [v.numpy() for v in model.trainable_variables]
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    optimizer.apply(zeros, model.trainable_variables)
    after = [v.numpy() for v in model.trainable_variables]
    np.testing.assert_allclose(after[0], before[0] * 0.95, rtol=1e-6)  # kp kernel decays
    np.testing.assert_array_equal(after[1], before[1])  # bias does not
    np.testing.assert_array_equal(after[2], before[2])  # fa kernel does not


def test_wrapped_optimizer_with_its_own_weight_decay_is_refused():
    with pytest.raises(ValueError, match="weight_decay"):
        KolenPollack(keras.optimizers.AdamW(weight_decay=0.01))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        KolenPollack(keras.optimizers.SGD(gradient_accumulation_steps=2))


def test_serializes_with_the_model(tmp_path):
    model = _kp_model()
    model.compile(
        KolenPollack(keras.optimizers.SGD(0.1, momentum=0.9), weight_decay=0.25),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    # Its state is the wrapped optimizer's (plus its own counters), never the model's W or B.
    model_variables = {id(v) for v in model.weights}
    assert not any(id(v) in model_variables for v in model.optimizer.variables)
    inner = model.optimizer.inner_optimizer
    assert len(model.optimizer.variables) == len(model.optimizer._variables) + len(inner.variables)
    path = tmp_path / "kp.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, KolenPollack)
    assert loaded.optimizer.kp_weight_decay == 0.25
    assert isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.SGD)
    assert int(loaded.optimizer.iterations.numpy()) == 6
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Both continue identically.
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    loaded.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_policies(policy):
    """mixed_float16 wraps the KP optimizer in Keras's LossScaleOptimizer; the invariant holds."""
    keras.mixed_precision.set_global_policy(policy)
    _fit_and_check(lambda: keras.optimizers.SGD(0.1, momentum=0.9), [0.1] * 6, weight_decay=0.5)


def _ancestors(op):
    """Every op `op` depends on, through data and control edges."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_every_update_of_w_waits_for_b_minus_w(weight_decay):
    """`B − W` must be computed before W changes. Ordering W's *reads* first is not enough: a read
    may alias W's buffer, which the wrapped optimizer updates in place; without an explicit edge
    the subtraction sometimes ran after the update under CPU load and B skipped the step (runs
    then differed from one another). Checked on the traced train step: every op that writes a
    kp kernel depends on the subtractions."""
    model = keras.Sequential([keras.Input((4,)), wt.Dense(3, feedback="kp"),
                              wt.Dense(2, feedback="kp")])
    optimizer = KolenPollack(keras.optimizers.SGD(0.1, momentum=0.9), weight_decay=weight_decay)
    model.compile(optimizer, "mse")
    optimizer.build(model.trainable_variables)
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    graph = tf.function(model.train_step).get_concrete_function((tf.constant(x), tf.constant(y))).graph
    differences = [op for op in graph.get_operations()
                   if op.name.startswith("kp_difference/") and op.type == "Sub"]
    assert len(differences) == 2
    captured = {id(external): internal.op.name for external, internal in graph.captures}
    kernel_handles = {captured[id(w.value.handle)] for w, _ in optimizer.kp_pairs}
    writes = [op for op in graph.get_operations()
              if op.type in ("AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp")
              and op.inputs[0].op.name in kernel_handles]
    assert writes, "no update of a kp kernel found in the graph"
    for write in writes:
        assert set(differences) <= _ancestors(write), write.name


def test_plain_float16_policy():
    """Under the "float16" policy W, B and the update are float16: the step runs, and B − W
    shrinks by (1 − lr·λ) per step up to float16's rounding (it cast lr·λ to float32 before)."""
    keras.mixed_precision.set_global_policy("float16")
    model = _kp_model(False)
    model.compile(KolenPollack(keras.optimizers.SGD(0.1), weight_decay=0.5),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    record = _RecordDifferences()
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    assert model.layers[0].feedback_kernel.dtype == "float16"
    for before, after in zip(record.history, record.history[1:]):
        for b, a in zip(before, after):
            scale = np.abs(b.astype(np.float32)).max()
            np.testing.assert_allclose(a.astype(np.float32), 0.95 * b.astype(np.float32),
                                       rtol=0, atol=4e-3 * scale)


def test_wrapped_optimizer_with_use_ema_is_refused():
    with pytest.raises(ValueError, match="use_ema=True"):
        KolenPollack(keras.optimizers.SGD(0.1, use_ema=True))


def _train_step_graph(model, optimizer, input_shape):
    """The graph of `model`'s training step, traced as `fit` traces it."""
    model.compile(optimizer, "mse")
    optimizer.build(model.trainable_variables)
    x = tf.ones((4,) + input_shape)
    y = tf.zeros((4,) + tuple(model.output_shape[1:]))
    return tf.function(model.train_step).get_concrete_function((x, y)).graph


def _graph_size(depth, feedback):
    """`(ops, control edges)` of the training step of a chain of `depth` Dense layers."""
    model = keras.Sequential(
        [keras.Input((4,))] + [wt.Dense(4, feedback=feedback) for _ in range(depth)]
    )
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    if feedback == "kp":
        optimizer = KolenPollack(optimizer, weight_decay=0.1)
    graph = _train_step_graph(model, optimizer, (4,))
    operations = graph.get_operations()
    return len(operations), sum(len(op.control_inputs) for op in operations)


def test_the_kp_training_step_graph_grows_linearly_with_depth():
    """Every ordering edge of the KP update goes through one barrier after the gradients and one
    after the differences: the graph grows by a fixed number of ops and control edges per layer.
    (An edge from every gradient to every op of the update made it quadratic: 2,944, 10,992 and
    42,448 control edges at depths 8, 16 and 32, and the first `fit` of a 150-convolution chain
    5x fa's.) Counted in the traced graph, not timed."""
    depths = (8, 16, 32)
    sizes = {feedback: [_graph_size(depth, feedback) for depth in depths] for feedback in ("fa", "kp")}

    def per_layer(sizes, which):
        # The growth per added layer between depths 8 → 16 and 16 → 32.
        return [(sizes[i + 1][which] - sizes[i][which]) / (depths[i + 1] - depths[i]) for i in range(2)]

    for which in (0, 1):  # ops, control edges
        kp, fa = per_layer(sizes["kp"], which), per_layer(sizes["fa"], which)
        assert kp[1] <= 1.05 * kp[0], (which, sizes["kp"])  # quadratic growth doubles it
        assert kp[1] <= 4 * fa[1], (which, sizes)


def test_kp_keeps_the_models_feedback_pairs_found_without_attributes_on_variables():
    """KolenPollack is given variables, not a model: it finds the kp kernels, at any depth, and
    their layers through the registry the layers write at build (`keras_wt.learners`); nothing
    is written onto a variable."""
    inner = keras.Sequential([keras.Input((5, 6)), wt.Dense(6, feedback="kp", name="inner")])
    inputs = keras.Input((5, 6))
    h = wt.MultiHeadAttention(2, 3, feedback="kp", name="att")(inner(inputs), inputs)
    h = wt.Dense(4, feedback="fa", name="fa")(h)
    model = keras.Model(inputs, wt.Dense(3, feedback="kp", name="top")(h))
    optimizer = KolenPollack(keras.optimizers.SGD(0.1), weight_decay=0.1)
    optimizer.build(model.trainable_variables)
    expected = [pair for key, pair in keras_wt.feedback_pairs(model).items() if key != "fa"]
    assert len(expected) == 6
    assert [(w.path, b.path) for w, b in optimizer.kp_pairs] == [(w.path, b.path) for w, b in expected]
    assert all(a is w and c is b for (a, c), (w, b) in zip(optimizer.kp_pairs, expected))
    assert not [v.path for v in model.weights if any(k.startswith("_keras_wt") for k in vars(v))]


@pytest.mark.parametrize("feedback", [None, "fa", "ss"])
def test_kolen_pollack_refuses_a_model_without_kp_layers(feedback):
    """A model with no kp layer (stock, or another rule) would train as the wrapped optimizer
    trains it, without a word: KolenPollack refuses it at its first update and says to convert
    the model. Building it on such variables is allowed: Keras does when it clones or loads a
    model compiled with it (`keras_wt.strip` of a trained kp model)."""
    dense = keras.layers.Dense if feedback is None else (lambda n: wt.Dense(n, feedback=feedback))
    model = keras.Sequential([keras.Input((6,)), dense(4), dense(3)])
    optimizer = KolenPollack(keras.optimizers.SGD(0.1))
    optimizer.build(model.trainable_variables)  # as Keras builds it when cloning or loading
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"none is the kernel of a layer with feedback='kp'.*"
                                         r"keras_wt\.convert\(model, 'kp'\)"):
        optimizer.apply(zeros, model.trainable_variables)
    model.compile(KolenPollack(keras.optimizers.SGD(0.1)), "mse")
    weights = [w.numpy() for w in model.weights]
    with pytest.raises(ValueError, match="convert"):
        model.fit(X, np.zeros((96, 3), "float32"), batch_size=BATCH, epochs=1, verbose=0)
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(after.numpy(), before)


def test_a_trained_kp_model_strips_and_its_stock_copy_is_refused_by_kolen_pollack():
    """`strip` of a trained kp model gives the same outputs and no KolenPollack (the copy is
    left uncompiled, so the file loads without keras_wt); compiling the stock copy with
    KolenPollack is refused at its first update."""
    model = _kp_model()
    model.compile(KolenPollack(keras.optimizers.SGD(0.1)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
    stripped = keras_wt.strip(model)
    np.testing.assert_array_equal(stripped(X), model(X))
    assert not isinstance(getattr(stripped, "optimizer", None), KolenPollack)
    stripped.compile(KolenPollack(keras.optimizers.SGD(0.1)),
                     keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="convert"):
        stripped.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0)
