"""Alignment metrics: weight, delta and gradient angles; the callback's keys in History."""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

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
