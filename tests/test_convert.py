"""convert(): every weighted layer swapped, everything else untouched, outputs identical; strip()."""

import logging
import warnings

import keras
import numpy as np
import pytest

import keras_wt
from conftest import MyCell
from keras_wt import layers as wt


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
    # The convolution reads the input: no gradient uses its B, which is not stored.
    unused = [l for l in ours if not l.feedback_used]
    assert [type(l).__name__ for l in unused] == ["Conv1D"] and unused[0].feedback_kernel is None
    assert all(np.all(l.feedback_kernel.numpy() == 0) for l in ours if l.feedback_used)
    kept = keras_wt.convert(model, "fa", keep_unused_feedback=True)
    assert all(l.feedback_used and l.feedback_kernel is not None for l in wt.feedback_layers(kept))
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


def _kernel_layers(model):
    """Leaf layers holding a weight named like a kernel, found without keras_wt's helpers."""
    found = []

    def visit(layer):
        children = layer.layers if isinstance(layer, keras.Model) else []
        for child in children:
            visit(child)
        if isinstance(layer, keras.layers.MultiHeadAttention):
            found.extend([layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense])
        elif not children and any("kernel" in w.name for w in layer.weights):
            found.append(layer)

    visit(model)
    return found


def _no_unconverted_warning(recorded):
    return not [w for w in recorded if "were not converted" in str(w.message)]


ZOO = ["ResNet50", "MobileNetV2", "EfficientNetB0", "DenseNet121", "VGG16", "ConvNeXtTiny"]


@pytest.mark.parametrize("name", ZOO)
def test_keras_applications_convert_completely_with_identical_outputs(name, caplog):
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10)
    with warnings.catch_warnings(record=True) as recorded, caplog.at_level(logging.INFO, logger="keras_wt"):
        warnings.simplefilter("always")
        converted = keras_wt.convert(model, "fa", strict=True)
    assert _no_unconverted_warning(recorded)
    if name == "ResNet50":
        assert "54 layers converted (53 Conv2D, 1 Dense)" in caplog.text
    stock = _kernel_layers(model)
    ours = wt.feedback_layers(converted)
    assert len(ours) == len(stock) > 10
    assert [type(l).__name__ for l in ours] == [type(l).__name__ for l in stock]
    assert all(l.feedback == "fa" for l in ours)
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    np.testing.assert_array_equal(model(x, training=False), converted(x, training=False))


def _transformer(num_heads=2):
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 8)(inputs)
    a = keras.layers.MultiHeadAttention(num_heads, 4, name="attention")(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    h = h + keras.layers.Dense(8)(keras.layers.Dense(16, activation="gelu")(h))
    h = keras.layers.EinsumDense("abc,cd->abd", (None, 8), bias_axes="d")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


TOKENS = np.random.RandomState(1).randint(0, 20, (4, 5))


def test_attention_model_converts_every_projection_with_identical_outputs():
    model = _transformer()
    # Every projection of the stock attention names its kernel "kernel".
    assert [w.name for w in model.get_layer("attention").weights].count("kernel") == 4
    converted = keras_wt.convert(model, "kp", strict=True)
    ours = wt.feedback_layers(converted)
    assert [type(l).__name__ for l in ours] == ["EinsumDense"] * 4 + ["Dense", "Dense", "EinsumDense", "Dense"]
    assert isinstance(converted.get_layer("attention"), wt.MultiHeadAttention)
    assert len(ours) == len(_kernel_layers(model))
    np.testing.assert_array_equal(model(TOKENS), converted(TOKENS))


def test_conversions_round_trip_between_algorithms_and_back_to_stock():
    model = _transformer()
    expected = model(TOKENS)
    kp = keras_wt.convert(model, "kp")
    fa = keras_wt.convert(kp, "fa", feedback_initializer="zeros")
    assert all(l.feedback == "fa" and not l.feedback_kernel.numpy().any() for l in wt.feedback_layers(fa))
    wm = keras_wt.convert(fa, "wm")
    bp = keras_wt.convert(wm, "bp")
    for m in (kp, fa, wm, bp):
        np.testing.assert_array_equal(expected, m(TOKENS))
    # bp drops every B: its weights are the stock model's, in the stock order.
    assert all(l.feedback_kernel is None for l in wt.feedback_layers(bp))
    assert [w.shape for w in bp.weights] == [w.shape for w in model.weights]
    for a, b in zip(model.weights, bp.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert len(kp.weights) == len(model.weights) + 8


def test_strip_returns_stock_layers_with_identical_outputs(tmp_path):
    kp = keras_wt.convert(_transformer(), "kp")
    stripped = keras_wt.strip(kp)
    np.testing.assert_array_equal(kp(TOKENS), stripped(TOKENS))
    layers = [l for l in stripped._flatten_layers()]
    assert not any(isinstance(l, wt.WithFeedback) for l in layers)
    assert not any("feedback" in w.path for w in stripped.weights)
    assert isinstance(stripped.get_layer("attention"), keras.layers.MultiHeadAttention)
    assert "keras_wt" not in stripped.to_json()
    stripped.save(tmp_path / "served.keras")
    loaded = keras.saving.load_model(tmp_path / "served.keras", custom_objects={})
    np.testing.assert_array_equal(kp(TOKENS), loaded(TOKENS))


class _MyDense(keras.layers.Dense):
    """A user subclass of Dense: its call may differ, so convert must not replace it."""


def test_unconverted_kernel_layers_are_named_in_a_warning_or_refused_when_strict():
    inputs = keras.Input((4, 3))
    # A user's cell in a generic RNN wrapper (keras_wt converts the stock cells there).
    h = keras.layers.RNN(MyCell(5), return_sequences=True)(inputs)
    h = keras.layers.Conv1D(4, 2)(h)
    h = _MyDense(3)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    with pytest.warns(UserWarning, match=r"2 layers that hold a kernel were not converted .*: 1 MyCell, 1 _MyDense"):
        converted = keras_wt.convert(model, "fa")
    assert [type(l).__name__ for l in wt.feedback_layers(converted)] == ["Conv1D", "Dense"]
    assert len([l for l in converted.layers if type(l) is _MyDense]) == 1
    x = np.random.RandomState(2).rand(2, 4, 3).astype("float32")
    np.testing.assert_array_equal(model(x), converted(x))
    with pytest.raises(ValueError, match="1 MyCell, 1 _MyDense"):
        keras_wt.convert(model, "fa", strict=True)


def test_convert_refuses_unknown_layer_arguments():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="'feedback_initializer', 'feedback_scale', 'feedback_input'"):
        keras_wt.convert(model, "fa", feedback_init="zeros")
