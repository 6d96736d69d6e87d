"""Feedback that no gradient uses (the layers reading the model's input) is not stored, updated or
mirrored, and training is bit for bit what it is with that B kept."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from keras_wt import layers as wt
from keras_wt.callbacks import MirrorCallback
from keras_wt.optimizers import KolenPollack
from keras_wt.unused_feedback import drop_unused_feedback, unused_feedback_layers

X = np.random.RandomState(0).rand(48, 6, 4).astype("float32")
Y = np.random.RandomState(1).randint(0, 3, 48)


def _names(layers):
    return [layer.name for layer in layers]


def test_detection_follows_the_graph():
    a = keras.Input((8, 8, 1), name="a")
    b = keras.Input((5,), name="b")
    h = keras.layers.Rescaling(1 / 255)(a)
    h = keras.layers.ZeroPadding2D(1)(h)
    h = wt.Conv2D(2, 3, feedback="fa", name="stem")(h)               # input through weightless layers
    h = keras.layers.BatchNormalization()(h)
    h = wt.Conv2D(2, 3, feedback="fa", name="after_bn")(h)           # below it: batch norm's weights
    h = keras.layers.Flatten()(h)
    g = wt.Dense(3, feedback="kp", name="side")(b)                    # reads the second input
    merged = keras.layers.Concatenate()([keras.layers.Flatten()(a), g])
    m = wt.Dense(3, feedback="kp", name="merged")(merged)             # one parent carries weights
    out = wt.Dense(2, feedback="wm", name="out")(keras.layers.Concatenate()([h, m]))
    model = keras.Model([a, b], out)
    assert sorted(_names(unused_feedback_layers(model))) == ["side", "stem"]

    seq = keras.Sequential([keras.Input((6, 4)), keras.layers.Flatten(), keras.layers.Dropout(0.1),
                            wt.Dense(5, feedback="fa", name="first"), wt.Dense(2, feedback="fa")])
    assert _names(unused_feedback_layers(seq)) == ["first"]
    # A frozen layer below counts as weighted (it may be unfrozen later); a nested model whose
    # input carries no error is searched.
    frozen = keras.layers.Dense(4)
    frozen.trainable = False
    seq2 = keras.Sequential([keras.Input((4,)), frozen, wt.Dense(2, feedback="fa")])
    assert unused_feedback_layers(seq2) == []
    inner = keras.Sequential([keras.Input((24,)), wt.Dense(3, feedback="fa", name="inner_first"),
                              wt.Dense(2, feedback="fa")])
    nested = keras.Sequential([keras.Input((6, 4)), keras.layers.Flatten(), inner])
    assert _names(unused_feedback_layers(nested)) == ["inner_first"]


def test_subclassed_model_keeps_every_b():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.first = wt.Dense(3, feedback="fa")

        def call(self, x):
            return self.first(x)

    net = Net()
    net(np.zeros((1, 4), "float32"))
    assert drop_unused_feedback(net) == [] and net.first.feedback_kernel is not None


def test_dropped_layer_computes_no_input_gradient_and_the_stock_kernel_gradient():
    layer = wt.Dense(3, feedback="fa", feedback_used=False)
    x = tf.constant(np.random.RandomState(2).randn(5, 4), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.constant(np.arange(15.0).reshape(5, 3), tf.float32))
    assert layer.feedback_kernel is None and len(layer.weights) == 2
    assert tape.gradient(loss, x) is None
    dy = np.arange(15.0).reshape(5, 3)
    np.testing.assert_allclose(tape.gradient(loss, layer.kernel), x.numpy().T @ dy, rtol=1e-5)
    with pytest.raises(ValueError, match="feedback_used"):
        wt.Dense(3, feedback_used="no")


def _mlp(feedback, drop):
    model = keras_wt.models.mlp(input_shape=(6, 4), hidden=(7, 5), num_classes=3, feedback=feedback, seed=3)
    if drop:
        assert _names(drop_unused_feedback(model)) == ["hidden_1"]
    return model


def _train(feedback, drop, epochs=2, model=None):
    if model is None:
        model = _mlp(feedback, drop)
        inner = keras.optimizers.SGD(0.1, momentum=0.9)
        optimizer = KolenPollack(inner, weight_decay=0.05) if feedback == "kp" else inner
        model.compile(optimizer, keras_wt.models.reference_loss(), steps_per_execution=2)
    callbacks = []
    if feedback == "wm":
        callbacks = [MirrorCallback(0.1, 1.0, decay=0.5, batch_size=8, warmup_steps=3)]
    model.fit(X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return model


def _weights(model):
    return {w.path: w.numpy() for w in model.weights}


@pytest.mark.parametrize("feedback", ["kp", "wm"])
def test_training_is_bit_for_bit_the_same_without_the_unused_b(feedback):
    kept, dropped = _weights(_train(feedback, False)), _weights(_train(feedback, True))
    assert set(kept) - set(dropped) == {"hidden_1/feedback_kernel"}
    assert set(dropped) <= set(kept)
    for path, value in dropped.items():
        np.testing.assert_array_equal(value, kept[path], err_msg=path)
    # Something trained (B of the layers above, and W of the first layer, decayed by kp).
    start = _weights(_mlp(feedback, True))
    assert not np.array_equal(start["hidden_2/feedback_kernel"], dropped["hidden_2/feedback_kernel"])
    assert not np.array_equal(start["hidden_1/kernel"], dropped["hidden_1/kernel"])


def test_alignment_reports_no_feedback_for_the_dropped_layer():
    model = _mlp("fa", True)
    model.compile("sgd", keras_wt.models.reference_loss())
    metrics = keras_wt.alignment.alignment_metrics(model, X[:16], Y[:16])
    assert "weight_angle/hidden_1" not in metrics and "norm_ratio/hidden_1" not in metrics
    assert np.isfinite(metrics["weight_angle/hidden_2"])
    # Its delta depends on the B above it, and is measured.
    assert 0 < metrics["delta_angle/hidden_1"] < 180


def test_keras_file_round_trip_and_resume_keep_the_layer_without_b(tmp_path):
    model = _train("kp", True, epochs=1)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    first = loaded.get_layer("hidden_1")
    assert first.feedback_used is False and first.feedback_kernel is None
    assert _weights(loaded).keys() == _weights(model).keys()
    for key, value in _weights(model).items():
        np.testing.assert_array_equal(_weights(loaded)[key], value)
    # Training the reloaded model one more epoch continues exactly as training on would.
    _train("kp", True, epochs=1, model=loaded)
    _train("kp", True, epochs=1, model=model)
    for key, value in _weights(model).items():
        np.testing.assert_array_equal(_weights(loaded)[key], value, err_msg=key)


def test_weights_saved_with_the_unused_b_load_into_a_model_without_it(tmp_path):
    kept = _mlp("fa", False)
    path = str(tmp_path / "kept.weights.h5")
    kept.save_weights(path)
    dropped = _mlp("fa", True)
    for w in dropped.weights:
        w.assign(np.zeros(w.shape, w.dtype))
    dropped.load_weights(path)
    for key, value in _weights(dropped).items():
        np.testing.assert_array_equal(value, _weights(kept)[key])
    # The other way round a B would be missing: refused.
    path = str(tmp_path / "dropped.weights.h5")
    dropped.save_weights(path)
    with pytest.raises(ValueError, match="feedback_kernel"):
        _mlp("fa", False).load_weights(path)


def test_drop_after_compile_and_build_is_refused():
    model = _mlp("kp", False)
    model.compile(KolenPollack(keras.optimizers.SGD(0.1)), "mse")
    model.optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="before compiling"):
        drop_unused_feedback(model)
