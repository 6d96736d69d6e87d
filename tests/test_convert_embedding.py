"""ReversibleEmbedding's twin: the lookup stays a lookup, the reverse projection `h·Eᵀ` (tied) or
`h·R` (untied) sends its error through B; convert finds it, and keeps its B when a call needs it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from keras_wt import layers as wt
from keras_wt import mirror
from keras_wt.optimizers import KolenPollack

VOCAB, DIM = 11, 4
IDS = np.random.RandomState(0).randint(0, VOCAB, (3, 5))
H = np.random.RandomState(1).randn(3, 5, DIM).astype("float32")
DY = np.random.RandomState(2).randn(3, 5, VOCAB).astype("float32")


def _pair(tie_weights, feedback="fa"):
    stock = keras.layers.ReversibleEmbedding(VOCAB, DIM, tie_weights=tie_weights)
    ours = wt.ReversibleEmbedding(VOCAB, DIM, tie_weights=tie_weights, feedback=feedback)
    stock.build(IDS.shape)
    ours.build(IDS.shape)
    for a, b in zip(wt.stock_weights(ours), stock.weights):
        a.assign(b)
    return stock, ours


@pytest.mark.parametrize("tie_weights", [True, False])
def test_reverse_projection_sends_its_error_through_b_and_the_lookup_is_stock(tie_weights):
    stock, ours = _pair(tie_weights)
    b = ours.feedback_kernel.numpy()
    assert b.shape == ((VOCAB, DIM) if tie_weights else (DIM, VOCAB))
    np.testing.assert_array_equal(stock(IDS), ours(IDS))
    np.testing.assert_array_equal(stock(H, reverse=True), ours(H, reverse=True))
    h = tf.constant(H)
    grads = []
    for layer in (stock, ours):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(h)
            logits = layer(h, reverse=True)
            looked_up = layer(IDS)
            loss = tf.reduce_sum(logits * DY) + tf.reduce_sum(looked_up ** 2)
        grads.append((tape.gradient(loss, h), tape.gradient(loss, wt.stock_weights(layer))))
    # dx = dy·B (tied: the projection is h·Eᵀ) or dy·Bᵀ (untied: h·R).
    expected = DY @ b if tie_weights else DY @ b.T
    np.testing.assert_allclose(grads[1][0], expected, rtol=1e-5, atol=1e-5)
    # The weights' gradients (the lookup's plus the projection's) are the stock ones.
    for s, o in zip(grads[0][1], grads[1][1]):
        np.testing.assert_allclose(tf.convert_to_tensor(s), tf.convert_to_tensor(o), rtol=1e-6, atol=1e-6)
    # With B = W the input gradient is backprop's.
    ours.feedback_kernel.assign(ours.kernel)
    with tf.GradientTape() as tape:
        tape.watch(h)
        loss = tf.reduce_sum(ours(h, reverse=True) * DY)
    np.testing.assert_allclose(tape.gradient(loss, h), grads[0][0], rtol=1e-5, atol=1e-5)


def test_sign_symmetry_and_mirror_use_the_projection_s_own_shapes():
    _, ours = _pair(True, feedback="ss")
    e = ours.embeddings.numpy()
    np.testing.assert_allclose(
        keras_wt.alignment.effective_feedback(ours), np.sign(e) * np.sqrt(2.0 / VOCAB), rtol=1e-6
    )
    _, wm = _pair(True, feedback="wm")
    assert wm.feedback_input_shape == IDS.shape + (DIM,)
    x = np.random.RandomState(3).randn(7, DIM).astype("float32")
    # ∇_E ½‖x·Eᵀ‖² = E·xᵀx.
    np.testing.assert_allclose(
        mirror.mirror_gradient(wm, x, counts=1.0), wm.embeddings.numpy() @ x.T @ x, rtol=1e-5
    )


def _language_model(vocab=VOCAB, dim=DIM):
    ids = keras.Input((5,), dtype="int32")
    embedding = keras.layers.ReversibleEmbedding(vocab, dim, name="tied")
    h = keras.layers.Dense(dim, activation="tanh", name="hidden")(embedding(ids))
    return keras.Model(ids, embedding(h, reverse=True))


def test_convert_keeps_b_of_an_embedding_whose_reverse_call_needs_an_error():
    stock = _language_model()
    converted = keras_wt.convert(stock, "kp", strict=True)
    tied = converted.get_layer("tied")
    assert isinstance(tied, wt.ReversibleEmbedding) and tied.feedback_used
    assert tied.feedback_kernel.shape == (VOCAB, DIM)
    np.testing.assert_array_equal(stock(IDS), converted(IDS))
    # A lookup-only embedding reads the input: no gradient uses its B.
    ids = keras.Input((5,), dtype="int32")
    lookup = keras.Model(ids, keras.layers.Dense(2)(keras.layers.ReversibleEmbedding(VOCAB, DIM, name="e")(ids)))
    assert keras_wt.convert(lookup, "fa").get_layer("e").feedback_used is False


def test_kolen_pollack_keeps_the_tied_embedding_and_its_b_in_step():
    converted = keras_wt.convert(_language_model(), "kp")
    lr, decay = 0.1, 0.5
    converted.compile(KolenPollack(keras.optimizers.SGD(lr), weight_decay=decay),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tied = converted.get_layer("tied")
    labels = np.random.RandomState(4).randint(0, VOCAB, IDS.shape)
    for _ in range(3):
        before = tied.feedback_kernel.numpy() - tied.embeddings.numpy()
        start = tied.embeddings.numpy()
        converted.train_on_batch(IDS, labels)
        assert not np.allclose(start, tied.embeddings.numpy())
        after = tied.feedback_kernel.numpy() - tied.embeddings.numpy()
        np.testing.assert_allclose(after, (1 - lr * decay) * before, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_saved_twin_loads_with_its_b_and_strips_to_the_stock_layout(tie_weights, tmp_path):
    ids = keras.Input((5,), dtype="int32")
    embedding = wt.ReversibleEmbedding(VOCAB, DIM, tie_weights=tie_weights, feedback="fa", name="e")
    model = keras.Model(ids, embedding(keras.layers.Dense(DIM)(embedding(ids)), reverse=True))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.get_layer("e").feedback_kernel, embedding.feedback_kernel)
    np.testing.assert_array_equal(model(IDS), loaded(IDS))
    stripped = keras_wt.strip(model)
    assert type(stripped.get_layer("e")) is keras.layers.ReversibleEmbedding
    stripped.save(tmp_path / "s.keras")
    np.testing.assert_array_equal(model(IDS), keras.saving.load_model(tmp_path / "s.keras")(IDS))
