"""`keras-wt-plot`: the four figures from the run folders `keras-wt-train` writes."""

import json
import os

import numpy as np
import pytest

from keras_wt.app import plots
from keras_wt.algorithms import LONG_NAMES


def fake_run(save_dir, algo, version, n_epochs=3, model="mlp", accuracy=80.0):
    """A run folder as keras-wt-train writes it, with made-up numbers."""
    run_dir = os.path.join(save_dir, "fashion_mnist", f"{algo}-V{version}")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "experiment_config.json"), "w") as f:
        json.dump({"algo": algo, "dataset": "fashion_mnist", "model": model}, f)
    results = {
        f"epoch_{j + 1}": {  # epochs count from 1
            "loss": 1.0 / (j + 1),
            "test_accuracy": accuracy + j,
            "weight_angles": {"hidden_1": 60.0 - j, "classifier": 40.0 - j},
            "delta_angles": {"hidden_1": 30.0 - j, "classifier": 0.0},
        }
        for j in range(n_epochs)
    }
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f)
    return run_dir


@pytest.fixture
def save_dir(tmp_path):
    save_dir = str(tmp_path / "experiments")
    fake_run(save_dir, "bp", 0)
    fake_run(save_dir, "fa", 0, accuracy=10.0)
    fake_run(save_dir, "fa", 1, accuracy=70.0)  # the latest run of an algorithm is drawn
    fake_run(save_dir, "kp", 0, n_epochs=5)
    return save_dir


def test_plot_command_writes_the_four_figures(save_dir, tmp_path):
    figures_dir = str(tmp_path / "figures")
    paths = plots.plot_from_flags(["--save_dir", save_dir, "--dataset", "fashion_mnist",
                        "--figures_dir", figures_dir])
    expected = [os.path.join(figures_dir, "fashion_mnist", f"{name}.png")
                for name in ("test_accuracies", "loss", "weight_angles", "delta_angles")]
    assert paths == expected
    for path in expected:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert 5_000 < os.path.getsize(path) < 300_000
    # The console script's entry point exits with status 0.
    assert plots.main(["--save_dir", save_dir, "--figures_dir", figures_dir]) == 0


def test_figure_contents(save_dir):
    runs = plots.collect_runs(save_dir, "fashion_mnist")
    assert [(r["algo"], r["run_dir"].rsplit("-", 1)[1]) for r in runs] == [
        ("bp", "V0"), ("fa", "V1"), ("kp", "V0")]
    figures = plots.make_figures(runs, "fashion_mnist")

    ax = figures["test_accuracies"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [LONG_NAMES["bp"], LONG_NAMES["fa"], LONG_NAMES["kp"]]
    assert "%" in ax.get_ylabel() and ax.get_xlabel() == "epoch"
    fa_line = ax.lines[1]
    np.testing.assert_array_equal(fa_line.get_xdata(), [1, 2, 3])  # epochs count from 1
    np.testing.assert_array_equal(fa_line.get_ydata(), [70, 71, 72])  # V1, not V0
    assert list(ax.lines[2].get_xdata()) == [1, 2, 3, 4, 5]

    ax = figures["weight_angles"].axes[0]
    assert "degrees" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Kolen-Pollack, hidden_1" in labels and "feedback alignment, classifier" in labels
    assert len(ax.lines) == 3 * 2  # one curve per algorithm and layer

    ax = figures["delta_angles"].axes[0]
    assert "degrees" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # The output layer's delta is exact for every algorithm: only hidden layers are drawn.
    assert labels == [f"{LONG_NAMES[a]}, hidden_1" for a in ("bp", "fa", "kp")]


def test_models_are_told_apart_and_filtered(save_dir):
    fake_run(save_dir, "bp", 1, model="cnn")
    runs = plots.collect_runs(save_dir, "fashion_mnist")
    assert sorted((r["algo"], r["model"]) for r in runs) == [
        ("bp", "cnn"), ("bp", "mlp"), ("fa", "mlp"), ("kp", "mlp")]
    ax = plots.make_figures(runs, "fashion_mnist")["loss"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "backprop (cnn)" in labels and "backprop (mlp)" in labels
    assert [r["model"] for r in plots.collect_runs(save_dir, "fashion_mnist", "cnn")] == ["cnn"]


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit):
        plots.main(["--save_dir", str(tmp_path), "--dataset", "mnist"])
    with pytest.raises(FileNotFoundError, match="run keras-wt-train --dataset mnist"):
        plots.plot_dataset(str(tmp_path), "mnist", str(tmp_path / "figures"))


def test_deep_models_draw_the_mean_and_range_over_layers(tmp_path):
    save_dir = str(tmp_path / "experiments")
    run_dir = fake_run(save_dir, "kp", 0, n_epochs=2, model="resnet20")
    layers = [f"conv_{i}" for i in range(plots.MAX_LAYER_CURVES + 2)] + ["classifier"]
    angles = {name: 10.0 + 3 * i for i, name in enumerate(layers)}
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    for j, entry in enumerate(results.values()):
        entry["weight_angles"] = {name: a - j for name, a in angles.items()}
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(run_dir, "experiment_config.json"), "w") as f:
        json.dump({"algo": "kp", "dataset": "fashion_mnist", "model": "resnet20",
                   "derived": {"loss": "softmax"}}, f)

    figures = plots.make_figures(plots.collect_runs(save_dir, "fashion_mnist"), "fashion_mnist")
    ax = figures["weight_angles"].axes[0]
    assert len(ax.lines) == 1  # one curve for the run, not one per layer
    expected_mean = np.mean(list(angles.values()))  # 10 + 3·(0..8): mean 22
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [expected_mean, expected_mean - 1])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(min(angles.values()) - 1)
    assert band.max() == pytest.approx(max(angles.values()))
    assert f"over {len(layers)} layers" in ax.get_title()
    assert "softmax" in figures["loss"].axes[0].get_ylabel()
