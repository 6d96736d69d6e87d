"""The layers beyond Dense/Conv: depthwise, transposed, 3-D, einsum, separable, attention.

For each: the input gradient is the stock layer's input gradient with `B` in place of `W`
(computed independently, by a stock layer holding `B`, and by hand where TensorFlow has the op),
the kernel gradient is the stock one, `bp` is bit for bit the stock layer, Kolen–Pollack keeps
`B − W` shrinking by `(1 − lr·λ)` for every kernel, and the weight mirror drives `B` to `W`.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from keras_wt import layers as wt
from keras_wt.alignment import angle, delta_angles, weight_angles
from keras_wt.mirror import WeightMirror
from keras_wt.optimizers import KolenPollack
from conftest import assert_allclose

STORED = ("fa", "wm", "kp")

# (id, stock class, args, kwargs, input shape, mirror P is exact in mirror.py today)
CASES = [
    ("depthwise2d", keras.layers.DepthwiseConv2D, (3,), dict(depth_multiplier=2, strides=2, padding="same"), (2, 7, 7, 3)),
    ("depthwise1d", keras.layers.DepthwiseConv1D, (3,), dict(depth_multiplier=2), (2, 9, 3)),
    ("conv2d_transpose", keras.layers.Conv2DTranspose, (4, 3), dict(strides=2, padding="same"), (2, 5, 5, 3)),
    ("conv1d_transpose", keras.layers.Conv1DTranspose, (4, 3), dict(strides=2), (2, 6, 3)),
    ("conv3d", keras.layers.Conv3D, (4, 2), dict(strides=(1, 2, 1)), (2, 4, 5, 4, 3)),
    ("conv3d_transpose", keras.layers.Conv3DTranspose, (3, 2), dict(strides=2), (2, 3, 3, 3, 2)),
    ("einsum_heads", keras.layers.EinsumDense, ("abc,cde->abde", (3, 4, 5)), dict(bias_axes="de"), (2, 3, 6)),
    ("einsum_matrix", keras.layers.EinsumDense, ("ab,bc->ac", 5), dict(bias_axes="c"), (3, 4)),
]
IDS = [case[0] for case in CASES]


def _make(case, feedback, **extra):
    _, stock_class, args, kwargs, shape = case
    layer = wt.TWINS[stock_class](*args, feedback=feedback, **kwargs, **extra)
    layer.build(shape)
    return layer


def _stock_twin(layer, kernel=None):
    """The stock layer with `layer`'s config and weights (`kernel` in place of W if given)."""
    config = {k: v for k, v in layer.get_config().items() if k not in wt.FEEDBACK_ARGUMENTS}
    stock = wt.STOCK[type(layer)].from_config(config)
    stock.build(layer.feedback_input_shape)
    for target, source in zip(stock.weights, wt.stock_weights(layer)):
        target.assign(source)
    if kernel is not None:
        stock.kernel.assign(kernel)
    return stock


def _grads(layer, x, dy=None, wrt=None):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    dy = tf.ones_like(y) * 0.5 if dy is None else dy
    grads = tape.gradient(y, [x] + list(wrt if wrt is not None else [layer.kernel]), output_gradients=dy)
    return [y] + grads


def _by_hand_input_gradient(name, layer, x, dy, b):
    """The input gradient with B, from TensorFlow's own ops (None where TF has none)."""
    if name == "depthwise2d":
        return tf.nn.depthwise_conv2d_backprop_input(x.shape, b, dy, [1, 2, 2, 1], "SAME")
    if name == "conv2d_transpose":  # the adjoint of a transposed convolution is a convolution
        return tf.nn.conv2d(dy, b, strides=2, padding="SAME")
    if name == "conv3d":
        return tf.raw_ops.Conv3DBackpropInputV2(
            input_sizes=x.shape, filter=b, out_backprop=dy, strides=[1, 1, 2, 1, 1], padding="VALID"
        )
    if name == "einsum_heads":
        return np.einsum("abde,cde->abc", dy, b)
    if name == "einsum_matrix":
        return dy @ b.T
    return None


@pytest.mark.parametrize("feedback", STORED)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_input_gradient_is_the_stock_gradient_with_b_in_place_of_w(case, feedback):
    layer = _make(case, feedback)
    rng = np.random.RandomState(0)
    x = rng.randn(*case[4]).astype("float32")
    y, _, _ = _grads(layer, x)
    dy = rng.randn(*y.shape).astype("float32")
    y, dx, dw = _grads(layer, x, dy)
    b = layer.feedback_kernel.numpy()
    assert b.shape == tuple(layer.kernel.shape) and not np.allclose(b, layer.kernel.numpy())
    stock = _stock_twin(layer)
    y_stock, dx_with_w, dw_stock = _grads(stock, x, dy)
    np.testing.assert_array_equal(y, y_stock)
    assert_allclose(dw, dw_stock, rtol=1e-4, atol=1e-5)
    _, dx_with_b, _ = _grads(_stock_twin(layer, kernel=b), x, dy)
    assert_allclose(dx, dx_with_b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(dx, dx_with_w, atol=1e-3)
    by_hand = _by_hand_input_gradient(case[0], layer, x, dy, b)
    if by_hand is not None:
        assert_allclose(dx, by_hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bp_is_bit_for_bit_the_stock_layer(case):
    layer = _make(case, "bp", activation="tanh")
    assert layer.feedback_kernel is None
    x = np.random.RandomState(1).randn(*case[4]).astype("float32")
    ours = _grads(layer, x)
    stock = _grads(_stock_twin(layer), x)
    for a, b in zip(ours, stock):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "case, fan_out",
    [
        (CASES[0], 3 * 3 * 2),  # depthwise: k·k·depth_multiplier
        (CASES[2], 3 * 3 * 4),  # transposed: k·k·filters (the kernel is (k, k, filters, in))
        (CASES[5], 2 * 2 * 2 * 3),
        (CASES[6], 4 * 5),  # einsum: the kernel's output axes
        (CASES[7], 5),
    ],
    ids=lambda c: c[0] if isinstance(c, tuple) else str(c),
)
def test_sign_symmetry_uses_each_layer_fan_out(case, fan_out):
    layer = _make(case, "ss")
    scale = math.sqrt(2.0 / fan_out)
    assert keras_wt.algorithms.sign_symmetry_scale(layer) == pytest.approx(scale)
    x = np.random.RandomState(2).randn(*case[4]).astype("float32")
    _, dx, _ = _grads(layer, x)
    expected = _grads(_stock_twin(layer, kernel=np.sign(layer.kernel.numpy()) * scale), x)[1]
    assert_allclose(dx, expected, rtol=1e-4, atol=1e-5)


def test_einsum_feedback_kernel_has_the_kernel_scale():
    """The default B of an EinsumDense is drawn like its kernel, with the same fan-in/fan-out
    axes (a VarianceScaling initializer told nothing would use the wrong ones)."""
    layer = wt.EinsumDense("abc,cde->abde", (None, 16, 32), feedback="fa")
    layer.build((None, 7, 256))
    w, b = layer.kernel.numpy(), layer.feedback_kernel.numpy()
    assert b.std() == pytest.approx(w.std(), rel=0.05)
    assert abs(np.corrcoef(w.ravel(), b.ravel())[0, 1]) < 0.05


SEPARABLE = [
    (keras.layers.SeparableConv2D, (2, 7, 7, 3), dict(strides=2, padding="same", depth_multiplier=2)),
    (keras.layers.SeparableConv1D, (2, 9, 3), dict(dilation_rate=2)),
]


def _separable(stock_class, shape, kwargs, feedback):
    layer = wt.TWINS[stock_class](4, 3, feedback=feedback, **kwargs)
    layer.build(shape)
    stock = stock_class(4, 3, **kwargs)
    stock.build(shape)
    for target, source in zip(stock.weights, wt.stock_weights(layer)):
        target.assign(source)
    return layer, stock


@pytest.mark.parametrize("stock_class, shape, kwargs", SEPARABLE, ids=["2d", "1d"])
@pytest.mark.parametrize("feedback", ["fa", "kp"])
def test_separable_sends_the_error_through_both_feedback_kernels(stock_class, shape, kwargs, feedback):
    layer, stock = _separable(stock_class, shape, kwargs, feedback)
    assert [w.name for w in wt.stock_weights(layer)] == ["kernel", "kernel", "bias"]
    assert [w.name for w in stock.weights] == ["depthwise_kernel", "pointwise_kernel", "bias"]
    depthwise, pointwise = layer.depthwise_conv, layer.pointwise_conv
    assert wt.feedback_layers(layer) == [depthwise, pointwise]
    rng = np.random.RandomState(3)
    x = tf.constant(rng.randn(*shape).astype("float32"))
    dy = tf.constant(rng.randn(*stock(x).shape).astype("float32"))
    y, dx, dw_depthwise, dw_pointwise = _grads(layer, x, dy, [layer.depthwise_kernel, layer.pointwise_kernel])
    np.testing.assert_array_equal(y, stock(x))
    # dx: the stock separable convolution's input gradient with both kernels replaced by B.
    b_depthwise, b_pointwise = depthwise.feedback_kernel, pointwise.feedback_kernel
    with_b = stock_class.from_config(stock.get_config())
    with_b.build(shape)
    for target, source in zip(with_b.weights, [b_depthwise, b_pointwise, stock.bias]):
        target.assign(source)
    assert_allclose(dx, _grads(with_b, x, dy, [])[1], rtol=1e-4, atol=1e-5)
    # dW of the pointwise kernel is the stock one; the depthwise kernel's is the stock weight
    # gradient of the depthwise convolution, for the error that reached it through B_pointwise.
    stock_grads = _grads(stock, x, dy, [stock.depthwise_kernel, stock.pointwise_kernel])
    assert_allclose(dw_pointwise, stock_grads[3], rtol=1e-4, atol=1e-5)
    d = depthwise(x)
    with tf.GradientTape() as tape:
        tape.watch(d)
        p = keras.ops.conv(d, b_pointwise, strides=1, padding="valid", data_format=layer.data_format)
    error_at_depthwise = tape.gradient(p, d, output_gradients=dy)
    with tf.GradientTape() as tape:
        out = keras.ops.depthwise_conv(
            x, stock.depthwise_kernel, layer.strides, layer.padding, dilation_rate=layer.dilation_rate
        )
    expected = tape.gradient(out, stock.depthwise_kernel, output_gradients=error_at_depthwise)
    assert_allclose(dw_depthwise, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(dw_depthwise, stock_grads[2], atol=1e-3)


@pytest.mark.parametrize("stock_class, shape, kwargs", SEPARABLE, ids=["2d", "1d"])
def test_separable_bp_is_bit_for_bit_the_stock_layer(stock_class, shape, kwargs):
    layer, stock = _separable(stock_class, shape, dict(kwargs, activation="relu"), "bp")
    x = np.random.RandomState(4).randn(*shape).astype("float32")
    ours = _grads(layer, x, wrt=[layer.depthwise_kernel, layer.pointwise_kernel, layer.bias])
    theirs = _grads(stock, x, wrt=[stock.depthwise_kernel, stock.pointwise_kernel, stock.bias])
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def _attention_pair(feedback, **kwargs):
    query = np.random.RandomState(5).randn(2, 3, 6).astype("float32")
    value = np.random.RandomState(6).randn(2, 4, 5).astype("float32")
    layer = wt.MultiHeadAttention(2, 3, value_dim=4, feedback=feedback, **kwargs)
    layer(query, value)
    stock = keras.layers.MultiHeadAttention(2, 3, value_dim=4, **kwargs)
    stock(query, value)
    for target, source in zip(stock.weights, wt.stock_weights(layer)):
        target.assign(source)
    return layer, stock, tf.constant(query), tf.constant(value)


def _attention_grads(layer, query, value, dy=None):
    with tf.GradientTape() as tape:
        tape.watch([query, value])
        y = layer(query, value)
    dy = tf.ones_like(y) if dy is None else dy
    kernels = [l.kernel for l in (layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense)]
    return [y] + tape.gradient(y, [query, value] + kernels, output_gradients=dy)


def test_attention_projections_use_b_and_the_attention_products_stay_exact():
    layer, _, query, value = _attention_pair("fa")
    names = [l.name for l in wt.feedback_layers(layer)]
    assert names == [f"{layer.name}_{p}" for p in ("query", "key", "value", "attention_output")]
    q_layer, k_layer, v_layer, o_layer = wt.feedback_layers(layer)
    dy = tf.constant(np.random.RandomState(7).randn(2, 3, 6).astype("float32"))
    y, d_query, d_value = _attention_grads(layer, query, value, dy)[:3]
    # By hand: projections with W forward, softmax(QKᵀ/√d)·V, and the error crossing each
    # projection through its B; the attention products' own gradients are exact.
    w = {l: (l.kernel, l.bias) for l in (q_layer, k_layer, v_layer, o_layer)}
    q = tf.einsum("abc,chd->abhd", query, w[q_layer][0]) + w[q_layer][1]
    k = tf.einsum("aec,chd->aehd", value, w[k_layer][0]) + w[k_layer][1]
    v = tf.einsum("aec,chf->aehf", value, w[v_layer][0]) + w[v_layer][1]

    def core(q, k, v):
        scores = tf.einsum("abhd,aehd->ahbe", q / math.sqrt(3.0), k)
        return tf.einsum("ahbe,aehf->abhf", tf.nn.softmax(scores, axis=-1), v)

    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        o = core(q, k, v)
    y_by_hand = tf.einsum("abhf,hfc->abc", o, w[o_layer][0]) + w[o_layer][1]
    assert_allclose(y, y_by_hand, rtol=1e-5, atol=1e-5)
    b = {l: l.feedback_kernel for l in (q_layer, k_layer, v_layer, o_layer)}
    d_o = tf.einsum("abc,hfc->abhf", dy, b[o_layer])
    dq, dk, dv = tape.gradient(o, [q, k, v], output_gradients=d_o)
    assert_allclose(d_query, tf.einsum("abhd,chd->abc", dq, b[q_layer]), rtol=1e-4, atol=1e-5)
    expected_value = tf.einsum("aehd,chd->aec", dk, b[k_layer]) + tf.einsum("aehf,chf->aec", dv, b[v_layer])
    assert_allclose(d_value, expected_value, rtol=1e-4, atol=1e-5)


def test_attention_bp_is_bit_for_bit_the_stock_layer():
    layer, stock, query, value = _attention_pair("bp")
    for a, b in zip(_attention_grads(layer, query, value), _attention_grads(stock, query, value)):
        np.testing.assert_array_equal(a, b)


def test_attention_with_gate_converts_its_gate_projection():
    layer, stock, query, value = _attention_pair("kp", use_gate=True)
    assert [l.name.split("_")[-1] for l in wt.feedback_layers(layer)] == ["query", "key", "gate", "value", "output"]
    np.testing.assert_array_equal(layer(query, value), stock(query, value))


def _models():
    """One small model per new layer kind (with a keras_wt Dense head), for KP and the mirror."""
    def head(inputs, h, feedback):
        h = keras.layers.Flatten()(h)
        return keras.Model(inputs, wt.Dense(3, feedback=feedback)(h))

    makers = {}
    for case in CASES:
        def make(feedback, case=case):
            _, stock_class, args, kwargs, shape = case
            kwargs = dict(kwargs, padding="valid") if "padding" in kwargs else kwargs
            inputs = keras.Input(shape[1:])
            return head(inputs, wt.TWINS[stock_class](*args, feedback=feedback, **kwargs)(inputs), feedback)
        makers[case[0]] = make
    for stock_class, shape, kwargs in SEPARABLE:
        def make(feedback, stock_class=stock_class, shape=shape, kwargs=kwargs):
            inputs = keras.Input(shape[1:])
            kwargs = dict(kwargs, padding="valid")
            return head(inputs, wt.TWINS[stock_class](4, 3, feedback=feedback, **kwargs)(inputs), feedback)
        makers[stock_class.__name__] = make

    def attention(feedback):
        inputs = keras.Input((3, 6))
        return head(inputs, wt.MultiHeadAttention(2, 3, feedback=feedback)(inputs, inputs), feedback)

    makers["attention"] = attention
    return makers


MODELS = _models()
# The number of (W, B) pairs of each model: its layer's kernels plus the head's.
PAIRS = dict({name: 2 for name in MODELS}, SeparableConv2D=3, SeparableConv1D=3, attention=5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_kolen_pollack_keeps_every_kernel_pair_in_step(name):
    model = MODELS[name]("kp")
    pairs = [(l.kernel, l.feedback_kernel) for l in wt.feedback_layers(model)]
    assert len(pairs) == PAIRS[name]
    optimizer = KolenPollack(keras.optimizers.SGD(0.05, momentum=0.9), weight_decay=0.3)
    rng = np.random.RandomState(8)
    x = rng.randn(4, *model.input_shape[1:]).astype("float32")
    y = rng.randn(4, 3).astype("float32")
    before = [b.numpy() - w.numpy() for w, b in pairs]
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        after = [b.numpy() - w.numpy() for w, b in pairs]
        for a, b in zip(before, after):
            np.testing.assert_allclose(b, (1 - 0.05 * 0.3) * a, rtol=0, atol=2e-6)
        before = after
    assert {id(w) for w, _ in optimizer.kp_pairs} == {id(w) for w, _ in pairs}
    for w, b in pairs:  # W moved, so the invariant was not trivially met
        assert np.abs(w.numpy() - b.numpy()).max() > 0


def _mirror(model):
    """150 mirror steps of every `wm` layer but the Dense head, with W fixed."""
    layers = wt.feedback_layers(model)[:-1]
    mirror = WeightMirror(layers, learning_rate=0.1, noise_std=1.0, decay=0.5, batch_size=64)
    for counter in range(150):
        mirror(counter)
    return mirror


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mirror_aligns_b_with_w(name):
    model = MODELS[name]("wm")
    assert min(weight_angles(model).values()) > 45
    mirror = _mirror(model)
    assert len(mirror.layers) == PAIRS[name] - 1
    angles = {l.name: angle(l.kernel.numpy(), l.feedback_kernel.numpy()) for l in mirror.layers}
    assert max(angles.values()) < 5, angles


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mirror_fixed_point_is_sigma_squared_over_lambda_times_w(name):
    """The mirror divides each kernel entry's step by the real-input positions it sees
    (`keras_wt.mirror.link_counts`, from the layer's own op), so `B → (σ²/λ)·W` for depthwise,
    transposed, multi-axis einsum and separable kernels as for Dense and Conv."""
    model = MODELS[name]("wm")
    for layer in _mirror(model).layers:
        ratio = np.linalg.norm(layer.feedback_kernel.numpy()) / np.linalg.norm(layer.kernel.numpy())
        assert ratio == pytest.approx(1.0 / 0.5, rel=0.1), layer.name


def test_alignment_reports_every_kernel_of_every_new_layer():
    inputs = keras.Input((6, 6, 2))
    h = wt.SeparableConv2D(4, 3, activation="relu", feedback="fa")(inputs)
    h = wt.DepthwiseConv2D(2, activation="relu", feedback="fa")(h)
    h = keras.layers.Reshape((9, 4))(h)
    h = wt.MultiHeadAttention(2, 3, feedback="fa")(h, h)
    outputs = wt.Dense(3, feedback="fa")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    names = [l.name for l in wt.feedback_layers(model)]
    assert len(names) == len(set(names)) == 2 + 1 + 4 + 1
    x = np.random.RandomState(9).randn(8, 6, 6, 2).astype("float32")
    y = np.random.RandomState(10).randint(0, 3, 8)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = weight_angles(model)
    deltas = delta_angles(model, x, y, loss=loss)
    assert list(weights) == list(deltas) == names
    assert deltas[names[-1]] == pytest.approx(0, abs=1e-3)  # the top layer's delta is exact
    assert all(deltas[n] > 1 for n in names[:-1])
    bp = keras_wt.convert(model, "bp")
    assert max(delta_angles(bp, x, y, loss=loss).values()) < 1e-2
    # B of every layer is its own, unrelated to its W.
    assert all(a > 45 for a in weights.values())
    assert angle(model.weights[0].numpy(), model.weights[0].numpy()) == pytest.approx(0, abs=1e-4)


def test_new_layers_save_and_load_with_every_feedback_kernel(tmp_path):
    inputs = keras.Input((6, 6, 2))
    h = wt.SeparableConv2D(4, 3, feedback="wm")(inputs)
    h = wt.Conv2DTranspose(3, 2, feedback="kp")(h)
    h = wt.DepthwiseConv2D(2, feedback="fa")(h)
    h = keras.layers.Reshape((16, 3))(h)
    h = wt.MultiHeadAttention(2, 3, feedback="kp")(h, h)
    outputs = wt.EinsumDense("abc,cd->abd", (None, 2), feedback="ss")(h)
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert [(l.name, l.feedback) for l in wt.feedback_layers(loaded)] == [
        (l.name, l.feedback) for l in wt.feedback_layers(model)
    ]
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = np.random.RandomState(11).randn(2, 6, 6, 2).astype("float32")
    np.testing.assert_array_equal(model(x), loaded(x))


@pytest.mark.parametrize("cls", [c for c in wt.TWINS.values() if c not in (wt.Dense, wt.Conv1D, wt.Conv2D)])
def test_config_round_trips_with_the_feedback_arguments(cls):
    stock = wt.STOCK[cls]
    args = {
        keras.layers.EinsumDense: ("ab,bc->ac", 4),
        keras.layers.MultiHeadAttention: (2, 3),
    }.get(stock, (4, 3) if "Depthwise" not in stock.__name__ else (3,))
    if stock.__name__ in ("SimpleRNN", "LSTM", "GRU", "SimpleRNNCell", "LSTMCell", "GRUCell"):
        args = (4,)  # units
    layer = cls(*args, feedback="ss", feedback_scale=0.3)
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert clone.feedback == "ss" and clone.feedback_scale == 0.3
    stock_config = {k: v for k, v in config.items() if k not in wt.FEEDBACK_ARGUMENTS}
    assert stock.from_config(stock_config).get_config() == stock_config


@pytest.mark.parametrize("name", ["depthwise2d", "conv2d_transpose", "conv3d_transpose", "einsum_heads", "SeparableConv2D", "attention"])
def test_gradients_under_xla_equal_eager(name):
    model = MODELS[name]("fa")
    x = tf.constant(np.random.RandomState(12).randn(2, *model.input_shape[1:]).astype("float32"))

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
        return tape.gradient(y, [x] + model.trainable_variables, output_gradients=tf.ones_like(y))

    for a, b in zip(grads(x), tf.function(grads, jit_compile=True)(x)):
        assert_allclose(a, b, rtol=1e-4, atol=1e-5)
