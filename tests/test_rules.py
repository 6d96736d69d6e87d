"""The rules of the rest of the field: frsf, brsf (sign-concordant feedback with random
magnitudes), dfa (direct feedback alignment) and Kunin et al.'s local alignment losses (sa, ia,
the weight mirror on real inputs), each against a hand computation."""

import keras
import numpy as np
import pytest

import tensorflow as tf

import keras_wt
from keras_wt import dfa
from keras_wt import feedback as feedback_lib
from keras_wt import layers as wt
from keras_wt import local
from keras_wt import models

from conftest import assert_allclose

RNG = np.random.RandomState(0)
X = RNG.randn(32, 5).astype("float32")
DY = RNG.randn(32, 4).astype("float32")


def _dense(feedback, **kwargs):
    layer = wt.Dense(4, feedback=feedback, **kwargs)
    layer.build((None, 5))
    return layer


def _input_gradient(layer, x=X, dy=DY):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    return tape.gradient(y, x, output_gradients=tf.constant(dy)).numpy()


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# --- sign-concordant feedback with random magnitudes -----------------------------------------


def test_frsf_sends_fixed_magnitudes_with_the_current_signs_of_w():
    layer = _dense("frsf")
    r = layer.feedback_kernel.numpy()
    w = layer.kernel.numpy()
    assert_allclose(_input_gradient(layer), DY @ (np.abs(r) * np.sign(w)).T)
    # W's signs change, |R| does not: B follows the new signs with the same magnitudes.
    layer.kernel.assign(-w + 0.01)
    assert_allclose(_input_gradient(layer), DY @ (np.abs(r) * np.sign(-w + 0.01)).T)
    np.testing.assert_array_equal(layer.feedback_kernel.numpy(), r)


def _brsf_feedback(layer, seed, step):
    bits = tf.random.stateless_uniform(layer.kernel.shape, seed=[seed, step], alg="philox",
                                       dtype=tf.int32, minval=None, maxval=None).numpy()
    u = ((bits & 0x7FFFFF) + 0.5) / 2.0**23
    r = np.sqrt(2.0) * tf.math.erfinv(tf.constant(2 * u - 1, tf.float64)).numpy()
    scale = np.sqrt(2.0 / 4)  # sign symmetry's default scale, sqrt(2 / fan_out)
    return np.abs(r) * scale * np.sign(layer.kernel.numpy())


def test_brsf_redraws_magnitudes_every_step_from_seed_and_step():
    layer = _dense("brsf")
    seed, step = layer.feedback_state.numpy()
    assert step == 0
    first = _input_gradient(layer)
    assert_allclose(first, DY @ _brsf_feedback(layer, seed, 0).T, rtol=1e-5)
    assert list(layer.feedback_state.numpy()) == [seed, 1]  # the backward pass advanced it
    second = _input_gradient(layer)
    assert_allclose(second, DY @ _brsf_feedback(layer, seed, 1).T, rtol=1e-5)
    b0, b1 = _brsf_feedback(layer, seed, 0), _brsf_feedback(layer, seed, 1)
    assert np.abs(np.abs(b0) - np.abs(b1)).mean() > 0.1 * np.abs(b0).mean()
    np.testing.assert_array_equal(np.sign(b0), np.sign(layer.kernel.numpy()))
    # The same state gives the same draw: a restored (resumed) layer continues the sequence.
    layer.feedback_state.assign([seed, 0])
    assert_allclose(_input_gradient(layer), first, rtol=0, atol=0)
    # The compiled (XLA) step draws the same B from the same state.
    layer.feedback_state.assign([seed, 1])
    compiled = tf.function(lambda x: _input_gradient_tensor(layer, x), jit_compile=True)
    assert_allclose(compiled(tf.constant(X)), second, rtol=1e-5)


def _input_gradient_tensor(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    return tape.gradient(y, x, output_gradients=tf.constant(DY))


def test_alignment_measurements_do_not_advance_the_step():
    model = keras.Sequential([keras.Input((5,)), wt.Dense(6, activation="tanh", feedback="brsf"),
                              wt.Dense(3, feedback="brsf")])
    state = [l.feedback_state.numpy().copy() for l in wt.feedback_layers(model)]
    keras_wt.alignment.delta_angles(model, X, RNG.randint(0, 3, 32),
                                    loss=keras.losses.SparseCategoricalCrossentropy(True))
    for before, layer in zip(state, wt.feedback_layers(model)):
        np.testing.assert_array_equal(layer.feedback_state.numpy(), before)


# --- direct feedback alignment ---------------------------------------------------------------


def _dfa_mlp():
    keras.utils.set_random_seed(5)
    return models.get("mlp", input_shape=(5,), hidden=(7, 6), num_classes=4, feedback="dfa",
                      output_activation=None)


def test_dfa_hidden_deltas_are_the_output_error_times_their_own_b():
    model = _dfa_mlp()
    marker = model.get_layer("direct_feedback")
    t = RNG.randn(32, 4).astype("float32")
    with feedback_lib.tap_linear_outputs() as tap:
        with tf.GradientTape() as tape:
            out = model(X)
            loss = 0.5 * tf.reduce_sum(tf.square(out - t))
    layers = wt.feedback_layers(model)
    deltas = tape.gradient(loss, [tap.outputs[l] for l in layers])
    # By hand: a forward pass in NumPy, e = ∂L/∂(top output), δₗ = (e·Bₗ) ⊙ σ'(aₗ).
    w = [(l.kernel.numpy(), l.bias.numpy()) for l in layers]
    h1 = _sigmoid(X @ w[0][0] + w[0][1])
    h2 = _sigmoid(h1 @ w[1][0] + w[1][1])
    e = h2 @ w[2][0] + w[2][1] - t
    b1, b2 = (k.numpy() for k in marker.direct_kernels)
    assert b1.shape == (4, 7) and b2.shape == (4, 6)
    assert_allclose(deltas[2], e, rtol=1e-4, atol=1e-5)
    assert_allclose(deltas[1], (e @ b2) * h2 * (1 - h2), rtol=1e-4, atol=1e-6)
    assert_allclose(deltas[0], (e @ b1) * h1 * (1 - h1), rtol=1e-4, atol=1e-6)
    # Backprop through the same model, for the delta angles, is exact backprop.
    with feedback_lib.tap_linear_outputs() as tap:
        with tf.GradientTape() as tape:
            with feedback_lib.force_backprop():
                out = model(X)
            loss = 0.5 * tf.reduce_sum(tf.square(out - t))
    exact = tape.gradient(loss, tap.outputs[layers[1]])
    assert_allclose(exact, (e @ w[2][0].T) * h2 * (1 - h2), rtol=1e-4, atol=1e-6)
    metrics = keras_wt.alignment.alignment_metrics(model, X, t, loss="mse")
    assert not any(k.startswith(("weight_angle", "norm_ratio")) for k in metrics)
    assert {"delta_angle/hidden_1", "delta_angle/hidden_2"} <= set(metrics)


def test_dfa_direct_kernels_are_saved_and_restored(tmp_path):
    model = _dfa_mlp()
    model.save(tmp_path / "dfa.keras")
    loaded = keras.models.load_model(tmp_path / "dfa.keras")
    for a, b in zip(model.get_layer("direct_feedback").direct_kernels,
                    loaded.get_layer("direct_feedback").direct_kernels):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model.predict(X, verbose=0), loaded.predict(X, verbose=0))


def test_dfa_refuses_models_it_cannot_apply_to():
    inputs = keras.Input((5,))
    h = wt.Dense(5, feedback="dfa")(inputs)
    residual = keras.Model(inputs, wt.Dense(3, feedback="dfa")(keras.layers.Add()([inputs, h])))
    with pytest.raises(ValueError, match="residual connection"):
        dfa.direct_feedback_model(residual)
    normalised = keras.Sequential([keras.Input((5,)), wt.Dense(5, feedback="dfa"),
                                   keras.layers.BatchNormalization(), wt.Dense(3, feedback="dfa")])
    with pytest.raises(ValueError, match="BatchNormalization.*weights of its own"):
        dfa.direct_feedback_model(normalised)
    with pytest.raises(ValueError, match="feedback='fa'.*convert"):
        dfa.direct_feedback_model(keras.Sequential([keras.Input((5,)), wt.Dense(3, feedback="fa")]))

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed"):
        dfa.direct_feedback_model(Subclassed())
    with pytest.raises(ValueError, match="BatchNormalization"):
        models.get("cnn", feedback="dfa", batch_norm=True)


def test_convert_to_dfa_adds_the_marker_and_keeps_the_outputs():
    stock = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="relu"),
                              keras.layers.Dense(3)])
    converted = keras_wt.convert(stock, "dfa")
    assert isinstance(converted.layers[-1], dfa.DirectFeedback)
    assert_allclose(converted(X), stock(X), rtol=1e-6)


# --- local alignment losses (Kunin et al. 2020) ----------------------------------------------


def _closed_forms(x, w, b):
    """∇_B of every primitive for Dense, by hand."""
    n = len(x)
    y = x @ w
    return {
        "decay": b,
        "self": -w,
        "amp": -x.T @ y / n,
        "null": b @ y.T @ y / n,
        "sparse": x.T @ (x @ b) / n,
    }


@pytest.mark.parametrize("primitive", local.PRIMITIVES)
def test_each_primitive_gradient_matches_its_closed_form(primitive):
    layer = _dense("ia")
    b = layer.feedback_kernel
    with tf.GradientTape() as tape:
        loss = local.alignment_loss(layer, tf.constant(X), layer.kernel, b, {primitive: 0.7})
    grad = tape.gradient(loss, b.value)
    expected = _closed_forms(X, layer.kernel.numpy(), b.numpy())[primitive]
    assert_allclose(grad, 0.7 * expected, rtol=1e-4, atol=1e-6)


def test_null_primitive_uses_the_transpose_of_the_convolution():
    conv = wt.Conv2D(3, 3, strides=2, padding="same", feedback="ia")
    x = tf.random.normal((2, 7, 7, 2))
    conv.build(x.shape)
    w, b = conv.kernel.numpy(), conv.feedback_kernel
    y = conv.linear(x, w)
    with tf.GradientTape(persistent=True) as tape:
        loss = local.alignment_loss(conv, x, conv.kernel, b, {"null": 1.0})
        back = tf.nn.conv2d_transpose(y, b.value, x.shape, strides=2, padding="SAME")
        expected = 0.5 * tf.reduce_sum(tf.square(back)) / 2
    assert_allclose(loss, expected, rtol=1e-5)
    assert_allclose(tape.gradient(loss, b.value), tape.gradient(expected, b.value), rtol=1e-4,
                    atol=1e-6)


def _one_step(feedback, labels, lr=0.1, top_units=3, **kwargs):
    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((5,)), wt.Dense(4, activation="tanh", feedback=feedback, **kwargs),
        wt.Dense(top_units, feedback=feedback, **kwargs)])
    first = model.layers[0]
    w, b = first.kernel.numpy(), first.feedback_kernel.numpy()
    # What the layer's local loss sees: its input, or the noise of its (seed, step).
    x = X
    if first.resolved_feedback_input == "noise":
        x = keras_wt.algorithms.stateless_normal(X.shape, first.feedback_seed()).numpy()
    model.compile(keras.optimizers.SGD(lr), keras.losses.SparseCategoricalCrossentropy(True))
    logs = model.train_on_batch(X, labels, return_dict=True)
    return w, b, first.feedback_kernel.numpy(), logs, x


@pytest.mark.parametrize("feedback, kwargs", [
    ("sa", {}), ("ia", {}), ("ia", {"feedback_input": "real"}),
    ("wm", {"feedback_input": "real"}),
    ("ia", {"feedback_input": "real", "feedback_loss": {"amp": 0.5, "sparse": 0.3, "decay": 0.2}}),
])
def test_b_steps_down_the_gradient_of_its_local_loss(feedback, kwargs):
    labels = RNG.randint(0, 3, 32)
    w, b, b_new, logs, x = _one_step(feedback, labels, **kwargs)
    coefficients = kwargs.get("feedback_loss") or dict(keras_wt.algorithms.get(feedback).local_loss)
    forms = _closed_forms(x, w, b)
    gradient = sum(c * forms[name] for name, c in coefficients.items())
    assert_allclose(b_new, b - 0.1 * gradient, rtol=1e-4, atol=1e-6)
    # The layer loss is zero-valued: the reported loss is the task's alone.
    keras.utils.set_random_seed(7)
    assert np.isfinite(logs["loss"]) and logs["loss"] > 0


def test_b_update_is_local_whatever_the_rest_of_the_network_and_the_loss():
    """B of the first layer learns from its own x, W, B only: other labels and another layer
    above leave its update unchanged (while W's update changes)."""
    _, b, first, _, _ = _one_step("ia", RNG.randint(0, 3, 32), feedback_input="real")
    _, b2, other, _, _ = _one_step("ia", np.zeros(32, int), top_units=7, feedback_input="real")
    np.testing.assert_array_equal(b, b2)
    assert_allclose(first, other, rtol=1e-6, atol=1e-7)


def test_noise_inputs_are_drawn_from_the_layer_state():
    layer = _dense("ia", feedback_input="noise")
    seed, step = layer.feedback_state.numpy()
    noise = keras_wt.algorithms.stateless_normal((32, 5), [seed, step]).numpy()
    assert_allclose(layer._local_input(tf.constant(X)), noise)
    assert abs(noise.mean()) < 0.3 and 0.8 < noise.std() < 1.2


def test_bad_local_loss_arguments_are_refused():
    with pytest.raises(ValueError, match=r"primitive 'symmetric' is not one of \('decay'"):
        wt.Dense(3, feedback="sa", feedback_loss={"symmetric": 1.0})
    with pytest.raises(ValueError, match="feedback_loss is not allowed with feedback='fa'"):
        wt.Dense(3, feedback="fa", feedback_loss={"self": 1.0})
    with pytest.raises(ValueError, match="feedback_input='real' is not allowed with feedback='kp'"):
        wt.Dense(3, feedback="kp", feedback_input="real")
    with pytest.raises(ValueError, match="must be a finite number"):
        wt.Dense(3, feedback="ia", feedback_loss={"amp": float("nan")})


def test_wm_on_real_inputs_learns_by_its_loss_not_the_mirror():
    layer = _dense("wm", feedback_input="real")
    assert layer.feedback_learning == "loss" and layer.feedback_kernel.trainable
    assert _dense("wm").feedback_learning == "mirror" and not _dense("wm").feedback_kernel.trainable
    model = keras.Sequential([keras.Input((5,)), wt.Dense(3, feedback="wm", feedback_input="real")])
    assert keras_wt.mirror.wm_layers(model) == []


# --- distribution --------------------------------------------------------------------------


@pytest.mark.parametrize("coefficients", [None, {"self": 1.0}])
def test_a_loss_learned_b_carries_the_error_before_its_update_of_the_same_step(coefficients):
    """`sa`'s B is updated by the model's optimizer in the same step in which it carries the
    error. Each step's hidden-layer update must be the one computed by hand with the B from
    before the step. (B's update once overtook the backward pass's read of B: ~12% of the steps
    used the updated B; with `self` alone, whose gradient −W does not read B, ~28%.)"""
    x = RNG.randn(64, 5).astype("float32")
    y = RNG.randint(0, 4, 64)
    for trial in range(3):
        keras.utils.set_random_seed(trial)
        model = models.get("mlp", input_shape=(5,), hidden=(6,), num_classes=4, feedback="bp",
                           output_activation=None)
        model = keras_wt.convert(model, "sa", feedback_loss=coefficients)
        model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(True))
        hidden, top = wt.feedback_layers(model)
        variables = (hidden.kernel, hidden.bias, top.kernel, top.bias, top.feedback_kernel)
        states = [[v.numpy().astype(np.float64) for v in variables]]

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                states.append([v.numpy().astype(np.float64) for v in variables])

        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
        for step in range(4):
            w1, b1, w2, b2, b2_feedback = states[step]
            xb, yb = x[16 * step:16 * (step + 1)].astype(np.float64), y[16 * step:16 * (step + 1)]
            z1 = xb @ w1 + b1
            h = 1 / (1 + np.exp(-z1)) if hidden.activation is keras.activations.sigmoid else None
            if h is None:  # the builder's hidden activation, by TensorFlow
                with tf.GradientTape() as tape:
                    z = tf.constant(z1)
                    tape.watch(z)
                    h_t = hidden.activation(z)
                h, slope = h_t.numpy(), tape.gradient(h_t, z).numpy()
            else:
                slope = h * (1 - h)
            z2 = h @ w2 + b2
            p = np.exp(z2 - z2.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            error = (p - np.eye(4)[yb]) / len(yb)
            delta = (error @ b2_feedback.T) * slope  # through B as it was before the step
            np.testing.assert_allclose(states[step + 1][0], w1 - 0.1 * xb.T @ delta,
                                       rtol=1e-4, atol=1e-6, err_msg=f"trial {trial}, step {step}")


@pytest.mark.parametrize("feedback", ["frsf", "brsf", "dfa", "sa", "ia"])
def test_two_replicas_train_like_one_device(two_cpu_strategy, feedback):
    """Under MirroredStrategy every replica keeps the same B (and state), and the weights after
    two steps are those of one device on the same batches (ia, whose B learns from noise that
    each replica draws for itself: the replicas agree with each other)."""
    y = RNG.randint(0, 4, 32)

    def train(strategy, initial=None):
        with strategy.scope():
            keras.utils.set_random_seed(11)
            model = models.get("mlp", input_shape=(5,), hidden=(6,), num_classes=4,
                               feedback=feedback, output_activation=None)
            model.compile(keras.optimizers.SGD(0.1),
                          keras.losses.SparseCategoricalCrossentropy(True))
            # The same start (W, B and any [seed, step] state) whatever else draws random
            # numbers in the process meanwhile.
            start = [w.numpy() for w in model.weights] if initial is None else initial
            model.set_weights(start)
        model.fit(X, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return model, start

    one, start = train(tf.distribute.get_strategy())
    two, _ = train(two_cpu_strategy, start)
    noise = feedback == "ia"
    for a, b in zip(one.weights, two.weights):
        first, *others = [np.asarray(v) for v in b.value.values]
        for value in others:
            np.testing.assert_array_equal(value, first, err_msg=b.path)
        if not noise:
            np.testing.assert_allclose(first, a.numpy(), rtol=1e-5, atol=1e-6, err_msg=b.path)
