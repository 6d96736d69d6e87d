"""Recurrent twins: SimpleRNN, LSTM, GRU, ConvLSTM and their cells, feedback on both kernels.

The error crosses the input kernel as `dx_t = dz_t·B_inᵀ` and time as `dh_{t−1} = dz_t·B_recᵀ`
(through the gate pre-activations `z_t`); the gates, the carry and the weight gradients are
exact. Checked against a reimplementation of the stock step math whose matmuls send their input
gradient through `B` (`_fb_matmul`, the test's own substitution), by hand for one SimpleRNN step,
against the stock layers bit for bit with `bp`, and with `B := W` against backprop; then every
rule of the registry, Kolen–Pollack's invariant and the mirror's fixed point on both kernels,
saving, `convert`/`strip`, the wrappers, XLA and two replicas.
"""

import functools
import json
import math
import runpy
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from keras_wt import layers as wt
from keras_wt.algorithms import Learning
from keras_wt.alignment import angle, delta_angles, effective_feedback, weight_angles
from keras_wt.mirror import WeightMirror, mirror_fan_in, residual_angle
from keras_wt.optimizers import KolenPollack
from conftest import assert_allclose

RNG = np.random.RandomState(0)
X = RNG.randn(4, 3, 5).astype("float32")  # (batch, time, features)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# (id, stock class, twin class, kwargs)
LAYERS = [
    ("simple_rnn", keras.layers.SimpleRNN, wt.SimpleRNN, dict(dropout=0.3, recurrent_dropout=0.2)),
    ("lstm", keras.layers.LSTM, wt.LSTM, dict(dropout=0.3, return_state=True)),
    ("lstm_impl1", keras.layers.LSTM, wt.LSTM,
     dict(dropout=0.3, recurrent_dropout=0.2, go_backwards=True, return_sequences=True)),
    ("lstm_unroll", keras.layers.LSTM, wt.LSTM,
     dict(unroll=True, use_bias=False, return_sequences=True)),
    ("gru", keras.layers.GRU, wt.GRU, dict(dropout=0.3, recurrent_dropout=0.2, return_state=True)),
    ("gru_reset_before", keras.layers.GRU, wt.GRU,
     dict(reset_after=False, dropout=0.3, return_sequences=True)),
    ("gru_reset_before_impl1", keras.layers.GRU, wt.GRU,
     dict(reset_after=False, implementation=1, use_bias=False)),
]
CONV_X = RNG.randn(2, 3, 6, 2).astype("float32")  # (batch, time, width, channels)
CONV_LAYERS = [
    ("conv_lstm1d", keras.layers.ConvLSTM1D, wt.ConvLSTM1D, CONV_X.shape,
     dict(padding="same", dropout=0.3, recurrent_dropout=0.2, return_sequences=True)),
    ("conv_lstm2d", keras.layers.ConvLSTM2D, wt.ConvLSTM2D, (2, 3, 2, 5, 4),
     dict(strides=2, data_format="channels_first", return_state=True)),
    ("conv_lstm3d", keras.layers.ConvLSTM3D, wt.ConvLSTM3D, (2, 2, 3, 4, 3, 1), dict(use_bias=False)),
]


def _pair(stock_class, twin_class, units=6, shape=X.shape, feedback="bp", args=(), **kwargs):
    """A twin and a stock layer with the same weights (the twin's)."""
    twin = twin_class(units, *args, feedback=feedback, seed=3, **kwargs)
    twin.build(shape)
    stock = stock_class(units, *args, seed=3, **kwargs)
    stock.build(shape)
    assert [w.shape for w in wt.stock_weights(twin)] == [w.shape for w in stock.weights]
    for target, source in zip(stock.weights, wt.stock_weights(twin)):
        target.assign(source)
    return twin, stock


def _grads(layer, x, mask=None, training=True):
    """Outputs, then the gradients of `Σ outputs²` (every output) wrt x and the stock weights."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = layer(x, training=training, mask=mask)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        loss = tf.add_n([tf.reduce_sum(o * o) for o in outputs])
    grads = tape.gradient(loss, [x] + wt.stock_weights(layer))
    assert all(g is not None for g in grads)
    return outputs + grads


def test_forward_and_bp_gradients_are_bit_for_bit_the_stock_layer():
    """Every stock option the cell sees (both implementations, dropout and recurrent dropout
    masks, reset_after, use_bias, masking, go_backwards, unroll, return_sequences/state, stateful,
    mixed precision) and the ConvLSTM layers: outputs, input gradient and weight gradients equal the
    stock layer's bit for bit, eagerly and in a compiled function (where `fit` runs)."""
    x = tf.constant(X)
    mask = tf.constant(np.array([[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1]], bool))
    for name, stock_class, twin_class, kwargs in LAYERS:
        twin, stock = _pair(stock_class, twin_class, **kwargs)
        assert not getattr(twin, "use_cudnn", False)
        for a, b in zip(_grads(twin, x, mask), _grads(stock, x, mask)):
            np.testing.assert_array_equal(a, b, err_msg=name)
        if name in ("lstm_impl1", "gru_reset_before"):
            compiled = [tf.function(functools.partial(_grads, layer)) for layer in (twin, stock)]
            for a, b in zip(compiled[0](x), compiled[1](x)):
                np.testing.assert_array_equal(a, b, err_msg=name)
    twin, stock = _pair(keras.layers.GRU, wt.GRU, stateful=True)  # the state carries over calls
    for _ in range(2):
        np.testing.assert_array_equal(twin(X), stock(X), err_msg="stateful")
    # Mixed precision: each step casts W, and the weight gradients are summed in float32.
    keras.mixed_precision.set_global_policy("mixed_float16")
    for name, stock_class, twin_class, kwargs in (LAYERS[2], LAYERS[5]):
        twin, stock = _pair(stock_class, twin_class, **kwargs)
        for a, b in zip(_grads(twin, x), _grads(stock, x)):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, mixed_float16")
    keras.mixed_precision.set_global_policy("float32")
    for name, stock_class, twin_class, shape, kwargs in CONV_LAYERS:
        twin, stock = _pair(stock_class, twin_class, 3, shape, args=(3,), **kwargs)
        x = tf.constant(RNG.randn(*shape).astype("float32"))
        for a, b in zip(_grads(twin, x), _grads(stock, x)):
            np.testing.assert_array_equal(a, b, err_msg=name)
        if name == "conv_lstm1d":
            compiled = [tf.function(functools.partial(_grads, layer)) for layer in (twin, stock)]
            for a, b in zip(compiled[0](x), compiled[1](x)):
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_one_simple_rnn_step_by_hand():
    """`h' = tanh(x·W_in + b + h·W_rec)`: `dx = dz·B_inᵀ`, `dh = dz·B_recᵀ`, `dW_in = xᵀ·dz`,
    `dW_rec = hᵀ·dz`, with `dz = dh'·(1 − h'²)`."""
    cell = wt.SimpleRNNCell(4, feedback="fa")
    cell.build((None, 5))
    x, h = tf.constant(RNG.randn(6, 5).astype("float32")), tf.constant(RNG.randn(6, 4).astype("float32"))
    dy = RNG.randn(6, 4).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch([x, h])
        y, _ = cell(x, [h])
    dx, dh, dw_in, dw_rec = tape.gradient(y, [x, h, cell.kernel, cell.recurrent_kernel], output_gradients=dy)
    w_in, w_rec, b = cell.kernel.numpy(), cell.recurrent_kernel.numpy(), cell.bias.numpy()
    b_in = cell.input_projection.feedback_kernel.numpy()
    b_rec = cell.recurrent_projection.feedback_kernel.numpy()
    y_by_hand = np.tanh(x.numpy() @ w_in + b + h.numpy() @ w_rec)
    assert_allclose(y, y_by_hand)
    dz = dy * (1 - y_by_hand**2)
    assert_allclose(dx, dz @ b_in.T)
    assert_allclose(dh, dz @ b_rec.T)
    assert_allclose(dw_in, x.numpy().T @ dz, rtol=1e-4)
    assert_allclose(dw_rec, h.numpy().T @ dz, rtol=1e-4)
    assert not np.allclose(dh, dz @ w_rec.T, atol=1e-3)


# --- a reimplementation of the stock step math with the test's own substitution ----------------


def _fb_matmul(x, w, b):
    """`x·W` whose input gradient is `dy·Bᵀ` (weight gradient `xᵀ·dy`)."""

    @tf.custom_gradient
    def product(x, w):
        def grad(dy):
            return tf.matmul(dy, b, transpose_b=True), tf.matmul(x, dy, transpose_a=True)

        return tf.matmul(x, w), grad

    return product(x, w)


def _reference_step(kind, cell, weights, x, states):
    """One step of the stock cell `kind` with W forward and B backward in every kernel product."""
    (w_in, b_in), (w_rec, b_rec), bias = weights
    # Reads of the variables (recorded by the tape), not the variables: W's gradient flows back.
    w_in, w_rec = tf.convert_to_tensor(w_in), tf.convert_to_tensor(w_rec)
    u = cell.units
    sigmoid, tanh = tf.sigmoid, tf.tanh
    if kind == "simple_rnn":
        (h,) = states
        h = tanh(_fb_matmul(x, w_in, b_in) + bias + _fb_matmul(h, w_rec, b_rec))
        return h, [h]
    if kind.startswith("lstm"):
        h, c = states
        z = _fb_matmul(x, w_in, b_in) + _fb_matmul(h, w_rec, b_rec) + bias
        i, f, g, o = tf.split(z, 4, axis=1)
        c = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h = sigmoid(o) * tanh(c)
        return h, [h, c]
    (h,) = states
    if kind == "gru":  # reset_after=True: bias (2, 3u), r applied after the recurrent product
        mx = _fb_matmul(x, w_in, b_in) + bias[0]
        mh = _fb_matmul(h, w_rec, b_rec) + bias[1]
        z = sigmoid(mx[:, :u] + mh[:, :u])
        r = sigmoid(mx[:, u:2 * u] + mh[:, u:2 * u])
        hh = tanh(mx[:, 2 * u:] + r * mh[:, 2 * u:])
    else:  # reset_after=False: the candidate's recurrent product reads r⊙h
        mx = _fb_matmul(x, w_in, b_in) + bias
        mh = _fb_matmul(h, w_rec[:, :2 * u], b_rec[:, :2 * u])
        z = sigmoid(mx[:, :u] + mh[:, :u])
        r = sigmoid(mx[:, u:2 * u] + mh[:, u:])
        hh = tanh(mx[:, 2 * u:] + _fb_matmul(r * h, w_rec[:, 2 * u:], b_rec[:, 2 * u:]))
    h = z * h + (1 - z) * hh
    return h, [h]


CELLS = {
    "simple_rnn": (wt.SimpleRNN, {}),
    "lstm": (wt.LSTM, {}),
    "lstm_impl1": (wt.LSTM, dict(implementation=1)),
    "gru": (wt.GRU, {}),
    "gru_reset_before": (wt.GRU, dict(reset_after=False)),
}


def _check_sequence_gradients(kind, feedback, **extra):
    """The twin layer (3 steps, from a given initial state) against `_reference_step` unrolled:
    the gradients wrt every input step, the initial state and every weight; returns the
    layer and its input gradient."""
    twin_class, kwargs = CELLS[kind]
    keras.utils.set_random_seed(1)
    layer = twin_class(4, feedback=feedback, return_sequences=True, **kwargs, **extra)
    layer.build(X.shape)
    cell = layer.cell
    n_states = 2 if kind.startswith("lstm") else 1
    x = tf.constant(X)
    states = [tf.constant(RNG.randn(4, 4).astype("float32")) for _ in range(n_states)]
    dy = tf.constant(RNG.randn(4, 3, 4).astype("float32"))
    weights = [cell.kernel, cell.recurrent_kernel, cell.bias]
    # B as the rule makes it for this step (brsf: drawn from the current [seed, step]).
    feedbacks = [effective_feedback(p) for p in cell.projections]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x] + states)
        y = layer(x, initial_state=list(states))
        step_states, outputs = list(states), []
        pairs = [(cell.kernel, feedbacks[0]), (cell.recurrent_kernel, feedbacks[1]), cell.bias]
        for t in range(3):
            h, step_states = _reference_step(kind, cell, pairs, x[:, t], step_states)
            outputs.append(h)
        y_reference = tf.stack(outputs, axis=1)
    np.testing.assert_allclose(y, y_reference, rtol=1e-5, atol=1e-6, err_msg=f"{kind} {feedback}")
    wrt = [x] + states + weights
    ours = tape.gradient(y, wrt, output_gradients=dy)
    expected = tape.gradient(y_reference, wrt, output_gradients=dy)
    for a, b, what in zip(ours, expected, ["x"] + [f"state {i}" for i in range(n_states)] + ["W_in", "W_rec", "b"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{kind} {feedback}: d{what}")
    return layer, ours[0]


def test_errors_cross_both_kernels_and_time_through_b():
    """`dx_t = dz_t·B_inᵀ` and `dh_{t−1} = dz_t·B_recᵀ` at every step, through each cell's gate
    algebra (GRU without `reset_after`: its candidate's product with `r⊙h` too), and the error
    really differs from backprop's."""
    for kind in CELLS:
        layer, dx = _check_sequence_gradients(kind, "fa")
        stock = keras_wt.strip(keras.Sequential([keras.Input(X.shape[1:]), layer]))
        with tf.GradientTape() as tape:
            x = tf.constant(X)
            tape.watch(x)
            y = stock(x)
        backprop = tape.gradient(y, x, output_gradients=tf.ones_like(y))
        assert not np.allclose(dx, backprop, atol=1e-3), kind


def test_every_rule_sends_its_own_b_through_both_kernels():
    """Each rule's `B` (`keras_wt.alignment.effective_feedback`: `sign(W)·s`, `|R|⊙sign(W)`,
    the `brsf` draw of the current `[seed, step]`, the stored `B`) carries the error across the
    input kernel and every time step; `brsf` uses one draw for all the steps of the sequence and
    advances its state once per backward pass."""
    for feedback in ("ss", "frsf", "brsf", "kp", "wm", "sa", "ia"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # wm without a mirror
            layer, _ = _check_sequence_gradients("lstm", feedback)
        if feedback == "ss":
            scale = math.sqrt(2.0 / 16)  # sqrt(2 / fan_out), fan_out = 4·units
            for projection in layer.cell.projections:
                assert keras_wt.algorithms.sign_symmetry_scale(projection) == pytest.approx(scale)
        if feedback == "brsf":
            for projection in layer.cell.projections:  # one backward pass: one step
                assert projection.feedback_state.numpy()[1] == 1


def _fb_op(op, x, w, b):
    """`op(x, W)` (bilinear) whose input gradient is the vector-Jacobian product of `op(·, B)`."""

    @tf.custom_gradient
    def product(x, w):
        def grad(dy):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch([x, w])
                through_b, through_w = op(x, b), op(x, w)
            return tape.gradient(through_b, x, dy), tape.gradient(through_w, w, dy)

        return op(x, w), grad

    return product(x, w)


def test_conv_lstm_errors_cross_both_convolutions_through_b():
    """ConvLSTM1D ("valid" input convolution, "same" recurrent one): the error crosses the input
    convolution as its transpose with `B_in` and each step's recurrent convolution as its
    transpose with `B_rec`; the gates and the carry are exact."""
    layer = wt.ConvLSTM1D(3, 3, feedback="fa", return_sequences=True)
    layer.build(CONV_X.shape)
    cell = layer.cell
    b_in, b_rec = (p.feedback_kernel for p in cell.projections)
    conv_in = lambda x, k: tf.nn.conv1d(x, k, stride=1, padding="VALID")  # noqa: E731
    conv_rec = lambda x, k: tf.nn.conv1d(x, k, stride=1, padding="SAME")  # noqa: E731
    x = tf.constant(CONV_X)
    h0, c0 = (tf.constant(RNG.randn(2, 4, 3).astype("float32")) for _ in range(2))
    weights = [cell.kernel, cell.recurrent_kernel, cell.bias]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, h0, c0])
        y = layer(x, initial_state=[h0, c0])
        h, c, outputs = h0, c0, []
        w_in, w_rec = tf.convert_to_tensor(cell.kernel), tf.convert_to_tensor(cell.recurrent_kernel)
        for t in range(3):
            z = _fb_op(conv_in, x[:, t], w_in, b_in) + _fb_op(conv_rec, h, w_rec, b_rec) + cell.bias
            i, f, g, o = tf.split(z, 4, axis=-1)
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            h = tf.sigmoid(o) * tf.tanh(c)
            outputs.append(h)
        y_reference = tf.stack(outputs, axis=1)
    assert_allclose(y, y_reference, rtol=1e-5, atol=1e-6)
    dy = tf.constant(RNG.randn(*y.shape).astype("float32"))
    wrt = [x, h0, c0] + weights
    for a, b in zip(tape.gradient(y, wrt, dy), tape.gradient(y_reference, wrt, dy)):
        assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_with_b_equal_to_w_every_gradient_is_backprops():
    """`B := W` in every projection (`fa`) gives the stock model's gradients of every weight and
    of the input, through two stacked recurrent layers and time."""
    inputs = keras.Input(X.shape[1:])
    h = keras.layers.LSTM(6, return_sequences=True)(inputs)
    h = keras.layers.GRU(5, reset_after=False, return_sequences=True)(h)
    h = keras.layers.SimpleRNN(4)(h)
    stock = keras.Model(inputs, keras.layers.Dense(3)(h))
    model = keras_wt.convert(stock, "fa")
    for layer in wt.feedback_layers(model):
        layer.feedback_kernel.assign(layer.kernel)
    y = RNG.randint(0, 3, 4)
    results = []
    for m in (model, stock):
        x = tf.constant(X)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = LOSS(y, m(x))
        results.append(tape.gradient(loss, [x] + wt.stock_weights(m)))
    assert len(results[0]) == 1 + 3 + 3 + 3 + 2
    for a, b in zip(*results):
        assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# --- training: every rule, the per-step state, the local losses, Kolen-Pollack, the mirror --------


def _model(feedback, **kwargs):
    """A recurrent model: LSTM → Bidirectional(GRU) → a twin cell in a stock RNN → Dense."""
    inputs = keras.Input(X.shape[1:])
    h = wt.LSTM(6, feedback=feedback, return_sequences=True, **kwargs)(inputs)
    h = keras.layers.Bidirectional(wt.GRU(5, feedback=feedback, reset_after=False, return_sequences=True, **kwargs))(h)
    h = keras.layers.RNN(wt.SimpleRNNCell(4, feedback=feedback, **kwargs))(h)
    return keras.Model(inputs, wt.Dense(3, feedback=feedback)(h))


def _compile(model, feedback, lr=0.1, **kwargs):
    optimizer = keras.optimizers.SGD(lr)
    callbacks = []
    learns = keras_wt.algorithms.get(feedback).learns_feedback
    if learns == "optimizer":
        optimizer = KolenPollack(optimizer, weight_decay=0.1)
    if learns == "mirror":
        callbacks.append(keras_wt.callbacks.MirrorCallback(
            learning_rate=0.1, noise_std=1.0, decay=0.5, batch_size=8))
    model.compile(optimizer, LOSS, **kwargs)
    return callbacks


def test_every_rule_trains_with_fit_in_every_wrapper():
    """One `fit` trains a model holding recurrent layers of several rules, in each wrapper (a twin
    layer, `Bidirectional`, a twin cell in `keras.layers.RNN`, stacked cells), with
    `KolenPollack` and `MirrorCallback`: every kernel moves, feedback layer names are unique, the
    `[seed, step]` states advance once per training step (not per time step), and the `B`s that
    learn (kp, wm, sa, ia) move. (ss and frsf use the code path of fa, with their own `B`:
    `test_every_rule_sends_its_own_b_through_both_kernels`.)"""
    inputs = keras.Input(X.shape[1:])
    h = wt.LSTM(6, feedback="fa", return_sequences=True)(inputs)
    h = keras.layers.Bidirectional(wt.GRU(4, feedback="brsf", return_sequences=True))(h)
    h = keras.layers.RNN([wt.LSTMCell(4, feedback="wm"), wt.GRUCell(4, feedback="sa", reset_after=False)],
                         return_sequences=True)(h)
    h = wt.SimpleRNN(4, feedback="ia", return_sequences=True)(h)
    h = keras.layers.RNN(wt.SimpleRNNCell(5, feedback="kp"))(h)
    model = keras.Model(inputs, wt.Dense(3, feedback="fa")(h))
    names = [layer.name for layer in wt.feedback_layers(model)]
    assert len(set(names)) == len(names) == 2 * 7 + 1
    assert [n.split("_")[0] for n in names[2:6]] == ["forward", "forward", "backward", "backward"]
    optimizer = KolenPollack(keras.optimizers.SGD(0.1), weight_decay=0.1)
    mirror = keras_wt.callbacks.MirrorCallback(learning_rate=0.1, noise_std=1.0, decay=0.5, batch_size=8)
    model.compile(optimizer, LOSS)
    before = {w.path: w.numpy() for w in model.weights}
    x = RNG.randn(24, 3, 5).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "no weight mirror trains"
        history = model.fit(x, RNG.randint(0, 3, 24), batch_size=8, verbose=0, callbacks=[mirror])
    assert np.isfinite(history.history["loss"][0])
    for layer in wt.feedback_layers(model):
        assert not np.array_equal(before[layer.kernel.path], layer.kernel.numpy()), layer.name
        if layer.feedback_state is not None:
            assert layer.feedback_state.numpy()[1] == 3, layer.name
        if layer.feedback_learning != Learning.NONE:
            assert not np.array_equal(before[layer.feedback_kernel.path], layer.feedback_kernel.numpy()), layer.name
    assert len(optimizer.kp_pairs) == 2 and len(mirror.mirror.layers) == 2  # both kernels of each


def _mixed_model():
    """SimpleRNN (brsf) → SimpleRNN (sa) → Dense (kp): a per-step draw, a local loss, an
    optimizer-learned B (the mechanisms every recurrent twin shares)."""
    keras.utils.set_random_seed(11)
    return keras.Sequential([keras.Input(X.shape[1:]), wt.SimpleRNN(4, feedback="brsf", return_sequences=True),
                             wt.SimpleRNN(3, feedback="sa"), wt.Dense(3, feedback="kp")])


def _train_mixed(strategy=None, jit_compile=False, start=None):
    """Two SGD steps of `_mixed_model` from the weights `start` (default: its own)."""
    with (strategy or tf.distribute.get_strategy()).scope():
        model = _mixed_model()
        model.compile(KolenPollack(keras.optimizers.SGD(0.1), weight_decay=0.1), LOSS, jit_compile=jit_compile)
        start = [w.numpy() for w in model.weights] if start is None else start
        model.set_weights(start)
    rng = np.random.RandomState(5)
    x, y = rng.randn(16, 3, 5).astype("float32"), rng.randint(0, 3, 16)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model, start


def test_xla_training_steps_equal_eager_ones():
    """With `jit_compile=True` the same two steps give the same weights, `B`s and states: the
    `brsf` draw (one per sequence), `sa`'s local loss and Kolen–Pollack compile with XLA."""
    plain, start = _train_mixed()
    compiled, _ = _train_mixed(jit_compile=True, start=start)
    for a, b in zip(plain.weights, compiled.weights):
        assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert [p.feedback_state.numpy()[1] for p in compiled.layers[0].cell.projections] == [2, 2]


def test_brsf_measurements_do_not_advance_the_step_and_state_is_per_layer_call():
    model = _model("brsf")
    state = {l.name: l.feedback_state.numpy().copy() for l in wt.feedback_layers(model)}
    model.compile("sgd", LOSS)
    delta_angles(model, X, RNG.randint(0, 3, 4))
    for layer in wt.feedback_layers(model):
        np.testing.assert_array_equal(layer.feedback_state.numpy(), state[layer.name])
    # A recurrent layer called twice in one pass is two calls: its state advances twice.
    twice = wt.SimpleRNN(3, feedback="brsf")
    x = tf.constant(X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = twice(x) + twice(x[:, ::-1])
    tape.gradient(y, x)
    assert [p.feedback_state.numpy()[1] for p in twice.cell.projections] == [2, 2]


@pytest.mark.parametrize("feedback", ["sa", "ia"])
def test_local_loss_updates_b_once_per_call_on_noise_of_each_kernel_input(feedback):
    """One training step, SGD(lr): each projection's B steps down the gradient of its local loss
    once (not once per time step). `sa` = self + decay: `∇_B = B − W`; `ia` = amp + 0.1·null +
    decay on standard normal noise of the projection's input shape, drawn from its state:
    `∇_B = −xᵀ(xW)/n + 0.1·B·(xW)ᵀ(xW)/n + B` with `x` of shape `(n, input_dim)` and `(n, units)`."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input(X.shape[1:]), wt.LSTM(4, feedback=feedback),
                              keras.layers.Dense(3)])
    lr = 0.1
    model.compile(keras.optimizers.SGD(lr), LOSS)
    projections = model.layers[0].cell.projections
    before = [(p.kernel.numpy().astype(np.float64), p.feedback_kernel.numpy().astype(np.float64),
               p.feedback_state.numpy()) for p in projections]
    model.train_on_batch(X, RNG.randint(0, 3, 4))
    for p, (w, b, state) in zip(projections, before):
        if feedback == "sa":
            gradient = b - w
        else:
            shape = (4,) + tuple(p.feedback_input_shape[1:])
            x = keras_wt.algorithms.stateless_normal(shape, state).numpy().astype(np.float64)
            y = x @ w
            gradient = -x.T @ y / 4 + 0.1 * b @ (y.T @ y) / 4 + b
        assert_allclose(p.feedback_kernel.numpy(), b - lr * gradient, rtol=1e-4, atol=1e-6)


def test_local_input_real_is_refused_where_the_loss_reads_it():
    with pytest.raises(ValueError, match="feedback_input='real' is not supported by the recurrent"):
        wt.LSTM(3, feedback="ia", feedback_input="real")
    with pytest.raises(ValueError, match="feedback_input='real' is not supported by the recurrent"):
        wt.GRUCell(3, feedback="wm", feedback_input="real")
    assert wt.LSTM(3, feedback="sa").cell.resolved_feedback_input == "real"  # self + decay: no input


def test_kolen_pollack_keeps_both_kernel_pairs_of_every_layer_in_step():
    model = _model("kp")
    convolutional = keras.Sequential([keras.layers.Reshape((3, 5, 1)),
                                      wt.ConvLSTM1D(2, 3, padding="same", feedback="kp"),
                                      keras.layers.Flatten(), wt.Dense(3, feedback="kp")])
    model = keras.Model(model.inputs[0], model.outputs[0] + convolutional(model.inputs[0]))
    pairs = [(l.kernel, l.feedback_kernel) for l in wt.feedback_layers(model)]
    optimizer = KolenPollack(keras.optimizers.SGD(0.05, momentum=0.9), weight_decay=0.3)
    y = RNG.randint(0, 3, 4)
    differences = [b.numpy() - w.numpy() for w, b in pairs]
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(X, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        after = [b.numpy() - w.numpy() for w, b in pairs]
        for a, b in zip(differences, after):
            np.testing.assert_allclose(b, (1 - 0.05 * 0.3) * a, rtol=0, atol=2e-6)
        differences = after
    assert {id(w) for w, _ in optimizer.kp_pairs} == {id(w) for w, _ in pairs}
    assert len(pairs) == 9 + 3 and all(np.abs(w.numpy() - b.numpy()).max() > 0 for w, b in pairs)


def test_kp_without_kolen_pollack_fails_loudly():
    model = keras.Sequential([keras.Input(X.shape[1:]), wt.GRU(4, feedback="kp"), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    with pytest.raises(ValueError, match="KolenPollack"):
        model.fit(X, RNG.randint(0, 3, 4), verbose=0)


def _stationary_angles(mirror, steps, burn_in):
    """RMS angle (`atan √mean tan²θ`) of each mirrored layer over the steps after `burn_in`."""
    mirror.run(0, burn_in)
    tan2 = {layer.name: [] for layer in mirror.layers}
    for counter in range(burn_in, steps):
        mirror(counter)
        for layer in mirror.layers:
            degrees = angle(layer.kernel.numpy(), layer.feedback_kernel.numpy())
            tan2[layer.name].append(np.tan(np.radians(degrees)) ** 2)
    return {name: np.degrees(np.arctan(np.sqrt(np.mean(v)))) for name, v in tan2.items()}


def test_mirror_reaches_the_fixed_point_on_both_kernels():
    """With W frozen, each projection's B goes to `(σ²/λ)·W`, at the residual angle of its own
    fan-in (`keras_wt.mirror.residual_angle`): noise of shape `(n, input_dim)` for the input
    kernel, `(n, units)` for the recurrent one, `(n, 2, units)` for GRU's `[h, r⊙h]` (whose link
    counts are 1, as for a matmul)."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((3, 40))
    h = wt.LSTM(24, feedback="wm", return_sequences=True)(inputs)
    h = wt.GRU(32, feedback="wm", reset_after=False)(h)
    model = keras.Model(inputs, h)
    eta, sigma, lam, n = 0.1, 1.5, 1.0, 64
    mirror = WeightMirror(model, eta, noise_std=sigma, decay=lam, batch_size=n, seed=1)
    shapes = [tuple(mirror.noise(i, 0).shape) for i in range(4)]
    assert shapes == [(n, 40), (n, 24), (n, 24), (n, 2, 32)]
    fan_ins = [mirror_fan_in(layer) for layer in mirror.layers]
    assert fan_ins == pytest.approx([40, 24, 24, 32])
    for layer in mirror.layers:
        np.testing.assert_array_equal(keras_wt.mirror.link_counts(layer), 1.0)
    measured = _stationary_angles(mirror, steps=400, burn_in=100)
    for layer, fan_in in zip(mirror.layers, fan_ins):
        law = residual_angle(fan_in, n, eta, lam)
        # The law drops O(1/d_in): for Gaussian noise the exact value has d_in + 1.
        refined = residual_angle(fan_in + 1, n, eta, lam)
        assert measured[layer.name] == pytest.approx(refined, rel=0.08), (layer.name, measured, law)
        w, b = layer.kernel.numpy(), layer.feedback_kernel.numpy()
        assert np.sum(b * w) / np.sum(w * w) == pytest.approx(sigma**2 / lam, rel=0.05), layer.name
    # ConvLSTM: a "valid" input convolution and a "same" recurrent one (whose border taps see
    # fewer real inputs: the link counts make the fixed point exact all the same).
    model = keras.Sequential([keras.Input((3, 9, 4)), wt.ConvLSTM1D(6, 3, feedback="wm")])
    mirror = WeightMirror(model, eta, noise_std=sigma, decay=lam, batch_size=n, seed=2)
    assert [tuple(mirror.noise(i, 0).shape) for i in range(2)] == [(n, 9, 4), (n, 7, 6)]
    assert keras_wt.mirror.link_counts(mirror.layers[1]).min() < 7  # padded borders
    mirror.run(0, 300)
    for layer in mirror.layers:
        w, b = layer.kernel.numpy(), layer.feedback_kernel.numpy()
        assert np.sum(b * w) / np.sum(w * w) == pytest.approx(sigma**2 / lam, rel=0.05), layer.name
        assert angle(w, b) < 10, layer.name


# --- saving, convert, strip, wrappers, alignment, distribution ------------------------------------


def test_save_and_load_keep_every_feedback_kernel_and_the_outputs(tmp_path):
    inputs = keras.Input(X.shape[1:])
    h = wt.LSTM(6, feedback="kp", return_sequences=True)(inputs)
    h = keras.layers.Bidirectional(wt.SimpleRNN(4, feedback="brsf", return_sequences=True))(h)
    h = keras.layers.RNN([wt.GRUCell(5, feedback="wm", reset_after=False), wt.LSTMCell(3, feedback="fa")])(h)
    model = keras.Model(inputs, wt.Dense(2, feedback="frsf")(h))
    names = [l.name for l in wt.feedback_layers(model)]
    assert len(set(names)) == len(names) == 11
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert [(l.name, l.feedback) for l in wt.feedback_layers(loaded)] == [
        (l.name, l.feedback) for l in wt.feedback_layers(model)]
    # (Keras drops the `bidirectional/` scope from the paths of a loaded Bidirectional's weights,
    # stock layers' too; the names of the feedback layers are kept.)
    assert [w.path.split("/")[-2:] for w in loaded.weights] == [w.path.split("/")[-2:] for w in model.weights]
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model(X), loaded(X))
    same = lambda config: json.loads(json.dumps(config))  # noqa: E731 (tuples and lists alike)
    assert [same(l.get_config()) for l in loaded.layers] == [same(l.get_config()) for l in model.layers]


@pytest.mark.parametrize("sequential", [False, True], ids=["functional", "sequential"])
def test_convert_puts_feedback_on_both_kernels_and_strip_restores_stock(sequential):
    layers = [keras.layers.SimpleRNN(4, return_sequences=True), keras.layers.GRU(5, return_sequences=True),
              keras.layers.LSTM(6, dropout=0.1), keras.layers.Dense(3)]
    if sequential:
        stock = keras.Sequential([keras.Input(X.shape[1:])] + layers)
    else:
        inputs = keras.Input(X.shape[1:])
        h = inputs
        for layer in layers:
            h = layer(h)
        stock = keras.Model(inputs, h)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left unconverted
        model = keras_wt.convert(stock, "kp")
    assert [type(l).__name__ for l in model.layers if not isinstance(l, keras.layers.InputLayer)] == [
        "SimpleRNN", "GRU", "LSTM", "Dense"]
    assert all(type(l).__module__.startswith("keras_wt") for l in model.layers[-4:])
    names = [l.name for l in wt.feedback_layers(model)]
    rnn_names = [l.name for l in stock.layers[-4:-1]]
    assert names == [f"{n}_{k}" for n in rnn_names for k in ("input", "recurrent")] + [stock.layers[-1].name]
    np.testing.assert_array_equal(model(X), stock(X))
    back = keras_wt.strip(model)
    assert [type(l) for l in back.layers] == [type(l) for l in stock.layers]
    np.testing.assert_array_equal(back(X), stock(X))
    with pytest.raises(ValueError, match="not supported by the recurrent layers"):
        keras_wt.convert(stock, "dfa")


def test_wrappers_compute_the_stock_outputs():
    """`Bidirectional(wt.LSTM)`, `RNN(wt.LSTMCell)` and stacked twin cells compute what their stock
    counterparts compute with the same weights."""
    twins = [
        keras.layers.Bidirectional(wt.LSTM(4, feedback="fa", return_sequences=True)),
        keras.layers.RNN(wt.LSTMCell(4, feedback="kp")),
        keras.layers.RNN([wt.GRUCell(4, feedback="ss"), wt.SimpleRNNCell(3, feedback="fa")]),
    ]
    stocks = [
        keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True)),
        keras.layers.RNN(keras.layers.LSTMCell(4)),
        keras.layers.RNN([keras.layers.GRUCell(4), keras.layers.SimpleRNNCell(3)]),
    ]
    for twin, stock in zip(twins, stocks):
        twin.build(X.shape)
        stock.build(X.shape)
        for target, source in zip(stock.weights, wt.stock_weights(twin)):
            target.assign(source)
        np.testing.assert_array_equal(twin(X), stock(X))
    assert [l.name.split("_", 1)[0] for l in wt.feedback_layers(twins[0])] == ["forward"] * 2 + ["backward"] * 2


def test_alignment_reports_both_kernels_of_every_recurrent_layer():
    model = _model("fa")
    model.compile("sgd", LOSS)
    y = RNG.randint(0, 3, 4)
    weights, deltas = weight_angles(model), delta_angles(model, X, y)
    names = [l.name for l in wt.feedback_layers(model)]
    assert list(weights) == list(deltas) == names
    assert all(a > 45 for a in weights.values())  # each B is its own
    assert deltas[names[-1]] == pytest.approx(0, abs=1e-3)  # the top layer's delta is exact
    assert all(deltas[n] > 1 for n in names[:-1])
    bp = _model("bp")
    for target, source in zip(wt.stock_weights(bp), wt.stock_weights(model)):
        target.assign(source)
    assert max(delta_angles(bp, X, y, loss=LOSS).values()) < 1e-2


def test_twin_arguments_and_configs():
    with pytest.raises(ValueError, match="use_cudnn='auto' or False"):
        wt.LSTM(3, use_cudnn=True)
    with pytest.raises(ValueError, match="feedback='dfa' is not supported by the recurrent layers"):
        wt.GRU(3, feedback="dfa")
    layer = wt.GRU(3, feedback="ss", feedback_scale=0.2, reset_after=False, use_cudnn=False)
    config = layer.get_config()
    clone = wt.GRU.from_config(config)
    assert clone.get_config() == config and clone.cell.feedback_scale == 0.2
    assert clone.cell.feedback == "ss" and not clone.cell.reset_after
    stock_config = {k: v for k, v in config.items() if k not in wt.FEEDBACK_ARGUMENTS}
    assert keras.layers.GRU.from_config(stock_config).get_config() == stock_config
    cell = wt.LSTMCell(3, feedback="kp")
    assert wt.LSTMCell.from_config(cell.get_config()).get_config() == cell.get_config()
    layer.build((None, 2, 5))
    # The stock order (kernel, recurrent_kernel, bias): the projections' kernels, then the bias.
    assert [w.path.split("/")[-2:] for w in wt.stock_weights(layer)] == [
        [f"{layer.name}_input", "kernel"], [f"{layer.name}_recurrent", "kernel"], [f"{layer.name}_bias", "bias"]]
    assert [w.shape for w in wt.stock_weights(layer)] == [(5, 9), (3, 9), (9,)]
    assert layer.cell.recurrent_projection.feedback_input_shape == (None, 2, 3)


def test_two_replicas_train_like_one_device(two_cpu_strategy):
    """Under MirroredStrategy every replica keeps the same W, B and state, and two steps give one
    device's weights (brsf's draw, sa's local loss, Kolen–Pollack)."""
    one, start = _train_mixed()
    two, _ = _train_mixed(two_cpu_strategy, start=start)
    for a, b in zip(one.weights, two.weights):
        first, *others = [np.asarray(v) for v in b.value.values]
        for value in others:
            np.testing.assert_array_equal(value, first, err_msg=b.path)
        np.testing.assert_allclose(first, a.numpy(), rtol=1e-5, atol=1e-6, err_msg=b.path)


def test_example_script_runs_on_a_tiny_dataset(data_dir, tmp_path):
    """examples/lstm_fashion_mnist.py, one epoch on the tiny IDX files of conftest (no network):
    a JSON with per-epoch test accuracy and the angles of both kernels and the classifier."""
    path = __file__.rsplit("/tests/", 1)[0] + "/examples/lstm_fashion_mnist.py"
    example = runpy.run_path(path)  # defines main() without running it
    out = tmp_path / "result.json"
    example["main"]([
        "--algo", "kp", "--cell", "gru", "--units", "8", "--epochs", "1", "--batch_size", "16",
        "--probe", "8", "--data_dir", data_dir, "--out", str(out), "--verbose", "0",
    ])
    result = json.loads(out.read_text())
    (epoch,) = result["epochs"]
    assert 0 <= epoch["test_accuracy"] <= 1 and result["train_examples"] == 48
    names = ["gru_input", "gru_recurrent", "classifier"]
    assert sorted(epoch["weight_angle"]) == sorted(epoch["delta_angle"]) == sorted(names)
    assert all(np.isfinite(v) for v in epoch["weight_angle"].values())
