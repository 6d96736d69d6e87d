"""Alignment metrics: weight, delta and gradient angles; the callback's keys in History."""

import csv

import keras
import numpy as np
import pytest

import keras_wt
from keras_wt import alignment
from keras_wt import layers as wt
from keras_wt.callbacks import AlignmentCallback

X = np.random.RandomState(0).randn(32, 5).astype("float32")
Y = np.random.RandomState(1).randint(0, 3, 32)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(feedback):
    return keras.Sequential(
        [
            keras.Input((5,)),
            wt.Dense(7, activation="tanh", feedback=feedback),
            wt.Dense(6, activation="sigmoid", feedback=feedback),
            wt.Dense(3, feedback=feedback),
        ]
    )


def test_angle_by_hand():
    assert alignment.angle([1, 0], [0, 2]) == pytest.approx(90)
    assert alignment.angle([1, 1], [1, 0]) == pytest.approx(45)
    assert alignment.angle(np.ones((2, 2)), -np.ones(4)) == pytest.approx(180)


def test_bp_model_has_zero_angles():
    model = _model("bp")
    assert all(a == pytest.approx(0, abs=1e-3) for a in alignment.weight_angles(model).values())
    deltas = alignment.delta_angles(model, X, Y, loss=LOSS)
    assert len(deltas) == 3
    assert all(a == pytest.approx(0, abs=1e-3) for a in deltas.values())
    assert all(a == pytest.approx(0, abs=1e-3) for a in alignment.gradient_angles(model, X, Y, loss=LOSS).values())


def test_b_equal_minus_w_gives_180_degrees():
    model = _model("fa")
    for layer in wt.feedback_layers(model):
        layer.feedback_kernel.assign(-layer.kernel)
    assert all(a == pytest.approx(180, abs=1e-3) for a in alignment.weight_angles(model).values())
    assert all(r == pytest.approx(1.0) for r in alignment.norm_ratios(model).values())


def test_delta_angles_equal_a_hand_computed_backward_pass():
    model = _model("fa")
    layers = wt.feedback_layers(model)
    w = [layer.kernel.numpy().astype(np.float64) for layer in layers]
    bias = [layer.bias.numpy().astype(np.float64) for layer in layers]
    b = [layer.feedback_kernel.numpy().astype(np.float64) for layer in layers]
    x = X.astype(np.float64)
    a1 = x @ w[0] + bias[0]
    h1 = np.tanh(a1)
    a2 = h1 @ w[1] + bias[1]
    h2 = 1 / (1 + np.exp(-a2))
    a3 = h2 @ w[2] + bias[2]
    p = np.exp(a3 - a3.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d3 = (p - np.eye(3)[Y]) / len(X)
    d2_true = d3 @ w[2].T * h2 * (1 - h2)
    d1_true = d2_true @ w[1].T * (1 - h1**2)
    d2_fa = d3 @ b[2].T * h2 * (1 - h2)
    d1_fa = d2_fa @ b[1].T * (1 - h1**2)
    expected = [alignment.angle(d1_fa, d1_true), alignment.angle(d2_fa, d2_true), 0.0]
    got = alignment.delta_angles(model, X, Y, loss=LOSS)
    np.testing.assert_allclose([got[layer.name] for layer in layers], expected, atol=1e-3)
    assert expected[0] > 10
    grads = alignment.gradient_angles(model, X, Y, loss=LOSS)
    np.testing.assert_allclose(grads[layers[0].name], alignment.angle(x.T @ d1_fa, x.T @ d1_true), atol=1e-3)


def test_loss_defaults_to_the_compiled_loss():
    model = _model("ss")
    model.compile("sgd", LOSS)
    assert alignment.delta_angles(model, X, Y) == pytest.approx(alignment.delta_angles(model, X, Y, loss=LOSS))
    with pytest.raises(ValueError, match="loss"):
        alignment.delta_angles(_model("ss"), X, Y)


def test_kp_model_angles_need_no_optimizer():
    model = _model("kp")
    deltas = alignment.delta_angles(model, X, Y, loss=LOSS)
    weights = alignment.weight_angles(model)
    assert set(deltas) == set(weights) == {layer.name for layer in wt.feedback_layers(model)}
    assert all(40 < a < 140 for a in weights.values())  # B is independent of W at init


def test_callback_keys_land_in_history_and_csv(tmp_path):
    model = _model("fa")
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    path = tmp_path / "log.csv"
    history = model.fit(
        X,
        Y,
        epochs=3,
        verbose=0,
        callbacks=[AlignmentCallback(probe=(X[:8], Y[:8]), every=2), keras.callbacks.CSVLogger(str(path))],
    )
    names = [layer.name for layer in wt.feedback_layers(model)]
    for prefix in ("weight_angle", "delta_angle", "gradient_angle", "norm_ratio"):
        for name in names:
            values = history.history[f"{prefix}/{name}"]
            assert len(values) == 3
            assert np.isfinite(values[0]) and np.isnan(values[1]) and np.isfinite(values[2])
    assert history.history[f"weight_angle/{names[0]}"][2] == pytest.approx(
        alignment.weight_angles(model)[names[0]]
    )
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 3 and f"delta_angle/{names[1]}" in rows[0]


# --------------------------------------------------------------------------------------------
# Keys of nested and repeated layers; layers called several times
# --------------------------------------------------------------------------------------------


class _Block(keras.layers.Layer):
    """A custom layer holding feedback layers named alike in every block (as the `query` and
    `value` of every keras-hub Transformer block)."""

    def __init__(self, feedback="fa", twin=False, **kwargs):
        super().__init__(**kwargs)
        self.query = wt.Dense(4, feedback=feedback, name="query")
        self.value = wt.Dense(4, feedback=feedback, name="query" if twin else "value")
        self.mix = wt.Dense(4, activation="tanh", feedback=feedback, name=f"mix_{self.name}")

    def call(self, x):
        return self.mix(self.query(x) + self.value(x))


def _blocks_model(feedback="fa", twin=False):
    inputs = keras.Input((4,))
    h = _Block(feedback, name="block_0")(inputs)
    h = _Block(feedback, twin=twin, name="block_1")(h)
    return keras.Model(inputs, wt.Dense(3, feedback=feedback, name="head")(h))


def test_keys_are_layer_names_unless_shared_then_paths_of_ancestor_names():
    model = _blocks_model()
    keys = wt.feedback_keys(model)
    assert list(keys.values()) == [
        "block_0/query", "block_0/value", "mix_block_0",
        "block_1/query", "block_1/value", "mix_block_1", "head",
    ]
    assert list(keys) == wt.feedback_layers(model)
    # Every measurement and the pairs use these keys, one per layer.
    pairs = keras_wt.feedback_pairs(model)
    assert list(pairs) == list(keys.values())
    for layer, key in keys.items():
        assert pairs[key][0] is layer.kernel and pairs[key][1] is layer.feedback_kernel
    assert list(alignment.weight_angles(model)) == list(keys.values())
    assert list(alignment.norm_ratios(model)) == list(keys.values())
    assert list(alignment.delta_angles(model, X[:, :4], Y, loss=LOSS)) == list(keys.values())
    # Each key measures its own layer.
    block_1_query = model.get_layer("block_1").query
    assert alignment.weight_angles(model)["block_1/query"] == pytest.approx(
        alignment.angle(block_1_query.kernel.numpy(), block_1_query.feedback_kernel.numpy())
    )
    # Two sublayers of one parent named alike: the second (in model order) gets "#2".
    twin = _blocks_model(twin=True)
    assert list(wt.feedback_keys(twin).values())[3:5] == ["block_1/query", "block_1/query#2"]
    # A model whose feedback layers are named apart is keyed by their names.
    plain = _model("fa")
    assert list(alignment.weight_angles(plain)) == [l.name for l in wt.feedback_layers(plain)]


def test_pairs_exist_where_b_is_stored_and_used_at_any_depth():
    inner = keras.Sequential([keras.Input((5, 6)), wt.Dense(5, feedback="kp", name="inner_kp"),
                              wt.Dense(5, feedback="ss", name="inner_ss")], name="inner")
    inputs = keras.Input((5, 6))
    h = wt.Dense(6, feedback="fa", feedback_used=False, name="first")(inputs)
    h = inner(h)
    h = wt.MultiHeadAttention(2, 3, feedback="wm", name="att")(h, h)
    h = wt.Dense(4, feedback="brsf", name="brsf")(h)
    h = wt.Dense(4, feedback="frsf", name="frsf")(h)
    h = wt.Dense(4, feedback="sa", name="sa")(h)
    h = wt.Dense(4, feedback="ia", name="ia")(h)
    h = wt.Dense(4, feedback="bp", name="bp")(h)
    model = keras.Model(inputs, h)
    pairs = keras_wt.feedback_pairs(model)
    assert list(pairs) == [
        "inner_kp", "att_query", "att_key", "att_value", "att_attention_output", "frsf", "sa", "ia",
    ]
    for key, (w, b) in pairs.items():
        layer = next(l for l, k in wt.feedback_keys(model).items() if k == key)
        assert w is layer.kernel and b is layer.feedback_kernel and w.shape == b.shape


def test_a_layer_called_twice_has_one_delta_over_both_calls():
    """A shared layer's delta is the concatenation of its deltas at each call, computed here by
    hand for feedback alignment and for backprop; its kernel gradient sums over the calls."""
    shared = wt.Dense(3, activation="tanh", feedback="fa", name="shared")
    a, b = keras.Input((4,)), keras.Input((4,))
    both = keras.layers.Concatenate()([shared(a), shared(b)])
    model = keras.Model([a, b], wt.Dense(3, feedback="fa", name="out")(both))
    xa, xb = X[:, :4], X[:, 1:]
    w1, bias1 = shared.kernel.numpy().astype(np.float64), shared.bias.numpy().astype(np.float64)
    out = model.get_layer("out")
    w2, b2 = out.kernel.numpy().astype(np.float64), out.feedback_kernel.numpy().astype(np.float64)
    bias2 = out.bias.numpy().astype(np.float64)
    za, zb = xa @ w1 + bias1, xb @ w1 + bias1
    logits = np.concatenate([np.tanh(za), np.tanh(zb)], 1) @ w2 + bias2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d_out = (p - np.eye(3)[Y]) / len(X)

    def deltas(matrix):  # the deltas at the two calls of the shared layer
        d = d_out @ matrix.T
        return d[:, :3] * (1 - np.tanh(za) ** 2), d[:, 3:] * (1 - np.tanh(zb) ** 2)

    (fa_a, fa_b), (bp_a, bp_b) = deltas(b2), deltas(w2)
    expected = alignment.angle(np.concatenate([fa_a.ravel(), fa_b.ravel()]),
                               np.concatenate([bp_a.ravel(), bp_b.ravel()]))
    got = alignment.delta_angles(model, [xa, xb], Y, loss=LOSS)
    assert got["shared"] == pytest.approx(expected, abs=1e-3)
    assert abs(expected - alignment.angle(fa_b, bp_b)) > 1  # not the last call alone
    gradient = alignment.gradient_angles(model, [xa, xb], Y, loss=LOSS)["shared"]
    assert gradient == pytest.approx(
        alignment.angle(xa.T @ fa_a + xb.T @ fa_b, xa.T @ bp_a + xb.T @ bp_b), abs=1e-3
    )
