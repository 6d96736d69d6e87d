"""convert(): every Dense/Conv swapped, everything else untouched, outputs identical."""

import logging

import keras
import numpy as np
import pytest

import keras_wt
from keras_wt import layers as wt


def test_resnet50_converts_completely_with_identical_outputs(caplog):
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    with caplog.at_level(logging.INFO, logger="keras_wt"):
        converted = keras_wt.convert(model, feedback="kp")
    stock = [l for l in model._flatten_layers() if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
    ours = wt.feedback_layers(converted)
    assert len(stock) == len(ours) == 54
    assert all(layer.feedback == "kp" and layer.feedback_kernel is not None for layer in ours)
    others = [l for l in converted._flatten_layers() if not isinstance(l, wt.FeedbackLayer)]
    assert not any(isinstance(l, (keras.layers.Conv2D, keras.layers.Dense)) for l in others)
    assert "54 layers converted (53 Conv2D, 1 Dense)" in caplog.text
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    np.testing.assert_array_equal(model(x, training=False), converted(x, training=False))


def test_nested_models_and_other_layers():
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dropout(0.1)], name="inner")
    inputs = keras.Input((4, 3))
    h = keras.layers.Conv1D(8, 2, padding="causal")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(8)(h)
    outputs = inner(h)
    model = keras.Model(inputs, outputs)
    converted = keras_wt.convert(model, "fa", feedback_initializer="zeros")
    ours = wt.feedback_layers(converted)
    assert sorted(type(l).__name__ for l in ours) == ["Conv1D", "Dense", "Dense"]
    assert all(np.all(l.feedback_kernel.numpy() == 0) for l in ours)
    x = np.random.rand(3, 4, 3).astype("float32")
    np.testing.assert_allclose(model(x), converted(x), rtol=1e-6)
    fresh = keras_wt.convert(model, "ss", copy_weights=False)
    assert not np.allclose(model(x), fresh(x))


def test_subclassed_model_is_refused_with_advice():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(ValueError, match="subclassed"):
        keras_wt.convert(Net(), "fa")


def test_unknown_feedback_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not one of"):
        keras_wt.convert(model, "backprop")
