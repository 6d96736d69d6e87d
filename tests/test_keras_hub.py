"""keras-hub models built from configs (tiny, random weights, no downloads): a BERT classifier,
a GPT-2 causal LM with tied embeddings and a ViT classifier convert completely, compute the stock
outputs, are backprop with every B := W, train a step with each rule, save, load and train on,
and strip back to stock keras-hub models that load without keras_wt."""

import gzip
import json
import os
import runpy
import struct
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from keras_wt import layers as wt
from keras_wt import nested
from keras_wt.callbacks import MirrorCallback
from keras_wt.convert import unconverted_layers
from keras_wt.optimizers import KolenPollack
from keras_wt.unused_feedback import unused_feedback_layers, unused_input_error_layers

keras_hub = pytest.importorskip("keras_hub")

N, LENGTH, VOCAB = 8, 8, 40
RNG = np.random.RandomState(0)
TOKENS = RNG.randint(1, VOCAB, (N, LENGTH))
MASK = np.ones((N, LENGTH), "int32")
IMAGES = RNG.rand(N, 16, 16, 1).astype("float32")


def bert():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=LENGTH,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)
    x = {"token_ids": TOKENS, "segment_ids": np.zeros_like(TOKENS), "padding_mask": MASK}
    return model, x, RNG.randint(0, 3, N)


def gpt2():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=LENGTH,
    )
    model = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    return model, {"token_ids": TOKENS, "padding_mask": MASK}, np.roll(TOKENS, -1, axis=1)


def vit():
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 1), patch_size=4, num_layers=1, num_heads=2, hidden_dim=16,
        mlp_dim=32,
    )
    model = keras_hub.models.ViTImageClassifier(backbone, num_classes=3, preprocessor=None)
    return model, IMAGES, RNG.randint(0, 3, N)


# Per model: the feedback layers convert must make (type: count). Every Dense and EinsumDense
# of the blocks, the heads, ViT's patch convolution, and the token embedding (BERT's is a lookup
# only: it reads the input, and its B is dropped; GPT-2's also computes the tied logits h·Eᵀ).
EXPECTED = {
    bert: {"EinsumDense": 4, "Dense": 4, "ReversibleEmbedding": 1},
    gpt2: {"EinsumDense": 4, "Dense": 2, "ReversibleEmbedding": 1},
    vit: {"EinsumDense": 4, "Dense": 3, "Conv2D": 1},
}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _kernels(model):
    """The stock model's weights that a linear map multiplies by (found without keras_wt): every
    kernel, and a token embedding only where a reverse call projects through it."""
    weights = [w for w in model.weights if w.name == "kernel"]
    reverse = any(type(model).__name__ == name for name in ("GPT2CausalLM",))
    if reverse:
        weights.append(model.backbone.token_embedding.embeddings)
    return weights


def _gradients(model, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wm without its mirror: a measurement, not training
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=False))
        return tape.gradient(loss, model.trainable_weights)


def _compile(model, feedback):
    optimizer = keras.optimizers.SGD(0.01)
    if feedback == "kp":
        optimizer = KolenPollack(optimizer, weight_decay=0.1)
    # keras-hub tasks override compile (Keras does not recompile them from a saved file).
    model.compile(optimizer=optimizer, loss=LOSS)
    if feedback == "wm":
        return [MirrorCallback(learning_rate=0.1, noise_std=1.0, decay=0.5, batch_size=8)]
    return []


def _fit(model, x, y, callbacks):
    before = [w.numpy() for w in model.trainable_weights]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")
        model.fit(x, y, batch_size=N, epochs=1, verbose=0, callbacks=callbacks)
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights))


@pytest.mark.parametrize("feedback", ["fa", "kp", "wm"])
@pytest.mark.parametrize("make", [bert, gpt2, vit], ids=["bert", "gpt2", "vit"])
def test_converts_completely_computes_the_stock_outputs_and_trains_saves_loads(make, feedback, tmp_path):
    stock, x, y = make()
    converted = keras_wt.convert(stock, feedback, strict=True)
    assert type(converted).__mro__[2] is type(stock)  # Converted[<its keras-hub class>]
    ours = wt.feedback_layers(converted)
    counts = {}
    for layer in ours:
        counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
    assert counts == EXPECTED[make]
    assert unconverted_layers(converted) == []
    # Every stock weight a linear map multiplies by is now the kernel of a layer that has B.
    with_b = [l for l in ours if l.feedback_used]
    assert sorted(id(l.kernel) for l in with_b) != [] and len(with_b) == len(_kernels(stock))
    assert all(l.feedback_kernel is not None for l in with_b)
    # The metric keys are unique (paths where Transformer blocks repeat a name).
    keys = list(wt.feedback_keys(converted).values())
    assert len(set(keys)) == len(keys) == len(ours)
    np.testing.assert_array_equal(stock(x, training=False), converted(x, training=False))
    # With every B := W, every weight's gradient is the stock model's.
    for layer in with_b:
        layer.feedback_kernel.assign(layer.kernel)
    stock_grads, our_grads = _gradients(stock, x, y), _gradients(converted, x, y)
    assert len(stock_grads) == len(our_grads)
    for a, b in zip(stock_grads, our_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b), rtol=1e-5, atol=1e-5)

    converted = keras_wt.convert(stock, feedback)  # a fresh random B
    converted(x)  # fixes every sequence length (the mirror draws noise of each input shape)
    _fit(converted, x, y, _compile(converted, feedback))
    converted.save(tmp_path / "m.keras")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`compile\(\)` was not called.*")
        loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded).__name__ == type(stock).__name__ and isinstance(loaded, nested.Converted)
    assert [(l.name, l.feedback) for l in wt.feedback_layers(loaded)] == [
        (l.name, l.feedback) for l in wt.feedback_layers(converted)]
    assert len(loaded.weights) == len(converted.weights)
    for a, b in zip(converted.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(converted(x, training=False), loaded(x, training=False))
    loaded(x)
    _fit(loaded, x, y, _compile(loaded, feedback))


def test_unused_feedback_reads_the_graph_of_keras_hub_models():
    model, _, _ = gpt2()
    # A lookup at the input and the tied projection at the output: one call needs its error.
    assert unused_feedback_layers(keras_wt.convert(model, "fa")) == []
    names = [l.name for l in unused_input_error_layers(model)]
    assert "token_embedding" not in names and "token_ids" in names
    model, _, _ = bert()
    names = [l.name for l in unused_input_error_layers(model.backbone)]
    assert {"token_embedding", "segment_embedding"} <= set(names)
    assert "pooled_dense" not in names


def test_converted_causal_lm_generates_as_the_stock_one_with_its_preprocessor(tmp_path):
    vocabulary = {"<|endoftext|>": 0, "a": 1, "b": 2, "\u0120a": 3, "\u0120b": 4, "ab": 5, "\u0120ab": 6}
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=["a b", "\u0120a b"])
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=LENGTH)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocabulary), num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=LENGTH,
    )
    stock = keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)
    converted = keras_wt.convert(stock, "fa")
    assert isinstance(converted, keras_hub.models.GPT2CausalLM)
    # The copy shares the source's preprocessor: its vocabulary is not part of its config.
    assert converted.preprocessor is stock.preprocessor
    for model in (stock, converted):
        model.compile(sampler="greedy")
    prompts = ["a b", "ab a"]
    expected = stock.generate(prompts, max_length=6)
    assert converted.generate(prompts, max_length=6) == expected
    converted.save(tmp_path / "lm.keras")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`compile\(\)` was not called.*")
        loaded = keras.saving.load_model(tmp_path / "lm.keras")
    # Its tokenizer came back from the file's assets; its logits are the converted model's.
    x, _, _ = keras.utils.unpack_x_y_sample_weight(loaded.preprocessor(prompts))
    np.testing.assert_array_equal(
        x["token_ids"], keras.utils.unpack_x_y_sample_weight(converted.preprocessor(prompts))[0]["token_ids"])
    np.testing.assert_array_equal(loaded(x), converted(x))


def test_stripped_keras_hub_model_is_stock_uncompiled_and_loads_without_keras_wt(tmp_path):
    stock, x, _ = gpt2()
    kp = keras_wt.convert(stock, "kp")
    stripped = keras_wt.strip(kp)
    assert type(stripped) is keras_hub.models.GPT2CausalLM and not stripped.compiled
    assert not any(isinstance(l, (wt.WithFeedback, nested.Converted)) for l in stripped._flatten_layers())
    assert [w.shape for w in stripped.weights] == [w.shape for w in stock.weights]
    np.testing.assert_array_equal(stock(x), stripped(x))
    stripped.save(tmp_path / "serve.keras")
    kp.save(tmp_path / "kp.keras")
    np.save(tmp_path / "ids.npy", x["token_ids"])
    # In a fresh interpreter: the stripped file loads without keras_wt; then, once keras_wt is
    # imported (it registers keras_wt>Converted), so does the converted one.
    code = (
        "import sys, keras, keras_hub, numpy as np; ids = np.load(%r); "
        "x = {'token_ids': ids, 'padding_mask': np.ones_like(ids)}; "
        "m = keras.saving.load_model(%r); np.save(%r, np.asarray(m(x))); "
        "print('keras_wt' in sys.modules); import keras_wt; "
        "c = keras.saving.load_model(%r); np.save(%r, np.asarray(c(x))); "
        "print(len(keras_wt.layers.feedback_layers(c)), type(c).__name__)"
        % (str(tmp_path / "ids.npy"), str(tmp_path / "serve.keras"), str(tmp_path / "y.npy"),
           str(tmp_path / "kp.keras"), str(tmp_path / "kp.npy"))
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["False", "7", "GPT2CausalLM"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(stock(x)))
    np.testing.assert_array_equal(np.load(tmp_path / "kp.npy"), np.asarray(kp(x)))


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_vit_example_runs_a_rule_and_writes_accuracy_and_angles_per_epoch(tmp_path):
    rng = np.random.RandomState(0)
    for prefix, n in (("train", 48), ("t10k", 16)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.randint(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.randint(0, 10, n))
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "keras_hub_vit.py")
    main = runpy.run_path(example)["main"]
    out = tmp_path / "vit.json"
    result = main(["--algo", "kp", "--epochs", "2", "--limit", "48", "--batch_size", "16",
                   "--layers", "1", "--heads", "2", "--hidden", "16", "--mlp", "32", "--probe", "16",
                   "--data_dir", str(tmp_path), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["algo"] == "kp" and [e["epoch"] for e in saved["epochs"]] == [1, 2]
    layers = saved["feedback_layers"]
    assert len(layers) == 8 and result["feedback_layers"] == layers
    for epoch in saved["epochs"]:
        assert 0.0 <= epoch["test_accuracy"] <= 1.0
        assert sorted(epoch["weight_angle"]) == sorted(layers)
        assert all(0.0 <= angle <= 180.0 for angle in epoch["weight_angle"].values())
        assert set(epoch["delta_angle"]) <= set(layers) and len(epoch["delta_angle"]) >= 7
