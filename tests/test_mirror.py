"""Weight mirror: ΔB = η·∇_W(½‖f_W(x)‖²)/n − η·λ·B, driven by noise of the layer's input shape."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from keras_wt import layers as wt
from keras_wt.alignment import weight_angles
from keras_wt.callbacks import MirrorCallback
from keras_wt.mirror import WeightMirror


def _dense_model():
    return keras.Sequential(
        [keras.Input((12,)), wt.Dense(10, activation="relu", feedback="wm"), wt.Dense(4, feedback="wm")]
    )


def test_one_dense_step_equals_the_formula_by_hand():
    model = _dense_model()
    mirror = WeightMirror(model, learning_rate=0.3, noise_std=0.7, decay=0.2, batch_size=32)
    before = [layer.feedback_kernel.numpy() for layer in mirror.layers]
    noise = [mirror.noise(i, counter=5).numpy() for i in range(2)]
    assert noise[0].shape == (32, 12) and noise[1].shape == (32, 10)
    assert noise[0].std() == pytest.approx(0.7, rel=0.2)
    mirror(5)
    for layer, b0, x in zip(mirror.layers, before, noise):
        w = layer.kernel.numpy().astype(np.float64)
        x = x.astype(np.float64)
        expected = b0 + 0.3 * (x.T @ (x @ w) / 32) - 0.3 * 0.2 * b0
        np.testing.assert_allclose(layer.feedback_kernel.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_uniform_noise_has_the_requested_variance():
    model = _dense_model()
    mirror = WeightMirror(model, 0.1, noise_std=0.05 / np.sqrt(3), noise_distribution="uniform", batch_size=4096)
    x = mirror.noise(0, counter=1).numpy()
    assert x.min() >= -0.05 and x.max() < 0.05
    assert x.std() == pytest.approx(0.05 / np.sqrt(3), rel=0.05)


def test_conv_step_is_the_weight_gradient_of_the_layer_own_convolution():
    conv = wt.Conv2D(3, 3, strides=2, padding="same", feedback="wm")
    conv.build((None, 8, 8, 2))
    mirror = WeightMirror([conv], learning_rate=0.5, noise_std=1.0, decay=0.0, batch_size=4)
    b0 = conv.feedback_kernel.numpy()
    x = mirror.noise(0, counter=0)
    mirror(0)
    y = tf.nn.conv2d(x, conv.kernel, strides=2, padding="SAME")
    by_hand = tf.compat.v1.nn.conv2d_backprop_filter(x, conv.kernel.shape, y, [1, 2, 2, 1], "SAME")
    positions = 4 * 4  # output map 4x4
    np.testing.assert_allclose(
        conv.feedback_kernel.numpy(), b0 + 0.5 * by_hand.numpy() / (4 * positions), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["dense", "conv2d"])
def test_with_w_frozen_mirroring_aligns_b_with_w(kind):
    if kind == "dense":
        model = _dense_model()
    else:
        model = keras.Sequential(
            [keras.Input((8, 8, 3)), wt.Conv2D(6, 3, feedback="wm"), wt.Conv2D(4, 3, strides=2, feedback="wm")]
        )
    start = weight_angles(model)
    assert min(start.values()) > 60
    mirror = WeightMirror(model, learning_rate=0.1, noise_std=1.0, decay=0.5, batch_size=64)
    for counter in range(150):
        mirror(counter)
    angles = weight_angles(model)
    assert max(angles.values()) < 5, angles
    # B converges to (σ²/λ)·W for Dense and convolutions alike.
    for layer in mirror.layers:
        ratio = np.linalg.norm(layer.feedback_kernel.numpy()) / np.linalg.norm(layer.kernel.numpy())
        assert ratio == pytest.approx(1.0 / 0.5, rel=0.1)


def test_same_padding_leaves_a_small_angle_from_the_border_taps():
    """With zero padding the border taps of a kernel see fewer noise samples, so the fixed
    point is W scaled per tap (here 49, 56 or 64 of the 64 positions of the 8x8 map) by
    σ²/λ = 2: close to W's direction, not equal."""
    conv = wt.Conv2D(4, 3, padding="same", feedback="wm")
    conv.build((None, 8, 8, 3))
    mirror = WeightMirror([conv], learning_rate=0.1, noise_std=1.0, decay=0.5, batch_size=64)
    for counter in range(150):
        mirror(counter)
    counts = np.array([7, 8, 7])[:, None] * np.array([7, 8, 7])[None, :] / 64.0
    fixed_point = conv.kernel.numpy() * counts[:, :, None, None] / 0.5
    expected = keras_wt.alignment.angle(conv.kernel.numpy(), fixed_point)
    assert 1 < expected < 10
    assert keras_wt.alignment.angle(conv.feedback_kernel.numpy(), fixed_point) < 4


def test_b_stays_bounded_with_decay():
    model = _dense_model()
    mirror = WeightMirror(model, learning_rate=0.2, noise_std=2.0, decay=1.0, batch_size=16)
    norms = []
    for counter in range(200):
        mirror(counter)
        norms.append(max(np.abs(layer.feedback_kernel.numpy()).max() for layer in mirror.layers))
    w_max = max(np.abs(layer.kernel.numpy()).max() for layer in mirror.layers)
    # Fixed point (σ²/λ)·W = 4·W; no growth over the last half.
    assert max(norms) < 4 * w_max * 3
    assert max(norms[100:]) < 1.5 * max(norms[:100])


def test_replicas_agree_under_mirrored_strategy(two_cpu_strategy):
    with two_cpu_strategy.scope():
        model = _dense_model()
    mirror = WeightMirror(model, 0.1, noise_std=1.0, decay=0.1, batch_size=32, strategy=two_cpu_strategy)
    b0 = [layer.feedback_kernel.numpy() for layer in mirror.layers]
    mirror(0)
    for layer, before in zip(mirror.layers, b0):
        replicas = two_cpu_strategy.experimental_local_results(layer.feedback_kernel.value)
        np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())
        assert not np.allclose(replicas[0].numpy(), before)
    # Each replica drew half of the noise batch: the update is the formula over both halves.
    mirror_2 = WeightMirror(model, 0.1, noise_std=1.0, decay=0.1, batch_size=32, strategy=two_cpu_strategy)
    layer = mirror_2.layers[0]
    b_before = layer.feedback_kernel.numpy()
    x = np.concatenate([mirror_2.noise(0, counter=9, replica=r).numpy() for r in range(2)])
    assert x.shape == (32, 12)
    mirror_2(9)
    w = layer.kernel.numpy()
    expected = b_before + 0.1 * (x.T @ (x @ w) / 32) - 0.1 * 0.1 * b_before
    np.testing.assert_allclose(layer.feedback_kernel.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_xla_mirror_step_equals_eager_formula():
    model = _dense_model()
    mirror = WeightMirror(model, 0.3, noise_std=1.0, decay=0.0, batch_size=8, jit_compile=True)
    b0 = mirror.layers[0].feedback_kernel.numpy()
    x = mirror.noise(0, counter=3).numpy()
    mirror(3)
    w = mirror.layers[0].kernel.numpy()
    np.testing.assert_allclose(mirror.layers[0].feedback_kernel.numpy(), b0 + 0.3 * x.T @ (x @ w) / 8, rtol=1e-5, atol=1e-6)


def test_callback_runs_warmup_and_steps_after_every_batches():
    model = _dense_model()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = np.random.randn(40, 12).astype("float32")
    y = np.random.randn(40, 4).astype("float32")
    callback = MirrorCallback(learning_rate=0.1, noise_std=1.0, every=2, steps=2, batch_size=8, warmup_steps=3)
    callback.set_model(model)
    callback._build()
    counters = []
    real = callback.mirror.__call__
    callback.mirror = type("Counting", (), {"__call__": lambda self, c: (counters.append(c), real(c))})()
    b0 = model.layers[0].feedback_kernel.numpy()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])  # 5 batches
    # 3 warm-up steps, then 2 steps after batches 2 and 4.
    assert counters == [-1, -2, -3, 0, 1, 2, 3]
    assert not np.allclose(model.layers[0].feedback_kernel.numpy(), b0)
    # A resumed run (optimizer already stepped) does not warm up again and continues the count.
    counters.clear()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])  # batches 6..10
    assert counters == [4, 5, 6, 7, 8, 9]


def test_mirror_needs_wm_layers_and_valid_arguments():
    model = keras.Sequential([keras.Input((3,)), wt.Dense(2, feedback="fa")])
    with pytest.raises(ValueError, match="feedback='wm'"):
        WeightMirror(model, 0.1, 1.0)
    with pytest.raises(ValueError, match="noise_distribution"):
        WeightMirror(_dense_model(), 0.1, 1.0, noise_distribution="cauchy")


def test_callback_with_steps_per_execution_runs_the_same_mirror_steps():
    def run(steps_per_execution):
        keras.utils.set_random_seed(5)
        model = _dense_model()
        model.compile(keras.optimizers.SGD(0.01), "mse", steps_per_execution=steps_per_execution)
        callback = MirrorCallback(learning_rate=0.1, noise_std=1.0, decay=0.1, batch_size=8)
        x = np.random.RandomState(0).randn(48, 12).astype("float32")
        y = np.random.RandomState(1).randn(48, 4).astype("float32")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
        return [layer.feedback_kernel.numpy() for layer in wt.feedback_layers(model)]

    # 12 mirror steps either way; with 3 batches per execution they run 3 at a time, after the
    # weights have moved further, so B differs slightly but only by the training of W.
    for a, b in zip(run(1), run(3)):
        np.testing.assert_allclose(a, b, atol=0.02)
        assert keras_wt.alignment.angle(a, b) < 2
