"""convert() reaches every weighted layer at any depth: sublayers of custom layers and wrappers,
composite layers replaced in their parent, subclassed models; what it converts survives saving,
and strip() takes it all back to stock Keras."""

import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from conftest import MyCell
from keras_wt import layers as wt
from keras_wt import nested
from keras_wt.convert import unconverted_layers
from keras_wt.optimizers import KolenPollack


@keras.saving.register_keras_serializable(package="test_convert_nested")
class Block(keras.layers.Layer):
    """A user's block: two Dense sublayers and a residual connection."""

    def __init__(self, width=6, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.inner = keras.layers.Dense(2 * width, activation="relu")
        self.outer = keras.layers.Dense(width)

    def call(self, x):
        return x + self.outer(self.inner(x))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


@keras.saving.register_keras_serializable(package="test_convert_nested")
class Pair(keras.layers.Layer):
    """A wrapper holding a composite layer (a separable convolution, whose twin is made of two
    feedback sublayers) in an attribute and in a list, and a Dense in a dict."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.SeparableConv1D(4, 2, padding="same")
        self.convs = [self.conv]
        self.heads = {"out": keras.layers.Dense(3)}

    def call(self, x):
        return self.heads["out"](self.convs[0](x))


X = np.random.RandomState(0).rand(8, 5, 6).astype("float32")
Y = np.random.RandomState(1).randint(0, 3, 8)


def _block_model():
    inputs = keras.Input((5, 6))
    h = keras.layers.Dense(6, name="stem")(inputs)
    h = Block(name="block")(h)
    h = keras.layers.TimeDistributed(keras.layers.Dense(4), name="per_step")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def _set_b_to_w(model):
    for layer in wt.feedback_layers(model):
        if layer.feedback_kernel is not None:
            layer.feedback_kernel.assign(layer.kernel)


def _gradients(model, x, y):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wm without a mirror: irrelevant here
        with tf.GradientTape() as tape:
            value = loss(y, model(x))
        return tape.gradient(value, model.trainable_weights)


def test_sublayers_of_custom_layers_and_wrappers_are_converted_with_identical_outputs():
    model = _block_model()
    converted = keras_wt.convert(model, "fa", strict=True)
    ours = {layer.name: layer for layer in wt.feedback_layers(converted)}
    # Sublayers of a layer that is not a graph keep their names (the keys are unique anyway).
    assert len(ours) == 5 and {"head", "stem"} < set(ours)
    keys = wt.feedback_keys(converted)
    assert len(set(keys.values())) == 5
    assert unconverted_layers(converted) == []
    block = converted.get_layer("block")
    assert isinstance(block, Block) and isinstance(block, nested.Converted)
    assert isinstance(block.inner, wt.Dense) and block.inner.feedback == "fa"
    # The wrapper's own inner layer is the promoted one: the same object it calls.
    per_step = converted.get_layer("per_step")
    assert isinstance(per_step.layer, wt.Dense) and per_step.layer.feedback_kernel is not None
    # The stem reads the model's input: its B is dropped; sublayers of a block keep theirs.
    assert ours["stem"].feedback_used is False and block.inner.feedback_used
    np.testing.assert_array_equal(model(X), converted(X))
    # The stock layers of the source are untouched.
    assert type(model.get_layer("block").inner) is keras.layers.Dense


def test_input_gradient_of_a_time_distributed_dense_goes_through_b():
    inputs = keras.Input((5, 6))
    outputs = keras.layers.TimeDistributed(keras.layers.Dense(4, use_bias=False), name="td")(inputs)
    model = keras_wt.convert(keras.Model(inputs, outputs), "fa", keep_unused_feedback=True)
    dense = model.get_layer("td").layer
    b = np.random.RandomState(3).randn(6, 4).astype("float32")
    dense.feedback_kernel.assign(b)
    x = tf.constant(X)
    dy = np.random.RandomState(4).randn(8, 5, 4).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x)
    dx = tape.gradient(y, x, output_gradients=tf.constant(dy))
    np.testing.assert_allclose(dx.numpy(), dy @ b.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y.numpy(), X @ dense.kernel.numpy(), rtol=1e-5, atol=1e-6)


def test_time_distributed_conv2d_converts_and_with_b_equal_to_w_is_backprop():
    inputs = keras.Input((3, 6, 6, 2))
    h = keras.layers.TimeDistributed(keras.layers.Conv2D(3, 3, activation="relu"))(inputs)
    h = keras.layers.TimeDistributed(keras.layers.Conv2D(2, 3))(h)
    stock = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    converted = keras_wt.convert(stock, "kp", strict=True)
    assert [type(l).__name__ for l in wt.feedback_layers(converted)] == ["Conv2D", "Conv2D", "Dense"]
    x = np.random.RandomState(5).rand(4, 3, 6, 6, 2).astype("float32")
    y = np.arange(4) % 3
    np.testing.assert_array_equal(stock(x), converted(x))
    _set_b_to_w(converted)
    for a, b in zip(_gradients(stock, x, y), _gradients(converted, x, y)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_composite_twins_replace_their_stock_layer_everywhere_the_parent_holds_it():
    inputs = keras.Input((5, 6))
    h = keras.layers.Dense(6)(inputs)
    stock = keras.Model(inputs, Pair(name="pair")(h))
    converted = keras_wt.convert(stock, "fa", strict=True)
    pair = converted.get_layer("pair")
    assert isinstance(pair.conv, wt.SeparableConv1D) and pair.convs[0] is pair.conv
    assert isinstance(pair.heads["out"], wt.Dense)
    names = [type(l).__name__ for l in wt.feedback_layers(converted)]
    assert names.count("DepthwiseConv1D") == names.count("Conv1D") == 1
    # The replaced layer's weights are the stock ones, in the stock order.
    stock_pair = stock.get_layer("pair")
    for a, b in zip(stock_pair.weights, wt.stock_weights(pair)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(stock(X), converted(X))


def test_attention_inside_a_custom_layer_is_replaced_by_the_feedback_twin():
    @keras.saving.register_keras_serializable(package="test_convert_nested")
    class Attend(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.attention = keras.layers.MultiHeadAttention(2, 3)

        def call(self, x):
            return self.attention(x, x)

    inputs = keras.Input((5, 6))
    h = keras.layers.Dense(6)(inputs)
    stock = keras.Model(inputs, Attend(name="attend")(h))
    converted = keras_wt.convert(stock, "kp", strict=True)
    attention = converted.get_layer("attend").attention
    assert isinstance(attention, wt.MultiHeadAttention)
    assert attention.query_dense.name == f"{attention.name}_query"
    np.testing.assert_array_equal(stock(X), converted(X))


def _trainable(model, feedback):
    optimizer = keras.optimizers.SGD(0.05)
    if feedback == "kp":
        optimizer = KolenPollack(optimizer, weight_decay=0.1)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("feedback", ["fa", "kp"])
def test_saved_nested_conversion_loads_with_the_same_b_and_trains_on(feedback, tmp_path):
    converted = _trainable(keras_wt.convert(_block_model(), feedback), feedback)
    converted.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    converted.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("block"), nested.Converted)
    assert [l.name for l in wt.feedback_layers(loaded)] == [l.name for l in wt.feedback_layers(converted)]
    assert len(loaded.weights) == len(converted.weights)
    for a, b in zip(converted.weights, loaded.weights):
        assert a.path.split("/")[-1] == b.path.split("/")[-1]
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(converted(X), loaded(X))
    if feedback == "kp":
        assert type(loaded.optimizer).__name__ == "KolenPollack"
    before = [w.numpy() for w in loaded.weights]
    loaded.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(before, loaded.weights))


def test_composite_replacement_survives_saving(tmp_path):
    inputs = keras.Input((5, 6))
    converted = keras_wt.convert(keras.Model(inputs, Pair(name="pair")(keras.layers.Dense(6)(inputs))), "fa")
    converted.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("pair").conv, wt.SeparableConv1D)
    for a, b in zip(converted.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(converted(X), loaded(X))


def test_reconverting_and_strip_of_nested_conversions():
    stock = _block_model()
    kp = keras_wt.convert(stock, "kp")
    fa = keras_wt.convert(kp, "fa", feedback_initializer="zeros")
    assert all(l.feedback == "fa" for l in wt.feedback_layers(fa))
    assert sorted(l.name for l in wt.feedback_layers(fa)) == sorted(l.name for l in wt.feedback_layers(kp))
    assert not any(l.feedback_kernel.numpy().any() for l in wt.feedback_layers(fa) if l.feedback_used)
    bp = keras_wt.convert(fa, "bp")
    assert all(l.feedback_kernel is None for l in wt.feedback_layers(bp))
    stripped = keras_wt.strip(kp)
    assert not any(isinstance(l, (wt.WithFeedback, nested.Converted)) for l in stripped._flatten_layers())
    assert type(stripped.get_layer("block")) is Block
    assert [w.shape for w in stripped.weights] == [w.shape for w in stock.weights]
    for m in (kp, fa, bp, stripped):
        np.testing.assert_array_equal(stock(X), m(X))


def test_strip_returns_an_uncompiled_model_that_loads_without_keras_wt(tmp_path):
    inputs = keras.Input((5, 6))
    h = keras.layers.TimeDistributed(keras.layers.Dense(4, activation="relu"))(inputs)
    stock = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    kp = _trainable(keras_wt.convert(stock, "kp"), "kp")
    kp.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    stripped = keras_wt.strip(kp)
    assert not stripped.compiled
    np.testing.assert_array_equal(kp(X), stripped(X))
    path = tmp_path / "serve.keras"
    stripped.save(path)
    np.save(tmp_path / "x.npy", X)
    code = (
        "import sys, keras, numpy as np; m = keras.saving.load_model(%r); "
        "np.save(%r, np.asarray(m(np.load(%r)))); "
        "print('keras_wt' in sys.modules, m.compiled)"
        % (str(path), str(tmp_path / "y.npy"), str(tmp_path / "x.npy"))
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(kp(X)))


def test_stripped_sequential_is_uncompiled_with_the_same_outputs():
    model = keras.Sequential([keras.Input((5, 6)), wt.Dense(4, feedback="kp"), keras.layers.Flatten(), wt.Dense(3, feedback="kp")])
    _trainable(model, "kp")
    stripped = keras_wt.strip(model)
    assert not stripped.compiled and isinstance(stripped, keras.Sequential)
    assert [type(l) for l in stripped.layers] == [keras.layers.Dense, keras.layers.Flatten, keras.layers.Dense]
    np.testing.assert_array_equal(model(X), stripped(X))


class _Net(keras.Model):
    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(units)

    def call(self, x):
        return self.out(self.hidden(x))


class _SerializableNet(_Net):
    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_subclassed_model_converts_in_place_or_through_its_own_get_config():
    x = X[:, 0]
    net = _Net()
    net(x)
    with pytest.raises(ValueError, match="in_place=True"):
        keras_wt.convert(net, "fa")
    expected = net(x)
    same = keras_wt.convert(net, "fa", in_place=True)
    assert same is net and isinstance(net.hidden, wt.Dense) and isinstance(net.out, wt.Dense)
    assert net.hidden.feedback_kernel is not None  # no graph: every B kept
    np.testing.assert_array_equal(expected, net(x))

    serializable = _SerializableNet()
    serializable(x)
    copy = keras_wt.convert(serializable, "kp")
    assert copy is not serializable and type(serializable.hidden) is keras.layers.Dense
    assert isinstance(copy, _SerializableNet) and isinstance(copy.hidden, wt.Dense)
    np.testing.assert_array_equal(serializable(x), copy(x))


def test_a_layer_converted_before_it_is_built_builds_as_its_twin():
    net = _Net()
    keras_wt.convert(net, "kp", in_place=True)
    assert isinstance(net.hidden, wt.Dense) and not net.hidden.built
    net(X[:, 0])
    assert net.hidden.feedback_kernel.shape == net.hidden.kernel.shape == (6, 8)
    assert net.hidden.feedback_input_shape == (8, 6)


def test_unconverted_layers_name_their_parent_and_the_reason():
    class MyDense(keras.layers.Dense):
        def call(self, x):
            return super().call(x) * 2.0

    @keras.saving.register_keras_serializable(package="test_convert_nested")
    class Holder(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.mine = MyDense(4)
            self.plain = keras.layers.Dense(4)

        def call(self, x):
            return self.plain(self.mine(x))

    inputs = keras.Input((5, 6))
    h = keras.layers.Bidirectional(
        keras.layers.RNN(MyCell(3), return_sequences=True, name="rnn"), name="bi")(inputs)
    h = Holder(name="holder")(h)
    model = keras.Model(inputs, h)
    with pytest.warns(UserWarning) as recorded:
        converted = keras_wt.convert(model, "fa")
    message = str([w for w in recorded if "were not converted" in str(w.message)][0].message)
    assert "3 layers that hold a kernel were not converted" in message
    assert "in 'forward_rnn' (RNN): keras_wt has no feedback twin of MyCell" in message
    assert "in 'backward_rnn' (RNN)" in message
    assert "(MyDense) in 'holder' (Holder): it is a subclass of Dense, whose call may compute" in message
    assert isinstance(converted.get_layer("holder").plain, wt.Dense)
    with pytest.raises(ValueError, match="were not converted"):
        keras_wt.convert(model, "fa", strict=True)


def test_a_composite_node_of_a_graph_cannot_be_converted_in_place_and_says_why():
    inputs = keras.Input((5, 6))
    h = keras.layers.Dense(6)(inputs)
    model = keras.Model(inputs, keras.layers.MultiHeadAttention(2, 3, name="mha")(h, h))
    with pytest.warns(UserWarning, match="'query' \\(EinsumDense\\) in 'mha' \\(MultiHeadAttention\\): "
                                         "it belongs to 'mha' .*node of the graph"):
        keras_wt.convert(model, "fa", in_place=True)
    # Without in_place, the graph is rebuilt and the attention converted.
    assert isinstance(keras_wt.convert(model, "fa").get_layer("mha"), wt.MultiHeadAttention)


def test_a_model_with_nothing_to_convert_is_refused():
    inputs = keras.Input((5, 6))
    model = keras.Model(inputs, keras.layers.RNN(MyCell(2))(inputs))
    with pytest.raises(ValueError, match="no layer could be converted.*MyCell"):
        keras_wt.convert(model, "fa")
    with pytest.raises(ValueError, match="no layer could be converted"):
        keras_wt.convert(keras.Sequential([keras.Input((3,)), keras.layers.Flatten()]), "fa")


@keras.saving.register_keras_serializable(package="test_convert_nested")
class Tower(keras.Model):
    """A Functional subclass (as keras-hub's backbones are) with its own constructor."""

    def __init__(self, width=6, **kwargs):
        inputs = keras.Input((5, width))
        h = keras.layers.Dense(width, name="first")(inputs)
        h = Block(width, name="tower_block")(h)
        super().__init__(inputs, keras.layers.Dense(width, name="last")(h), **kwargs)
        self.width = width

    def get_config(self):
        return {"width": self.width, "name": self.name}


def test_functional_subclass_keeps_its_class_alone_or_nested_in_a_graph(tmp_path):
    tower = Tower(name="tower")
    converted = keras_wt.convert(tower, "fa", strict=True)
    assert isinstance(converted, Tower) and isinstance(converted, nested.Converted)
    assert converted.get_layer("first").feedback_used is False
    names = [l.name for l in wt.feedback_layers(converted)]
    assert len(names) == 4 and names[0] == "first" and names[-1] == "last"
    # Converted in place, they keep their names; their keys are unique.
    assert names[1:3] == [l.name for l in converted.get_layer("tower_block")._flatten_layers()[1:]]
    assert len(set(wt.feedback_keys(converted).values())) == 4
    np.testing.assert_array_equal(tower(X), converted(X))

    inputs = keras.Input((5, 6))
    outer = keras.Model(inputs, keras.layers.Dense(2, name="top")(Tower(name="inner_tower")(inputs)))
    converted = keras_wt.convert(outer, "fa", strict=True)
    inner = converted.get_layer("inner_tower")
    assert isinstance(inner, Tower) and len(wt.feedback_layers(converted)) == 5
    # The nested model reads the outer input: its first layer needs no B.
    assert inner.get_layer("first").feedback_used is False
    np.testing.assert_array_equal(outer(X), converted(X))
    converted.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("inner_tower"), Tower)
    np.testing.assert_array_equal(converted(X), loaded(X))
    stripped = keras_wt.strip(converted)
    assert type(stripped.get_layer("inner_tower")) is Tower
    assert not any(isinstance(l, wt.WithFeedback) for l in stripped._flatten_layers())
    np.testing.assert_array_equal(outer(X), stripped(X))


@pytest.mark.parametrize("wrapper", ["bidirectional", "rnn"])
def test_recurrent_twins_reach_both_directions_of_a_bidirectional_and_a_generic_rnn(wrapper, tmp_path):
    inputs = keras.Input((5, 6))
    if wrapper == "bidirectional":
        lstm = keras.layers.LSTM(3, return_sequences=True, name="lstm")
        h = keras.layers.Bidirectional(lstm, name="bi")(inputs)
        expected = ["forward_lstm_input", "forward_lstm_recurrent",
                    "backward_lstm_input", "backward_lstm_recurrent"]
    else:
        cell = keras.layers.GRUCell(3, name="cell")
        h = keras.layers.RNN(cell, return_sequences=True, name="bi")(inputs)
        expected = ["cell_input", "cell_recurrent"]
    stock = keras.Model(inputs, keras.layers.Dense(2, name="top")(h))
    converted = keras_wt.convert(stock, "fa", strict=True, keep_unused_feedback=True)
    names = [layer.name for layer in wt.feedback_layers(converted)]
    assert names == expected + ["top"]
    assert all(layer.feedback_kernel is not None for layer in wt.feedback_layers(converted))
    np.testing.assert_array_equal(stock(X), converted(X))
    # With every B := W the converted model is backprop: every gradient is the stock model's.
    _set_b_to_w(converted)
    y = np.random.RandomState(1).randint(0, 2, (8, 5))
    for got, want in zip(_gradients(converted, X, y), _gradients(stock, X, y)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    converted.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert [layer.name for layer in wt.feedback_layers(loaded)] == names
    for a, b in zip(wt.feedback_layers(converted), wt.feedback_layers(loaded)):
        np.testing.assert_array_equal(a.feedback_kernel.numpy(), b.feedback_kernel.numpy())
    np.testing.assert_array_equal(converted(X), loaded(X))
    stripped = keras_wt.strip(converted)
    assert not any(isinstance(l, wt.WithFeedback) for l in stripped._flatten_layers())
    np.testing.assert_array_equal(stock(X), stripped(X))
