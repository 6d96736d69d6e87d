"""The library on every Keras backend keras_wt implements: these tests use only `keras`,
`keras.ops`, NumPy and `keras_wt` (gradients through `keras_wt.backend.vjp`), and run in the
suite once per backend (`script/test` runs the suite under TensorFlow, then this file and the
other backend-neutral ones under `KERAS_BACKEND=jax`; `conftest.BACKEND_NEUTRAL_FILES`).

Each rule's gradients against values computed by hand; every layer family's input gradient
against its stock twin holding `B`; Kolen–Pollack's invariant and the mirror's fixed point under
`model.fit`, as the backend's own trainer runs them (on JAX a pure function of the state).
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_wt
from keras_wt import algorithms
from keras_wt import backend
from keras_wt import layers as wt
from conftest import assert_allclose
from families import FAMILIES, family_model as _family_model


def _values(variables):
    return [ops.convert_to_tensor(v.value) for v in variables]


def _gradients(layer, x, dy, training=False):
    """`(y, dx, {variable path: gradient})` of `sum(layer(x)·dy)`, from the layer's stateless
    call differentiated by the backend (`keras_wt.backend.vjp`)."""
    trainable = layer.trainable_variables
    non_trainable = _values(layer.non_trainable_variables)

    def forward(x, *values):
        y, _ = layer.stateless_call(list(values), non_trainable, x, training=training)
        return y

    primals = (ops.convert_to_tensor(x), *_values(trainable))
    y = forward(*primals)
    grads = backend.vjp(forward, primals, ops.convert_to_tensor(dy))
    return (np.asarray(y), np.asarray(grads[0]),
            {v.path: None if g is None else np.asarray(g) for v, g in zip(trainable, grads[1:])})


def _rng_arrays(*shapes, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randn(*shape).astype("float32") for shape in shapes]


@pytest.mark.parametrize("feedback", ["bp", "fa", "ss", "wm", "kp", "frsf", "sa", "ia", "dfa"])
def test_dense_gradients_by_hand(feedback):
    layer = wt.Dense(5, feedback=feedback)
    layer.build((4, 6))
    x, dy = _rng_arrays((4, 6), (4, 5))
    y, dx, grads = _gradients(layer, x, dy)
    w = np.asarray(layer.kernel.value)
    b = None if layer.feedback_kernel is None else np.asarray(layer.feedback_kernel.value)
    by_hand = {
        "bp": w,
        "fa": b, "wm": b, "kp": b, "sa": b, "ia": b,
        "ss": np.sign(w) * np.sqrt(2.0 / 5),  # sqrt(2 / fan_out), DESIGN.md §2
        "frsf": np.abs(b) * np.sign(w) if b is not None else None,
        "dfa": np.zeros_like(w),
    }[feedback]
    assert_allclose(y, x @ w + np.asarray(layer.bias.value), rtol=1e-5, atol=1e-6)
    assert_allclose(dx, dy @ by_hand.T, rtol=1e-5, atol=1e-6)
    assert_allclose(grads[layer.kernel.path], x.T @ dy, rtol=1e-5, atol=1e-6)
    assert_allclose(grads[layer.bias.path], dy.sum(0), rtol=1e-5, atol=1e-6)
    if feedback not in ("bp", "dfa"):
        assert not np.allclose(dx, dy @ w.T, atol=1e-3)


def test_brsf_redraws_its_magnitudes_at_every_training_step():
    """`brsf`: `B = |R_t|·sign(W)·scale`, `R_t` drawn from the layer's `[seed, step]`; the step
    advances once per training step (on JAX in the forward pass of a training call)."""
    model = keras.Sequential([keras.Input((6,)), wt.Dense(5, feedback="brsf")])
    layer = model.layers[0]
    x, dy = _rng_arrays((32, 6), (32, 5))
    _, dx0, _ = _gradients(layer, x, dy)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    start = int(np.asarray(layer.feedback_state.value)[1])
    model.fit(x, dy, batch_size=32, epochs=3, verbose=0)
    assert int(np.asarray(layer.feedback_state.value)[1]) == start + 3
    _, dx3, _ = _gradients(layer, x, dy)
    w = np.asarray(layer.kernel.value)
    scale = float(algorithms.sign_symmetry_scale(layer))
    for dx in (dx0, dx3):  # each dx = dy·(|R|·sign(W)·scale)ᵀ for some |R|: check the signs
        magnitudes = np.linalg.lstsq(dy, dx, rcond=None)[0].T / (np.sign(w) * scale)
        assert (magnitudes > 0).all()
    assert not np.allclose(dx0, dx3)


# Every family: a feedback layer whose every `B` is set to its `W` computes exactly the stock
# (backprop) gradients, and with its own `B` another input gradient (families.py).


@pytest.mark.parametrize("feedback", ["fa", "kp"])
@pytest.mark.parametrize("name,make,shape", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_layer_family_sends_its_error_through_b(name, make, shape, feedback):
    keras.utils.set_random_seed(1)
    model = _family_model(make, feedback, shape)
    reference = _family_model(make, "bp", shape)
    pairs = keras_wt.feedback_pairs(model)
    assert pairs, name
    for target, source in zip(wt.stock_weights(reference), wt.stock_weights(model)):
        target.assign(source)
    x, = _rng_arrays(shape)
    y_ref = np.asarray(reference(x))
    dy, = _rng_arrays(y_ref.shape, seed=1)
    _, dx_ref, g_ref = _gradients(reference, x, dy)
    y, dx, g = _gradients(model, x, dy)
    assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(dx, dx_ref, atol=1e-4)
    one_op = len(pairs) == 1 and not isinstance(model.layers[-1], keras.layers.RNN)
    for w, b in pairs.values():
        b.assign(w.value)
    _, dx_equal, g_equal = _gradients(model, x, dy)
    assert_allclose(dx_equal, dx_ref, rtol=1e-4, atol=1e-5)
    for ref, variable in zip(wt.stock_weights(reference), wt.stock_weights(model)):
        if ref.trainable:
            assert_allclose(g_equal[variable.path], g_ref[ref.path], rtol=1e-4, atol=1e-5)
            if one_op:  # one linear op: its weights' gradients never depend on B
                assert_allclose(g[variable.path], g_ref[ref.path], rtol=1e-4, atol=1e-5)


def _mlp(feedback, seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8,)),
        wt.Dense(16, activation="tanh", feedback=feedback),
        wt.Dense(3, feedback=feedback),
    ])


def _data(n=64, seed=0):
    """Inputs, and labels a linear map of them decides (so there is something to learn)."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 8).astype("float32")
    return x, np.argmax(x @ np.random.RandomState(99).randn(8, 3), axis=1)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_kolen_pollack_difference_shrinks_exactly_by_the_decay(jit_compile):
    model = _mlp("kp")
    lr, decay, steps = 0.05, 0.3, 6
    model.compile(
        optimizer=keras_wt.optimizers.KolenPollack(keras.optimizers.SGD(lr, momentum=0.9),
                                                   weight_decay=decay),
        loss=_loss(), jit_compile=jit_compile,
    )
    pairs = list(keras_wt.feedback_pairs(model).values())
    before = [np.asarray(b.value) - np.asarray(w.value) for w, b in pairs]
    w_before = [np.asarray(w.value) for w, _ in pairs]
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # 4 steps
    model.fit(x[:32], y[:32], batch_size=16, epochs=1, shuffle=False, verbose=0)  # 2 more
    assert int(model.optimizer.iterations.numpy()) == steps
    for (w, b), difference, w0 in zip(pairs, before, w_before):
        after = np.asarray(b.value) - np.asarray(w.value)
        assert_allclose(after, (1 - lr * decay) ** steps * difference, rtol=1e-4, atol=1e-6)
        assert not np.allclose(np.asarray(w.value), w0, atol=1e-3)  # W did move


def test_a_kolen_pollack_layer_with_a_plain_optimizer_is_refused():
    model = _mlp("kp")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=_loss())
    x, y = _data()
    with pytest.raises(ValueError, match="KolenPollack"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_mirror_drives_b_to_sigma_squared_over_lambda_times_w(decay):
    """With `W` frozen (learning rate 0) the mirror steps run by `fit` take `B` to
    `(σ²/λ)·W`, up to the finite-sample residual angle (`keras_wt.mirror.residual_angle`)."""
    model = _mlp("wm")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=_loss(), jit_compile=True)
    sigma = 0.8
    mirror = keras_wt.callbacks.MirrorCallback(0.2, sigma, decay=decay, batch_size=256,
                                               warmup_steps=0, seed=5)
    x, y = _data(n=16 * 60)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[mirror])
    assert int(model.optimizer.iterations.numpy()) == 60
    for layer in model.layers:
        w, b = np.asarray(layer.kernel.value), np.asarray(layer.feedback_kernel.value)
        target = sigma ** 2 / decay * w
        cosine = (b * target).sum() / np.linalg.norm(b) / np.linalg.norm(target)
        assert np.degrees(np.arccos(min(cosine, 1.0))) < 10.0, layer.name
        assert np.linalg.norm(b) / np.linalg.norm(target) == pytest.approx(1.0, abs=0.15)


def test_mirror_steps_are_reproducible_and_follow_the_step_count():
    """Two identical runs end with identical `B`; the noise is seeded by the step count, so
    two fits of 2 epochs equal one fit of 4 (a resumed run continues exactly)."""
    def run(splits):
        model = _mlp("wm")
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=_loss())
        mirror = keras_wt.callbacks.MirrorCallback(0.1, 1.0, decay=0.5, batch_size=32,
                                                   warmup_steps=3)
        x, y = _data()
        for epochs in splits:
            model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                      callbacks=[mirror])
        return [np.asarray(v.value) for v in model.weights]

    one, again, split = run([4]), run([4]), run([2, 2])
    for a, b, c in zip(one, again, split):
        np.testing.assert_array_equal(a, b)
        assert_allclose(a, c, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("feedback", ["bp", "fa", "ss", "wm", "kp", "frsf", "brsf", "dfa",
                                      "sa", "ia"])
def test_every_rule_lowers_the_training_loss_with_fit(feedback):
    model = keras_wt.dfa.maybe_direct(_mlp(feedback), feedback)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    if feedback == "kp":
        optimizer = keras_wt.optimizers.KolenPollack(optimizer, weight_decay=1e-3)
    model.compile(optimizer=optimizer, loss=_loss(), jit_compile=True)
    callbacks = []
    if feedback == "wm":
        callbacks = [keras_wt.callbacks.MirrorCallback(0.1, 1.0, decay=0.5, batch_size=64)]
    x, y = _data(n=256)
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=32, epochs=8, verbose=0, callbacks=callbacks)
    assert model.evaluate(x, y, verbose=0) < 0.8 * first


@pytest.mark.parametrize("feedback", ["fa", "kp", "sa"])
def test_save_and_load_keep_every_feedback_kernel(tmp_path, feedback):
    model = _mlp(feedback)
    x, _ = _data()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)
    original, restored = keras_wt.feedback_pairs(model), keras_wt.feedback_pairs(loaded)
    assert list(original) == list(restored)
    for (_, b), (_, b2) in zip(original.values(), restored.values()):
        np.testing.assert_array_equal(np.asarray(b.value), np.asarray(b2.value))


@pytest.mark.parametrize("feedback", ["fa", "kp"])
def test_delta_and_gradient_angles_by_hand(feedback):
    """`keras_wt.alignment` on a two-layer MLP (a tape on TensorFlow, zero probes on JAX)
    against the deltas written out: the top layer's delta is `e = softmax − onehot` (over the
    batch mean), the hidden layer's `(e·Bᵀ) ⊙ tanh'` against backprop's `(e·Wᵀ) ⊙ tanh'`."""
    model = _mlp(feedback)
    model.compile(optimizer="sgd", loss=_loss())
    x, y = _data(n=16)
    hidden, top = model.layers
    w1, b1 = np.asarray(hidden.kernel.value), np.asarray(hidden.bias.value)
    w2, b2 = np.asarray(top.kernel.value), np.asarray(top.bias.value)
    a = x @ w1 + b1
    h = np.tanh(a)
    logits = h @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = (p - np.eye(3)[y]) / len(x)
    sent = (e @ np.asarray(top.feedback_kernel.value).T) * (1 - h ** 2)
    exact = (e @ w2.T) * (1 - h ** 2)

    def angle(u, v):
        u, v = u.ravel().astype(np.float64), v.ravel().astype(np.float64)
        return np.degrees(np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1)))

    metrics = keras_wt.alignment.alignment_metrics(model, x, y)
    assert metrics[f"delta_angle/{hidden.name}"] == pytest.approx(angle(sent, exact), abs=1e-3)
    assert metrics[f"delta_angle/{top.name}"] == pytest.approx(0.0, abs=1e-3)
    assert metrics[f"gradient_angle/{hidden.name}"] == pytest.approx(
        angle(x.T @ sent, x.T @ exact), abs=1e-3)
    assert metrics[f"weight_angle/{top.name}"] == pytest.approx(
        angle(w2, np.asarray(top.feedback_kernel.value)), abs=1e-3)
    assert 10 < metrics[f"delta_angle/{hidden.name}"] < 170


def test_mirror_runs_with_a_partial_last_batch_and_any_steps_per_execution():
    """A partial last batch makes the trainer trace the step again mid-fit; the mirror's hook
    must read only the step's state then (on JAX, reading a callback's `self.model` there
    synced stale variables into the trainer and lost the epoch's state). The result does not
    depend on the steps per call."""
    def run(steps_per_execution):
        model = _mlp("wm")
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=_loss(),
                      steps_per_execution=steps_per_execution)
        mirror = keras_wt.callbacks.MirrorCallback(0.1, 1.0, decay=0.5, batch_size=32,
                                                   warmup_steps=2)
        x, y = _data(n=100)  # 6 batches of 16 and one of 4
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[mirror])
        assert int(model.optimizer.iterations.numpy()) == 14
        return [np.asarray(v.value) for v in model.weights]

    for a, b in zip(run(1), run(3)):
        assert_allclose(a, b, rtol=1e-5, atol=1e-6)
