"""The feedback layers: input gradient through B, stock W gradient, stock forward."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from keras_wt import layers as wt
from conftest import assert_allclose

STORED = ("fa", "wm", "kp")


def _grads(layer, x, dy):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    dx, dw = tape.gradient(y, [x, layer.kernel], output_gradients=dy)
    return y, dx, dw


def _stock_twin(layer):
    config = layer.get_config()
    for key in wt.FEEDBACK_ARGUMENTS:
        config.pop(key)
    stock = {wt.Dense: keras.layers.Dense, wt.Conv1D: keras.layers.Conv1D, wt.Conv2D: keras.layers.Conv2D}
    twin = stock[type(layer)].from_config(config)
    twin.build(layer.feedback_input_shape)
    twin.kernel.assign(layer.kernel)
    if layer.use_bias:
        twin.bias.assign(layer.bias)
    return twin


@pytest.mark.parametrize("feedback", STORED)
def test_dense_input_gradient_is_dy_times_b_transposed(feedback):
    layer = wt.Dense(5, feedback=feedback, activation=None)
    x = np.random.randn(7, 4).astype("float32")
    dy = np.random.randn(7, 5).astype("float32")
    layer.build((None, 4))
    y, dx, dw = _grads(layer, x, dy)
    w, b = layer.kernel.numpy(), layer.feedback_kernel.numpy()
    assert not np.allclose(w, b)
    assert_allclose(y, x @ w + layer.bias.numpy())
    assert_allclose(dx, dy @ b.T)
    assert_allclose(dw, x.T @ dy)


def test_dense_on_rank3_inputs_uses_b_for_every_position():
    layer = wt.Dense(3, feedback="fa")
    x = np.random.randn(2, 6, 4).astype("float32")
    dy = np.random.randn(2, 6, 3).astype("float32")
    layer.build((None, 6, 4))
    _, dx, dw = _grads(layer, x, dy)
    b = layer.feedback_kernel.numpy()
    assert_allclose(dx, dy @ b.T)
    assert_allclose(dw, np.einsum("bti,bto->io", x, dy), rtol=1e-4)


CONV2D_CASES = [
    dict(strides=1, padding="valid"),
    dict(strides=2, padding="same"),
    dict(strides=(2, 1), padding="valid"),
    dict(strides=1, padding="same", dilation_rate=2),
    dict(strides=1, padding="same", groups=2),
]


@pytest.mark.parametrize("feedback", STORED)
@pytest.mark.parametrize("case", CONV2D_CASES, ids=lambda c: str(c))
def test_conv2d_input_gradient_is_transposed_convolution_with_b(feedback, case):
    layer = wt.Conv2D(4, 3, feedback=feedback, **case)
    x = np.random.randn(2, 9, 8, 4).astype("float32")
    layer.build(x.shape)
    y = layer(x)
    dy = np.random.randn(*y.shape).astype("float32")
    _, dx, dw = _grads(layer, x, dy)
    # Independent path: the stock layer's own input gradient, with its kernel set to B, is
    # conv2d_backprop_input(dy, B); its kernel gradient with W is the stock one.
    stock = _stock_twin(layer)
    _, dx_with_w, dw_stock = _grads(stock, x, dy)
    stock.kernel.assign(layer.feedback_kernel)
    _, dx_with_b, _ = _grads(stock, x, dy)
    assert_allclose(dx, dx_with_b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(dx, dx_with_w, atol=1e-3)
    assert_allclose(dw, dw_stock, rtol=1e-4, atol=1e-5)
    if case.get("groups", 1) == 1 and case.get("dilation_rate", 1) == 1:
        strides = case["strides"] if isinstance(case["strides"], tuple) else (case["strides"],) * 2
        by_hand = tf.nn.conv2d_transpose(
            dy, layer.feedback_kernel, x.shape, strides=strides, padding=case["padding"].upper()
        )
        assert_allclose(dx, by_hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("feedback", STORED)
@pytest.mark.parametrize(
    "case",
    [dict(strides=1, padding="valid"), dict(strides=2, padding="same"), dict(padding="causal", dilation_rate=2)],
    ids=str,
)
def test_conv1d_input_gradient_is_transposed_convolution_with_b(feedback, case):
    layer = wt.Conv1D(3, 3, feedback=feedback, **case)
    x = np.random.randn(2, 11, 2).astype("float32")
    layer.build(x.shape)
    y = layer(x)
    dy = np.random.randn(*y.shape).astype("float32")
    _, dx, dw = _grads(layer, x, dy)
    stock = _stock_twin(layer)
    assert_allclose(stock(x), y)
    _, _, dw_stock = _grads(stock, x, dy)
    stock.kernel.assign(layer.feedback_kernel)
    _, dx_with_b, _ = _grads(stock, x, dy)
    assert_allclose(dx, dx_with_b, rtol=1e-4, atol=1e-5)
    assert_allclose(dw, dw_stock, rtol=1e-4, atol=1e-5)
    if case.get("padding") == "valid":
        # By hand: dx[t + k] += dy[t] · B[k]ᵀ.
        b = layer.feedback_kernel.numpy()
        expected = np.zeros_like(x)
        for t in range(dy.shape[1]):
            for k in range(3):
                expected[:, t + k] += dy[:, t] @ b[k].T
        assert_allclose(dx, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda fb: wt.Dense(4, activation="tanh", feedback=fb), (3, 5)),
        (lambda fb: wt.Conv1D(4, 3, strides=2, padding="same", feedback=fb), (2, 9, 3)),
        (lambda fb: wt.Conv2D(4, 3, padding="same", activation="relu", feedback=fb), (2, 6, 6, 3)),
    ],
)
def test_bp_is_bit_for_bit_the_stock_layer(make, shape):
    layer = make("bp")
    x = np.random.randn(*shape).astype("float32")
    layer.build(shape)
    assert layer.feedback_kernel is None
    stock = _stock_twin(layer)
    y, dx, dw = _grads(layer, x, tf.ones_like(layer(x)))
    y_s, dx_s, dw_s = _grads(stock, x, tf.ones_like(layer(x)))
    np.testing.assert_array_equal(y, y_s)
    np.testing.assert_array_equal(dx, dx_s)
    np.testing.assert_array_equal(dw, dw_s)


def test_sign_symmetry_uses_sign_of_the_current_kernel():
    layer = wt.Dense(6, feedback="ss")
    layer.build((None, 4))
    assert layer.feedback_kernel is None
    x = np.random.randn(5, 4).astype("float32")
    dy = np.random.randn(5, 6).astype("float32")
    scale = np.sqrt(2.0 / 6)
    _, dx, _ = _grads(layer, x, dy)
    assert_allclose(dx, dy @ (np.sign(layer.kernel.numpy()) * scale).T)
    layer.kernel.assign(-layer.kernel)  # B follows W's signs at every step
    _, dx, _ = _grads(layer, x, dy)
    assert_allclose(dx, dy @ (np.sign(layer.kernel.numpy()) * scale).T)

    conv = wt.Conv2D(5, 3, feedback="ss", feedback_scale=0.5)
    conv.build((None, 6, 6, 2))
    x = np.random.randn(1, 6, 6, 2).astype("float32")
    dy = np.random.randn(1, 4, 4, 5).astype("float32")
    _, dx, _ = _grads(conv, x, dy)
    by_hand = tf.nn.conv2d_transpose(dy, np.sign(conv.kernel.numpy()) * 0.5, x.shape, 1, "VALID")
    assert_allclose(dx, by_hand, rtol=1e-4, atol=1e-5)


def test_sign_symmetry_default_scale_uses_conv_fan_out():
    conv = wt.Conv2D(8, (3, 2), feedback="ss")
    conv.build((None, 6, 6, 4))
    assert keras_wt.algorithms.sign_symmetry_scale(conv) == pytest.approx(np.sqrt(2 / (3 * 2 * 8)))


@pytest.mark.parametrize("feedback", keras_wt.ALGORITHMS)
def test_hidden_layers_of_a_three_layer_net_get_nonzero_gradients(feedback):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            wt.Dense(8, activation="relu", feedback=feedback),
            wt.Dense(8, activation="relu", feedback=feedback),
            wt.Dense(3, feedback=feedback),
        ]
    )
    model = keras_wt.dfa.maybe_direct(model, feedback)  # dfa: the output error's route
    x = np.random.randn(16, 6).astype("float32")
    with tf.GradientTape() as tape:
        # model.losses: the local alignment losses of sa and ia, B's only gradient.
        loss = tf.reduce_mean(tf.square(model(x) - 1.0)) + sum(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    for variable, grad in zip(model.trainable_variables, grads):
        assert grad is not None, variable.path
        assert np.abs(grad.numpy()).max() > 0, variable.path


def test_unknown_algorithm_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"feedback='kpp' is not one of \('bp', 'fa', 'ss', 'wm', 'kp', 'frsf'"):
        wt.Dense(3, feedback="kpp")


def test_feedback_initializer_is_used_and_default_is_independent_of_a_seeded_kernel():
    layer = wt.Dense(50, feedback="fa", feedback_initializer=keras.initializers.Constant(0.25))
    layer.build((None, 40))
    assert np.all(layer.feedback_kernel.numpy() == 0.25)
    seeded = wt.Dense(50, feedback="fa", kernel_initializer=keras.initializers.GlorotUniform(seed=3))
    seeded.build((None, 40))
    w, b = seeded.kernel.numpy(), seeded.feedback_kernel.numpy()
    assert abs(np.corrcoef(w.ravel(), b.ravel())[0, 1]) < 0.1
    assert b.std() == pytest.approx(w.std(), rel=0.1)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_policies(policy):
    keras.mixed_precision.set_global_policy(policy)
    layer = wt.Conv2D(4, 3, feedback="fa")
    x = tf.random.normal((2, 6, 6, 3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    dx, dw = tape.gradient(y, [x, layer.kernel], output_gradients=tf.ones_like(y))
    assert y.dtype == keras.mixed_precision.global_policy().compute_dtype
    assert layer.feedback_kernel.dtype == "float32" and dw.dtype == tf.float32
    keras.mixed_precision.set_global_policy("float32")
    stock = _stock_twin(layer)
    stock.kernel.assign(layer.feedback_kernel)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y32 = stock(x)
    expected = tape.gradient(y32, x, output_gradients=tf.ones_like(y32))
    assert_allclose(tf.cast(dx, tf.float32), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("feedback", keras_wt.ALGORITHMS)
def test_gradients_under_xla_equal_eager(feedback):
    layer = wt.Conv2D(3, 3, strides=2, padding="same", feedback=feedback)
    x = tf.random.normal((2, 7, 7, 2))
    layer.build(x.shape)

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, [x, layer.kernel], output_gradients=tf.ones_like(y) * 0.5)

    start = [w.numpy() for w in layer.weights]
    eager = grads(x)
    for w, value in zip(layer.weights, start):  # brsf's step, advanced by the backward pass
        w.assign(value)
    compiled = tf.function(grads, jit_compile=True)(x)
    for a, b in zip(eager, compiled):
        assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls, args", [(wt.Dense, (4,)), (wt.Conv1D, (4, 3)), (wt.Conv2D, (4, 3))])
def test_get_config_round_trips(cls, args):
    layer = cls(*args, feedback="ss", feedback_scale=0.3, activation="relu", use_bias=False)
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert clone.feedback == "ss" and clone.feedback_scale == 0.3 and not clone.use_bias
    fa = cls(*args, feedback="fa", feedback_initializer="he_normal")
    clone = cls.from_config(fa.get_config())
    assert isinstance(clone.feedback_initializer, keras.initializers.HeNormal)
