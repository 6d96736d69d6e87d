"""The `keras-wt-train` command line: flags, wiring of the reference configuration, outputs and
exact resumption. Runs on a tiny MNIST-format dataset written into a temporary folder."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from conftest import BATCH, N_TRAIN, assert_allclose, tiny_flags
from keras_wt import models
from keras_wt import schedules
from keras_wt import optimizers as wt_optimizers
from keras_wt.algorithms import ALGORITHMS
from keras_wt.app import cli
from keras_wt.app import config as config_lib
from keras_wt.app import experiment
from keras_wt.app import flags
from keras_wt.app import published
from keras_wt.app import runs
from keras_wt.app import training
from keras_wt.app.config import (RECIPE_MIRROR, RECIPE_MIRROR_V1, RECIPE_MIRROR_V2,
                                 RECIPE_MIRROR_V3, DataConfig,
                                 TrainConfig)
from keras_wt.app.data import datasets
from keras_wt.app.data import pipelines
from keras_wt.callbacks import MirrorCallback
from keras_wt.mirror import MirrorConfig
from keras_wt.schedules import OptimizerConfig

def build_model(config, image_shape):
    """The compiled model `keras-wt-train` trains for the flag dict `config`."""
    train_config = published.train_config(config)
    flatten = config["model"] == "mlp"
    model = training.build_model(
        train_config, (int(np.prod(image_shape)),) if flatten else image_shape)
    training.compile_model(model, train_config, steps_per_epoch=10)
    return model


def read(run_dir, name):
    with open(os.path.join(run_dir, name), encoding="utf-8") as f:
        return json.load(f)


# --- flags -----------------------------------------------------------------------------------


def test_reference_defaults():
    config, explicit = cli.parse_args([])
    assert explicit == set()
    assert config["dataset"] == "fashion_mnist"  # on disk after script/up
    assert config["n_epochs"] == 400
    assert config["size_hidden_layers"] == [500]
    assert config["batch_size"] == 128
    assert config["test_frequency"] == 1
    assert config["save_dir"] == "./experiments"
    assert config["seed"] == 1111
    assert config["model"] == "mlp"
    rates = {"bp": 0.2, "fa": 0.2, "ss": 0.2, "wm": 0.05, "kp": 0.3, "frsf": 0.2,
                 "brsf": 0.2, "dfa": 0.2, "sa": 0.2, "ia": 0.2}
    for algo in ALGORITHMS:
        config, _ = cli.parse_args(["--algo", algo])
        assert published.learning_rate(config) == rates[algo]
        config, _ = cli.parse_args(["--algo", algo, "--learning_rate", "0.7"])
        assert published.learning_rate(config) == 0.7


def test_help_and_flags_need_no_tensorflow():
    """`keras-wt-train --help` answers before TensorFlow is imported (that takes seconds)."""
    code = ("import sys\nfrom keras_wt.app import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--dataset" in out.stdout and "I0000" not in out.stderr + out.stdout


def test_cli_names_agree_with_the_library():
    assert cli.ALGORITHMS == keras_wt.ALGORITHMS
    assert cli.NOISE_DISTRIBUTIONS == keras_wt.mirror.NOISE_DISTRIBUTIONS
    assert set(cli.DATASETS) <= set(datasets.NAMES) and set(cli.MODELS) <= set(models.BUILDERS)


def test_keras_prints_nothing_per_epoch_unless_asked():
    """The console's line per epoch is keras_wt's summary; Keras's own (with the same numbers)
    only at --verbose 2 and 3, and never its progress bar."""
    assert [published.keras_verbose(v) for v in (0, 1, 2, 3)] == [0, 0, 2, 2]


def test_bad_flags():
    with pytest.raises(ValueError, match=r"--batch_size=0 .* >= 1"):
        cli.parse_args(["--batch_size", "0"])
    with pytest.raises(ValueError, match=r"--learning_rate=-0.1"):
        cli.parse_args(["--learning_rate", "-0.1"])
    with pytest.raises(ValueError, match=r"--size_hidden_layers=\[3, 4\].*cnn"):
        cli.parse_args(["--model", "cnn", "--size_hidden_layers", "3", "4"])
    with pytest.raises(ValueError, match=r"--train_subset=0 .* >= 1"):
        cli.parse_args(["--train_subset", "0"])
    with pytest.raises(ValueError, match=r"--train_subset=10 .* at least --batch_size=128"):
        cli.parse_args(["--train_subset", "10"])
    with pytest.raises(ValueError, match=r"--steps_per_epoch=-1 .* >= 1"):
        cli.parse_args(["--steps_per_epoch", "-1"])
    with pytest.raises(SystemExit) as info:  # argparse: choices, and main() for ValueErrors
        cli.main(["--algo", "kpp"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--n_epochs", "0"])
    with pytest.raises(SystemExit):
        cli.main(["--mirror_noise_std", "0.1", "--mirror_noise_amplitude", "0.1"])


def test_every_range_is_its_configs_and_names_the_flag():
    """The flags' own rules answer before TensorFlow; every range is checked by the config the
    flag becomes (once, there), and the error names the flag and the value given."""
    cases = [
        (["--n_epochs", "0"], "--n_epochs=0 ", ">= 1"),
        (["--test_frequency", "0"], "--test_frequency=0 ", ">= 1"),
        (["--seed", str(2**32)], f"--seed={2**32} ", "an integer in"),
        (["--learning_rate", "nan"], "--learning_rate=nan ", "finite number > 0"),
        (["--momentum", "1"], "--momentum=1.0 ", r"a number in \[0, 1\)"),
        (["--weight_decay", "-1"], "--weight_decay=-1.0 ", ">= 0"),
        (["--algo", "kp", "--weight_decay", "-1"], "--weight_decay=-1.0 ", ">= 0"),
        (["--algo", "kp", "--kp_weight_decay", "-1"], "--kp_weight_decay=-1.0 ", ">= 0"),
        (["--algo", "bp", "--kp_weight_decay", "-1"], "--kp_weight_decay=-1.0 ", ">= 0"),
        (["--mirror_learning_rate", "-1"], "--mirror_learning_rate=-1.0 ",
         r">= 0 \(MirrorConfig.learning_rate=-32.0\)"),
        (["--mirror_decay", "-1"], "--mirror_decay=-1.0 ", ">= 0"),
        (["--mirror_every", "0"], "--mirror_every=0 ", ">= 1"),
        (["--mirror_steps", "0"], "--mirror_steps=0 ", ">= 1"),
        (["--mirror_noise_amplitude", "0"], "--mirror_noise_amplitude=0.0 ", "> 0"),
        (["--mirror_noise_std", "-1"], "--mirror_noise_std=-1.0 ", "> 0"),
        (["--mirror_batch_size", "0"], "--mirror_batch_size=0 ", ""),
        (["--model", "cnn", "--mirror_max_batch_size", "0"], "--mirror_max_batch_size=0 ",
         ">= 1"),
        (["--mirror_target_angle", "90"], "--mirror_target_angle=90.0 ", r"\(0, 90\)"),
        (["--mirror_warmup_steps", "-1"], "--mirror_warmup_steps=-1 ", ">= 0"),
    ]
    for argv, flag, allowed in cases:
        flags.parse_flags(argv)  # no rule of the flags themselves refuses it
        with pytest.raises(ValueError, match=rf"^{re.escape(flag)}is not allowed: .*{allowed}"):
            cli.parse_args(argv)
    assert flags.MAX_SEED == config_lib.MAX_SEED


# --- the reference configuration, as the CLI builds it ---------------------------------------


def test_reference_model_loss_optimizer_and_initialisation():
    config, _ = cli.parse_args(["--algo", "fa"])
    model = build_model(config, (28, 28, 1))
    # 784-500-10, sigmoid hidden and output units.
    hidden, classifier = model.get_layer("hidden_1"), model.get_layer("classifier")
    assert hidden.kernel.shape == (784, 500) and classifier.kernel.shape == (500, 10)
    assert hidden.activation is keras.activations.sigmoid
    x = np.random.default_rng(0).random((3, 784)).astype("float32")
    h = 1 / (1 + np.exp(-(x @ hidden.kernel.numpy() + hidden.bias.numpy())))
    y = 1 / (1 + np.exp(-(h @ classifier.kernel.numpy() + classifier.bias.numpy())))
    assert_allclose(model(x), y, rtol=1e-4, atol=1e-6)
    # W, b and B ~ N(0, 1/(fan_in + fan_out)).
    for layer, fan_sum in ((hidden, 784 + 500), (classifier, 500 + 10)):
        for w in (layer.kernel, layer.bias, layer.feedback_kernel):
            w = w.numpy().ravel()
            tolerance = 4 / math.sqrt(2 * w.size) + (0.05 if w.size < 1000 else 0)
            assert abs(w.std() / math.sqrt(1 / fan_sum) - 1) < tolerance
            assert abs(w.mean()) < 4 * math.sqrt(1 / fan_sum / w.size)
    assert not np.allclose(hidden.kernel.numpy(), hidden.feedback_kernel.numpy())
    # Plain SGD at the published rate.
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert model.optimizer.momentum == 0 and not model.optimizer.nesterov
    assert np.isclose(float(model.optimizer.learning_rate), 0.2)
    # Sigmoid cross-entropy summed over the classes, averaged over the batch, integer labels.
    loss = model.loss
    assert isinstance(loss, models.SummedSigmoidCrossEntropy) and not loss.from_logits
    p = np.array([[0.8, 0.1, 0.3], [0.4, 0.5, 0.9]], "float32")
    labels = np.array([0, 2])
    expected = (
        -(np.log(0.8) + np.log(0.9) + np.log(0.7)) - (np.log(0.6) + np.log(0.5) + np.log(0.9))
    ) / 2
    assert_allclose(loss(labels, p), expected, rtol=1e-5)


def test_kp_uses_kolen_pollack_with_its_decay():
    config, _ = cli.parse_args(["--algo", "kp", "--kp_weight_decay", "0.001"])
    model = build_model(config, (28, 28, 1))
    assert isinstance(model.optimizer, wt_optimizers.KolenPollack)
    assert model.optimizer.kp_weight_decay == 0.001
    assert isinstance(model.optimizer.inner_optimizer, keras.optimizers.SGD)
    assert np.isclose(float(model.optimizer.learning_rate), 0.3)


def test_local_loss_decay_sets_the_decay_coefficient_of_sa_and_ia_only():
    """--local_loss_decay replaces the decay coefficient of the algorithm's local loss in every
    layer (the other coefficients stay the algorithm's); other algorithms ignore it."""
    for algo, expected in (("sa", {"self": 1.0, "decay": 0.25}),
                           ("ia", {"amp": 1.0, "null": 0.1, "decay": 0.25})):
        config, explicit = cli.parse_args(["--algo", algo, "--local_loss_decay", "0.25"])
        assert experiment.ignored_flags(config, explicit) == []
        model = build_model(config, (28, 28, 1))
        for name in ("hidden_1", "classifier"):
            assert model.get_layer(name).local_loss_coefficients == expected
    config, explicit = cli.parse_args(["--algo", "wm", "--local_loss_decay", "0.25"])
    assert experiment.ignored_flags(config, explicit) == ["local_loss_decay"]
    assert "feedback_loss" not in published.train_config(config).model.options
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ValueError, match=r"--local_loss_decay=.* positive"):
            cli.parse_args(["--algo", "sa", "--local_loss_decay", bad])


def test_convnet_recipe():
    """--model cnn/resnet20: batch norm, softmax cross-entropy on logits, SGD with momentum,
    decoupled weight decay of the kernels, a cosine schedule; KP's decay from its budget."""
    config, _ = cli.parse_args(["--model", "cnn", "--size_hidden_layers", "8",
                                "--cnn_filters", "2", "3", "--n_epochs", "4"])
    model = build_model(config, (28, 28, 1))
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    assert model.loss.get_config()["from_logits"]
    assert model.get_layer("conv_2").kernel.shape[-1] == 3
    assert model.get_layer("hidden").kernel.shape[-1] == 8
    assert model.get_layer("bn_2").momentum == 0.9 and model.get_layer("conv_2").bias is None
    optimizer = model.optimizer
    assert optimizer.momentum == 0.9
    assert optimizer.weight_decay == pytest.approx(5e-4 / (1 - 0.9))  # the L2 equivalent
    # The cosine from 0.05 to 0 over 4 epochs of 10 steps.
    schedule = keras.optimizers.schedules.deserialize(optimizer.get_config()["learning_rate"])
    assert float(schedule(0)) == pytest.approx(0.05) and float(schedule(40)) == pytest.approx(0)
    assert float(schedule(20)) == pytest.approx(0.025, rel=1e-5)
    without, _ = cli.parse_args(["--model", "cnn", "--no-batch_norm"])
    assert not any("bn" in layer.name for layer in build_model(without, (28, 28, 1)).layers)
    # Kolen-Pollack: λ such that Σ_t lr_t·λ = KP_DECAY_BUDGET over the 40 steps.
    config, _ = cli.parse_args(["--model", "cnn", "--algo", "kp", "--n_epochs", "4"])
    optimizer = build_model(config, (28, 28, 1)).optimizer
    rates = [0.025 * (1 + math.cos(math.pi * t / 40)) for t in range(40)]
    assert optimizer.kp_weight_decay == pytest.approx(published.KP_DECAY_BUDGET / sum(rates),
                                                      rel=1e-5)
    config, _ = cli.parse_args(["--model", "resnet20", "--algo", "kp", "--kp_weight_decay", "0.1"])
    model = build_model(config, (28, 28, 1))
    assert model.optimizer.kp_weight_decay == pytest.approx(0.1)
    assert model.get_layer("classifier").feedback == "kp"


def test_mirror_step_reproduces_the_published_step():
    """The published step is η·xᵀ·sigmoid(xW + b), summed over the noise batch; with
    sigmoid(z) ≈ 1/2 + z/4 its W-dependent part is (η/4)·xᵀ(xW). The CLI's MirrorCallback must
    take exactly that step, and the published uniform noise in [−0.05, 0.05)."""
    config, _ = cli.parse_args(["--algo", "wm", "--size_hidden_layers", "7"])
    train = published.train_config(config)
    settings = train.mirror
    assert settings.learning_rate == pytest.approx(0.01 * 128 / 4)
    assert settings.noise_std == pytest.approx(0.05 / math.sqrt(3))
    assert settings.noise_distribution == "uniform"
    assert train.mirror_warmup_one_pass  # one pass over the data:
    assert train.resolved_mirror(60000).warmup_steps == 60000 // 128
    assert settings.decay == 0 and settings.every == 1 and settings.batch_size == 128
    assert settings.seed == 1111  # the run's
    model = build_model(config, (28, 28, 1))
    callback = MirrorCallback(config=settings, warmup_steps=0)
    callback.set_model(model)
    callback._build()
    mirror = callback.mirror
    before = [layer.feedback_kernel.numpy() for layer in mirror.layers]
    mirror(0)
    for i, layer in enumerate(mirror.layers):
        x = mirror.noise(i, 0).numpy().astype(np.float64)
        assert np.abs(x).max() <= 0.05 + 1e-7
        w = layer.kernel.numpy().astype(np.float64)
        published_linear_step = (0.01 / 4) * x.T @ (x @ w)
        step = layer.feedback_kernel.numpy().astype(np.float64) - before[i]
        # B is float32 and ~1000x larger than one step: compare up to B's rounding.
        assert_allclose(step, published_linear_step, rtol=1e-3,
                        atol=1e-3 * np.abs(published_linear_step).max())
    # The conversion follows the noise batch size, and Gaussian noise is available.
    config, _ = cli.parse_args(["--algo", "wm", "--mirror_batch_size", "32",
                                       "--mirror_noise_std", "0.1"])
    settings = published.train_config(config).mirror
    assert settings.learning_rate == pytest.approx(0.01 * 32 / 4)
    assert (settings.noise_std, settings.noise_distribution) == (0.1, "normal")


def test_mirror_noise_distribution_flag():
    """--mirror_noise_distribution picks the distribution; σ stays that of the other flags
    (the mlp's published a/√3, the convnets' recipe σ); left out, the defaults are unchanged."""
    def settings(*argv):
        config, _ = cli.parse_args(["--algo", "wm", *argv])
        s = published.train_config(config).mirror
        return s.noise_std, s.noise_distribution

    assert settings() == (pytest.approx(0.05 / math.sqrt(3)), "uniform")
    assert settings("--mirror_noise_distribution", "rademacher") == (
        pytest.approx(0.05 / math.sqrt(3)), "rademacher")
    assert settings("--mirror_noise_std", "0.2", "--mirror_noise_distribution", "uniform") == (
        0.2, "uniform")
    assert settings("--model", "cnn") == (1.0, "rademacher")
    assert settings("--model", "cnn", "--mirror_noise_distribution", "normal") == (
        1.0, "normal")
    assert settings("--model", "cnn", "--mirror_noise_amplitude", "0.3") == (
        pytest.approx(0.3 / math.sqrt(3)), "uniform")
    with pytest.raises(ValueError, match="--mirror_noise_distribution='cauchy' is not allowed"):
        cli.parse_args(["--algo", "wm", "--mirror_noise_distribution", "cauchy"])


def test_epoch_order_depends_only_on_seed_and_epoch():
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    y = np.arange(10, dtype=np.int32)

    def labels(first_epoch, n_epochs):
        ds = pipelines.train_dataset(x, y, 4, seed=3, first_epoch=first_epoch,
                                      n_epochs=n_epochs, flatten=True)
        return [b.numpy().tolist() for _, b in ds]

    straight, resumed = labels(0, 3), labels(1, 3)
    assert len(straight) == 9 and straight[3:] == resumed  # 3 batches (4, 4, 2) per epoch
    epochs = [sum(straight[3 * e:3 * e + 3], []) for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_cli_one_epoch_every_algorithm(data_dir, tmp_path, algo):
    run_dir = cli.train_from_flags(tiny_flags(data_dir, tmp_path, algo, "--n_epochs", "1"))
    assert run_dir == os.path.join(str(tmp_path), "mnist", f"{algo}-V0")
    for name in ("experiment_config.json", "log.txt", "results.json", "model.keras",
                 "history.csv", "backup/manifest.json", "backup/epoch-0001.weights.h5"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    tags = {}
    for split in ("train", "validation"):
        events = os.path.join(run_dir, "tensorboard", split)
        tags[split] = {value.tag for name in os.listdir(events) for record in
                       tf.compat.v1.train.summary_iterator(os.path.join(events, name))
                       for value in record.summary.value}
    assert {"epoch_loss", "epoch_accuracy", "epoch_delta_angle/hidden_1"} <= tags["train"]
    assert ("epoch_weight_angle/hidden_1" in tags["train"]) == (
        keras_wt.algorithms.get(algo).weight_angle)
    assert {"epoch_loss", "epoch_accuracy"} <= tags["validation"]

    config = read(run_dir, "experiment_config.json")
    flags = set(vars(cli.build_parser().parse_args([])))
    assert flags <= set(config) and config["algo"] == algo and config["n_epochs"] == 1
    assert config["derived"]["learning_rate"] == cli.PUBLISHED_LEARNING_RATES[algo]
    if algo == "wm":
        assert config["derived"]["mirror_learning_rate_keras_wt"] == pytest.approx(
            0.01 * BATCH / 4)
        assert config["derived"]["mirror_warmup_steps"] == N_TRAIN // BATCH

    results = read(run_dir, "results.json")
    assert list(results) == ["epoch_1"]
    entry = results["epoch_1"]
    assert {"loss", "test_accuracy", "delta_angles"} <= set(entry)
    assert set(entry["delta_angles"]) == {"hidden_1", "classifier"}
    # dfa's Bₗ has another shape than W: no weight angle (keras_wt.dfa).
    assert set(entry.get("weight_angles", {})) == (
        {"hidden_1", "classifier"} if keras_wt.algorithms.get(algo).weight_angle else set())
    assert 0 <= entry["test_accuracy"] <= 100 and np.isfinite(entry["loss"])
    assert entry["delta_angles"]["classifier"] == pytest.approx(0, abs=1e-3)
    if algo == "bp":
        assert entry["weight_angles"]["hidden_1"] == pytest.approx(0, abs=1e-3)
        assert entry["delta_angles"]["hidden_1"] == pytest.approx(0, abs=1e-3)
    if algo == "fa":
        assert entry["weight_angles"]["hidden_1"] > 45

    with open(os.path.join(run_dir, "log.txt"), encoding="utf-8") as f:
        log = f.read()
    assert "epoch 1/1" in log and "test accuracy" in log
    assert f"test accuracy {entry['test_accuracy']:.2f}%" in log  # percent, as in results.json

    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    assert model.get_layer("hidden_1").feedback == algo
    # A second run never overwrites the first.
    assert runs.new_run_dir(str(tmp_path), "mnist", algo).endswith(f"{algo}-V1")


@pytest.mark.parametrize("algo", ["wm", "kp", "brsf"])
def test_resume_continues_exactly(data_dir, tmp_path, algo):
    """2 epochs straight == 1 epoch, interrupted, then `--resume` to 2 epochs."""
    straight = cli.train_from_flags(tiny_flags(data_dir, tmp_path, algo, "--n_epochs", "2"))
    interrupted = cli.train_from_flags(tiny_flags(data_dir, tmp_path, algo, "--n_epochs", "1"))
    assert read(os.path.join(interrupted, "backup"), "manifest.json")["epochs"] == 1
    # Without a folder, --resume picks the latest run of the algorithm.
    resumed = cli.train_from_flags(tiny_flags(data_dir, tmp_path, algo, "--n_epochs", "2",
                                         "--resume"))
    assert resumed == interrupted
    a = keras.saving.load_model(os.path.join(straight, "model.keras"))
    b = keras.saving.load_model(os.path.join(resumed, "model.keras"))
    assert [w.path for w in a.weights] == [w.path for w in b.weights]
    # B, or brsf's (seed, step) state from which it draws B.
    assert any("feedback_" in w.path for w in b.weights)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy(), err_msg=wa.path)
    assert int(b.optimizer.iterations) == 2 * math.ceil(N_TRAIN / BATCH)
    results_a, results_b = read(straight, "results.json"), read(resumed, "results.json")
    assert list(results_b) == ["epoch_1", "epoch_2"]
    for key in ("loss", "test_loss", "weight_angles", "delta_angles"):
        assert results_a["epoch_2"][key] == pytest.approx(results_b["epoch_2"][key]), key
    assert read(resumed, "experiment_config.json")["n_epochs"] == 2


def test_resume_refuses_changed_flags(data_dir, tmp_path):
    run_dir = runs.new_run_dir(str(tmp_path), "mnist", "bp")
    config, _ = cli.parse_args(tiny_flags(data_dir, tmp_path, "bp"))
    with open(os.path.join(run_dir, "experiment_config.json"), "w") as f:
        json.dump(config, f)
    config, explicit = cli.parse_args(
        tiny_flags(data_dir, tmp_path, "bp", "--batch_size", "8", "--resume", run_dir))
    with pytest.raises(ValueError, match="--batch_size=8 differs"):
        experiment.run(config, explicit)
    with pytest.raises(ValueError, match="not a run folder"):
        experiment.run(*cli.parse_args(["--resume", str(tmp_path)]))


def test_convnet_weight_mirror_end_to_end(data_dir, tmp_path):
    """--model cnn --algo wm: the recipe's mirror in keras_wt's units, a noise batch per layer
    sized for the target angle (wide layers get more)."""
    run_dir = cli.train_from_flags(tiny_flags(
        data_dir, tmp_path, "wm", "--model", "cnn", "--cnn_filters", "2", "3", "--n_epochs", "1",
        "--mirror_warmup_steps", "2"))
    config = read(run_dir, "experiment_config.json")
    assert config["train_config"]["mirror.batch_size"] == "auto"
    assert config["train_config"]["mirror.learning_rate"] == RECIPE_MIRROR.learning_rate
    assert config["derived"]["loss"] == "softmax" and config["derived"]["schedule"] == "cosine"
    entry = read(run_dir, "results.json")["epoch_1"]
    assert np.isfinite(entry["loss"]) and set(entry["delta_angles"]) == {
        "conv_1", "conv_2", "hidden", "classifier"}
    # The mirror law (tan θ ≈ √(d_in·η·λ/(2n))) sizes the 147-input hidden layer's batch above
    # the 2·5·5-input conv_2's.
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    mirror = keras_wt.mirror.WeightMirror(model, config=RECIPE_MIRROR)
    sizes = dict(zip([layer.name for layer in mirror.layers], mirror.batch_sizes))
    assert sizes["hidden"] > sizes["conv_2"]


def test_convnet_kp_decay_budget_too_large_for_a_short_run_is_a_clear_error(
        data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.train_from_flags(tiny_flags(data_dir, tmp_path, "kp", "--model", "cnn",
                                        "--cnn_filters", "2", "--n_epochs", "1"))
    assert info.value.code == 2
    assert "too short for that budget" in capsys.readouterr().err


def test_a_diverged_run_stops_with_an_error_and_is_not_resumed(data_dir, tmp_path, capsys):
    flags = tiny_flags(data_dir, tmp_path, "bp", "--model", "cnn", "--cnn_filters", "2",
                       "--learning_rate", "1e30", "--n_epochs", "2")
    with pytest.raises(SystemExit) as info:
        cli.main(flags)
    assert info.value.code == 1
    run_dir = os.path.join(str(tmp_path), "mnist", "bp-V0")
    record = read(run_dir, "diverged.json")
    assert record["epoch"] == 1 and record["batch"] >= 1
    err = capsys.readouterr().err
    assert "the run diverged" in err and "Traceback" not in err
    with open(os.path.join(run_dir, "log.txt"), encoding="utf-8") as f:
        assert "the run diverged" in f.read()
    # The aborted epoch is neither backed up nor recorded.
    assert not os.path.exists(os.path.join(run_dir, "results.json"))
    assert not os.path.exists(os.path.join(run_dir, "backup", "manifest.json"))
    with pytest.raises(FloatingPointError, match="resuming it would diverge again"):
        experiment.run(*cli.parse_args(flags + ["--resume", run_dir]))


def test_flags_the_algorithm_does_not_use_are_named():
    config, explicit = cli.parse_args(["--algo", "fa", "--mirror_decay", "1", "--kp_weight_decay",
                                       "0.1", "--mirror_every", "2"])
    assert experiment.ignored_flags(config, explicit) == ["kp_weight_decay", "mirror_decay",
                                                          "mirror_every"]
    config, explicit = cli.parse_args(["--algo", "wm", "--mirror_decay", "1"])
    assert experiment.ignored_flags(config, explicit) == []
    config, explicit = cli.parse_args(["--algo", "kp", "--kp_weight_decay", "0.1"])
    assert experiment.ignored_flags(config, explicit) == []


def test_smoke_run_on_a_subset_prints_one_line_per_epoch(data_dir, tmp_path, capsys):
    """--train_subset N trains on the first N examples (ceil(N / batch) steps per epoch),
    --steps_per_epoch takes the first steps of each epoch's order; the console has one summary
    line per epoch and nothing of Keras's."""
    run_dir = cli.train_from_flags(tiny_flags(
        data_dir, tmp_path, "kp", "--n_epochs", "3", "--test_frequency", "2",
        "--train_subset", "40", "--verbose", "1"))
    out = capsys.readouterr().out
    config = read(run_dir, "experiment_config.json")
    assert config["derived"]["steps_per_epoch"] == math.ceil(40 / BATCH)
    assert config["train_config"]["data.train_subset"] == 40
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    assert int(model.optimizer.iterations) == 3 * math.ceil(40 / BATCH)
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "test accuracy" not in lines[1] and "test accuracy" in lines[2]  # epoch 2: no test
    assert "Epoch 1/3" not in out and "/step" not in out  # Keras's header and line
    assert " on 1 replica " in out

    run_dir = cli.train_from_flags(tiny_flags(
        data_dir, tmp_path, "bp", "--n_epochs", "2", "--steps_per_epoch", "2"))
    assert read(run_dir, "experiment_config.json")["derived"]["steps_per_epoch"] == 2
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    assert int(model.optimizer.iterations) == 4
    with pytest.raises(SystemExit) as info:  # more than one pass: a one-line error
        cli.main(tiny_flags(data_dir, tmp_path, "bp", "--n_epochs", "1",
                            "--steps_per_epoch", str(N_TRAIN // BATCH + 1)))
    assert info.value.code == 2
    assert f"steps_per_epoch={N_TRAIN // BATCH + 1} is more than the" in capsys.readouterr().err


def test_steps_per_epoch_takes_the_first_batches_of_each_epochs_order():
    x = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    y = np.arange(12)
    full = [b[1].numpy().tolist() for b in pipelines.train_dataset(x, y, 4, 7, 0, 2, True)]
    short = [b[1].numpy().tolist()
             for b in pipelines.train_dataset(x, y, 4, 7, 0, 2, True, steps_per_epoch=2)]
    assert short == full[0:2] + full[3:5]


def _cli_train(data_dir, tmp_path, algo, *extra, **overrides):
    flags, _ = cli.parse_args(tiny_flags(data_dir, tmp_path, algo, "--n_epochs", "2", *extra))
    config = published.train_config(flags)
    config.model_dir = None
    for key, value in overrides.items():
        if key.startswith("mirror_"):
            config.mirror = dataclasses.replace(config.mirror, **{key[len("mirror_"):]: value})
        else:
            setattr(config, key, value)
    return training.train(config)[0]


def test_several_steps_per_call_train_exactly_as_one_and_the_reference_mlp_keeps_every_b(
    data_dir, tmp_path
):
    # N_TRAIN / BATCH = 3 steps per epoch: "auto" runs them in one call (a divisor: no call
    # crosses an epoch); wm too, whose mirror steps run inside the training step.
    for algo in ("kp", "wm"):
        grouped = _cli_train(data_dir, tmp_path, algo)
        assert grouped.steps_per_execution == 3
        single = _cli_train(data_dir, tmp_path, algo, steps_per_execution=1)
        assert single.steps_per_execution == 1
        for a, b in zip(grouped.weights, single.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{algo} {a.path}")
    # ... and as the mirror run between calls with one step per call, as before.
    between = _cli_train(data_dir, tmp_path, "wm", steps_per_execution=1, mirror_in_train_step=False)
    for a, b in zip(grouped.weights, between.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    for algo, every, expected in (("wm", 1, 7), ("wm", 2, 7), ("fa", 1, 7)):
        config = TrainConfig(algo=algo, data=DataConfig(dataset="mnist"),
                             steps_per_execution="auto",
                             mirror=dataclasses.replace(RECIPE_MIRROR, every=every))
        assert config.resolved_steps_per_execution(469) == expected
    # The published MLP keeps (and trains) the first layer's B, which no gradient uses.
    assert grouped.get_layer("hidden_1").feedback_kernel is not None
    flags, _ = cli.parse_args(tiny_flags(data_dir, tmp_path, "kp", "--model", "cnn"))
    assert not published.train_config(flags).model.keep_unused_feedback


def test_auto_steps_per_call_follow_the_first_epochs_step_time_and_train_exactly_as_one(
    data_dir, tmp_path, monkeypatch
):
    # 48 / 4 = 12 steps per epoch: the first epoch runs 6 per call (the largest divisor up to
    # 10), the later ones as many as fit SECONDS_PER_CALL at the first epoch's step time.
    four = ("--batch_size", "4", "--n_epochs", "3")
    monkeypatch.setattr(config_lib, "SECONDS_PER_CALL", 1e9)  # any step: the whole epoch
    # wm: its mirror steps run inside the training step, and its warm-up once
    tuned = _cli_train(data_dir, tmp_path, "wm", *four)
    assert tuned.steps_per_execution == 12
    single = _cli_train(data_dir, tmp_path, "wm", *four, steps_per_execution=1)
    for a, b in zip(tuned.weights, single.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    monkeypatch.setattr(config_lib, "SECONDS_PER_CALL", 0.0)  # no step fits: the first rule's
    assert _cli_train(data_dir, tmp_path, "kp", *four).steps_per_execution == 6
    # A run folder records every epoch once, across the two fits.
    monkeypatch.setattr(config_lib, "SECONDS_PER_CALL", 1e9)
    run_dir = cli.train_from_flags(tiny_flags(data_dir, tmp_path, "kp", *four))
    with open(os.path.join(run_dir, runs.HISTORY_FILE)) as f:
        assert [row.split(",")[0] for row in f.read().splitlines()[1:]] == ["0", "1", "2"]
    with open(os.path.join(run_dir, runs.RESULTS_FILE)) as f:
        assert sorted(json.load(f)) == sorted(runs.epoch_key(e) for e in (1, 2, 3))
    config = published.train_config(cli.parse_args(tiny_flags(data_dir, tmp_path, "kp", *four))[0])
    config.model_dir = None

    class Epochs(keras.callbacks.Callback):  # what a progress bar or a callback sees
        seen = []

        def on_epoch_begin(self, epoch, logs=None):
            self.seen.append((epoch, self.params["epochs"]))

    model, history = training.train(config, callbacks=[Epochs()])
    assert model.steps_per_execution == 12
    assert history.epoch == [0, 1, 2] and len(history.history["loss"]) == 3
    assert Epochs.seen == [(0, 3), (1, 3), (2, 3)]  # both fits count the run's 3 epochs


def test_tuned_steps_per_execution_is_the_largest_divisor_that_fits_a_call():
    auto = TrainConfig(algo="kp", data=DataConfig(dataset="mnist"), steps_per_execution="auto")
    # 469 = 7 · 67: 0.5 ms per step fits all 469 in a second, 5 ms fits 67, 0.2 s only the 7
    # of the first epoch (never fewer), and no measurement keeps them.
    assert [auto.tuned_steps_per_execution(469, s, 7) for s in (5e-4, 5e-3, 0.2, None)] == [
        469, 67, 7, 7]
    assert auto.tuned_steps_per_execution(1251, 0.1, 9) == 9  # ImageNet at 1024: 3² · 139
    assert auto.tuned_steps_per_execution(1251, 0.005, 9) == 139
    assert auto.tuned_steps_per_execution(469, 5e-4, 1) == 1  # one per call was needed
    explicit = dataclasses.replace(auto, steps_per_execution=4)
    assert explicit.tuned_steps_per_execution(469, 5e-4, 4) == 4


# --- the component configs and the one translation of the published units --------------------


def test_published_units_translate_as_computed_by_hand():
    """mlp: keras_wt's η_m = η_pub·n/4 and uniform noise of amplitude a has σ = a/√3;
    convnets: the flags are keras_wt's units over the recipe's mirror."""
    flags, _ = cli.parse_args(["--algo", "wm", "--mirror_learning_rate", "0.02",
                               "--mirror_batch_size", "64", "--mirror_noise_amplitude", "0.3",
                               "--mirror_decay", "0.5", "--mirror_warmup_steps", "7"])
    config = published.train_config(flags)
    assert config.mirror == MirrorConfig(
        learning_rate=0.02 * 64 / 4, noise_std=0.3 / math.sqrt(3), decay=0.5, batch_size=64,
        warmup_steps=7, noise_distribution="uniform", seed=1111)
    assert not config.mirror_warmup_one_pass
    assert published.derived(config)["mirror_learning_rate_keras_wt"] == 0.32
    flags, _ = cli.parse_args(["--algo", "wm", "--model", "cnn", "--mirror_learning_rate", "0.02",
                               "--mirror_batch_size", "64"])
    config = published.train_config(flags)
    assert config.mirror == dataclasses.replace(RECIPE_MIRROR, learning_rate=0.02, batch_size=64,
                                                seed=1111)
    assert not config.mirror_warmup_one_pass
    # The recipe's earlier mirrors (normal noise), from the flags that restore them.
    normal = ["--algo", "wm", "--model", "cnn", "--mirror_noise_distribution", "normal"]
    flags, _ = cli.parse_args(normal + ["--mirror_cap_policy", "angle",
                                        "--mirror_warmup_steps", "200", "--mirror_cost", "0"])
    config = published.train_config(flags)
    assert config.mirror == dataclasses.replace(RECIPE_MIRROR_V1, seed=1111)
    assert config.mirror_cost == 0 and config.resolved_mirror(60000) == config.mirror
    flags, _ = cli.parse_args(normal + ["--mirror_max_batch_size", "128", "--mirror_cost", "0"])
    config = published.train_config(flags)
    assert config.mirror == dataclasses.replace(RECIPE_MIRROR_V2, seed=1111)
    flags, _ = cli.parse_args(normal + ["--mirror_cost", "0.2"])
    config = published.train_config(flags)
    assert config.mirror == dataclasses.replace(RECIPE_MIRROR_V3, seed=1111)
    assert config.mirror_cost == config_lib.RECIPE_MIRROR_V3_COST == 0.2
    # A budget of 0.2 of the step: max_cost = 1.5 · 0.2 · 128 (the batch) = 38.4.
    assert config.resolved_mirror(60000).max_cost == pytest.approx(38.4, rel=1e-12)
    assert RECIPE_MIRROR.warmup_steps == "auto" and RECIPE_MIRROR.cap_policy == "rate"
    for old in (RECIPE_MIRROR_V1, RECIPE_MIRROR_V2, RECIPE_MIRROR_V3):
        assert old.noise_distribution == "normal"
    # Today's: Rademacher noise and a budget of 0.1 of the step: max_cost = 1.5 · 0.1 · 128 =
    # 19.2, and twice that when the mirror runs every second step.
    flags, _ = cli.parse_args(["--algo", "wm", "--model", "cnn"])
    config = published.train_config(flags)
    assert config.mirror.noise_distribution == "rademacher"
    assert config.mirror_cost == config_lib.RECIPE_MIRROR_COST == 0.1
    assert config.mirror.max_cost is None
    assert config.resolved_mirror(60000).max_cost == pytest.approx(19.2, rel=1e-12)
    flags, _ = cli.parse_args(["--algo", "wm", "--model", "cnn", "--mirror_every", "2"])
    assert published.train_config(flags).resolved_mirror(60000).max_cost == pytest.approx(38.4)
    flags, _ = cli.parse_args(["--algo", "wm", "--model", "cnn", "--mirror_batch_size", "64"])
    assert published.train_config(flags).resolved_mirror(60000).max_cost is None  # not auto
    with pytest.raises(ValueError, match="--mirror_cost=-1.0 is not allowed"):
        published.train_config(cli.parse_flags(
            ["--algo", "wm", "--model", "cnn", "--mirror_cost", "-1"])[0])
    with pytest.raises(SystemExit):
        cli.parse_args(["--algo", "wm", "--model", "cnn", "--mirror_cap_policy", "speed"])


def test_kp_decay_passes_through_as_the_decoupled_decay():
    """--kp_weight_decay λ is `OptimizerConfig.decoupled_decay`, applied as is: the optimizer is
    the one the former round trip λ·(1 − m) / (1 − m) built, to float32 (what the step uses)."""
    for model, momentum in (("mlp", 0.0), ("cnn", 0.9), ("resnet20", 0.9)):
        for decay in (1e-3, 0.1, 0.0123, 5e-4):
            flags, _ = cli.parse_args(["--algo", "kp", "--model", model,
                                       "--kp_weight_decay", str(decay)])
            optimizer = published.train_config(flags).optimizer
            assert (optimizer.l2, optimizer.decoupled_decay, optimizer.kp_decay_budget) == (
                0.0, decay, None)
            assert optimizer.momentum == momentum
            new, _ = optimizer.create("kp", steps_per_epoch=10, epochs=2)
            old = schedules.create_optimizer("kp", optimizer.learning_rate, momentum=momentum,
                                             weight_decay=decay * (1.0 - momentum))
            assert np.float32(new.kp_weight_decay) == np.float32(old.kp_weight_decay)
            assert new.kp_weight_decay == decay
    flags, _ = cli.parse_args(["--algo", "kp", "--model", "cnn"])
    optimizer = published.train_config(flags).optimizer
    assert (optimizer.l2, optimizer.decoupled_decay, optimizer.kp_decay_budget) == (
        0.0, None, published.KP_DECAY_BUDGET)
    flags, _ = cli.parse_args(["--algo", "fa", "--model", "cnn"])
    optimizer = published.train_config(flags).optimizer  # the L2 coefficient of the recipe
    assert (optimizer.l2, optimizer.decoupled_decay) == (5e-4, None)
    assert optimizer.decoupled_decay_for("fa", 0.05, 10) == 5e-4 / (1 - 0.9)


def test_each_setting_is_defaulted_and_checked_by_its_config():
    config = TrainConfig(data=DataConfig(use_synthetic_data=True))
    assert config.mirror == RECIPE_MIRROR  # seed 0, the run's
    assert config.optimizer == OptimizerConfig(learning_rate=0.4)  # ImageNet's recipe
    assert TrainConfig(data=DataConfig(use_synthetic_data=True), seed=5).mirror.seed == 5
    with pytest.raises(ValueError, match="data_dir is required"):
        DataConfig()
    with pytest.raises(ValueError, match=r"batch_size=0 is not allowed: it must be an integer >= 1"):
        DataConfig(dataset="mnist", batch_size=0)
    with pytest.raises(ValueError, match=r"name='vgg' is not one of"):
        keras_wt.app.config.ModelConfig(name="vgg")
    with pytest.raises(ValueError, match=r"momentum=1.0 is not allowed: it must be a number in"):
        OptimizerConfig(learning_rate=0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"l2=0.0001 and decoupled_decay=0.1: .* give one"):
        OptimizerConfig(learning_rate=0.1, decoupled_decay=0.1)
    with pytest.raises(ValueError, match=r"schedule='linear' is not one of"):
        OptimizerConfig(learning_rate=0.1, schedule="linear")
    with pytest.raises(ValueError, match=r"mirror=\{.*\} is not a MirrorConfig"):
        TrainConfig(data=DataConfig(dataset="mnist"), mirror={"decay": 1.0})
    # Where the flags become the configs, the config's error names the flag.
    with pytest.raises(ValueError,
                       match=r"^--mirror_warmup_steps=-1 is not allowed: it must be an integer >= 0 "
                             r"or 'auto'$"):
        published.train_config(dict(cli.parse_args([])[0], mirror_warmup_steps=-1))


def test_a_run_saved_with_the_flat_train_config_is_compared_when_resumed(tmp_path):
    """`experiment_config.json` of runs saved before the component configs holds a flat
    `train_config` (`mirror_decay`, `batch_size`): its settings compare with today's."""
    from keras_wt.app import records

    config = TrainConfig(data=DataConfig(dataset="mnist", batch_size=8), model_dir=str(tmp_path),
                         mirror=dataclasses.replace(RECIPE_MIRROR, decay=0.5))
    old = {"model": "resnet18", "algo": "bp", "dataset": "mnist", "data_dir": "elsewhere",
           "batch_size": 8, "mirror_decay": 0.5, "mirror_warmup_steps": None,
           "weight_decay": 1e-4, "learning_rate": 0.4, "epochs": 3}
    runs.write_json(str(tmp_path / "experiment_config.json"), {"train_config": old})
    assert records.record_config(config, {}, {})  # data_dir and epochs may change
    for key, value, new_key in (("batch_size", 16, "data.batch_size"),
                                ("mirror_decay", 1.0, "mirror.decay")):
        runs.write_json(str(tmp_path / "experiment_config.json"),
                        {"train_config": dict(old, **{key: value})})
        with pytest.raises(ValueError, match=rf"{new_key}=.* \(saved: {value}\)"):
            records.record_config(config, {}, {})
