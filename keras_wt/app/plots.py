"""Figures of the reference experiments: the `keras-wt-plot` command line.

Reads the runs that `keras-wt-train` wrote in `<save_dir>/<dataset>/<algo>-V<i>/` and draws the
four figures of the published code, one curve per algorithm (and per layer for the angles;
with more than `MAX_LAYER_CURVES` layers, as in a ResNet, one curve per algorithm for the mean
over the layers, with the band from the smallest to the largest layer's angle):

    figures/<dataset>/test_accuracies.png   test accuracy (%) per epoch
    figures/<dataset>/loss.png              training loss per epoch (log scale)
    figures/<dataset>/weight_angles.png     angle between W and B (degrees), per layer
    figures/<dataset>/delta_angles.png      angle between the delta sent and backprop's
                                            (degrees), per hidden layer

    keras-wt-plot --save_dir experiments --dataset fashion_mnist --figures_dir figures

For each algorithm (and model) the latest run with results is drawn. The output layer is left
out of the delta angles: its delta is the loss gradient itself, the same for every algorithm.
Figures are drawn on matplotlib's Agg canvas (no display, no global backend switch).
"""

import argparse
import logging
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from keras_wt.app import cli
from keras_wt.app import runs as runs_lib
from keras_wt.algorithms import ALGORITHMS, LONG_NAMES

logger = logging.getLogger(__name__)

FIGURES = ("test_accuracies", "loss", "weight_angles", "delta_angles")

COLORS = {
    "bp": "black",
    "fa": "tab:blue",
    "ss": "tab:green",
    "wm": "tab:orange",
    "kp": "tab:red",
    "frsf": "tab:olive",
    "brsf": "tab:cyan",
    "dfa": "tab:purple",
    "sa": "tab:brown",
    "ia": "tab:pink",
}
LINESTYLES = ("-", "--", ":", "-.")
# Beyond this many layers the angle figures draw, per algorithm, the mean over layers and the
# min-max band: one curve per layer would give an unreadable legend of 100 entries.
MAX_LAYER_CURVES = 6
LOSS_NAMES = {
    "summed_sigmoid": "summed sigmoid cross-entropy",
    "softmax": "softmax cross-entropy",
}
MARKERS = ("o", "s", "^", "v", "D", "x")


def collect_runs(save_dir, dataset, model=None):
    """The latest run with results of every `(algorithm, model)` under `save_dir/dataset`.

    Returns:
        a list of dicts `{"algo", "model", "run_dir", "config", "results"}`, in the order of
        `keras_wt.ALGORITHMS`.
    """
    latest = {}
    for run_dir in runs_lib.run_dirs(save_dir, dataset):
        if not os.path.exists(os.path.join(run_dir, runs_lib.CONFIG_FILE)):
            continue
        config, results = runs_lib.load_results(run_dir)
        if not results or (model is not None and config.get("model") != model):
            continue
        key = (config["algo"], config.get("model", "mlp"))
        version = runs_lib.run_version(run_dir)
        if key not in latest or version > latest[key][0]:
            latest[key] = (version, {
                "algo": key[0], "model": key[1], "run_dir": run_dir,
                "config": config, "results": results,
            })
    runs = [run for _, run in latest.values()]
    return sorted(runs, key=lambda r: (ALGORITHMS.index(r["algo"]), r["model"]))


def _series(results, field, layer=None):
    """`(epochs, values)` of one field (or one layer of an angle field); epochs count from 1."""
    epochs, values = [], []
    for key, entry in results.items():
        value = entry.get(field)
        if layer is not None:
            value = (value or {}).get(layer)
        if value is None:
            continue
        epochs.append(runs_lib.key_epoch(key))
        values.append(float(value))
    order = sorted(range(len(epochs)), key=epochs.__getitem__)
    return [epochs[i] for i in order], [values[i] for i in order]


def _label(run, several_models, layer=None):
    label = LONG_NAMES[run["algo"]]
    if several_models:
        label += f" ({run['model']})"
    if layer is not None:
        label += f", {layer}"
    return label


def _layers(runs, field):
    """Layer names of an angle field, in model order, as the runs recorded them."""
    layers = []
    for run in runs:
        for entry in run["results"].values():
            for name in entry.get(field) or {}:
                if name not in layers:
                    layers.append(name)
    return layers


def make_figures(runs, dataset):
    """The four figures (`matplotlib.figure.Figure`, keyed by `FIGURES`) of a list of runs."""
    several_models = len({run["model"] for run in runs}) > 1
    title = dataset.replace("_", "-")
    figures = {}

    losses = {(run["config"].get("derived") or {}).get("loss") for run in runs}
    loss_label = "training loss"
    if len(losses) == 1 and next(iter(losses)) in LOSS_NAMES:
        loss_label += f" ({LOSS_NAMES[losses.pop()]})"
    specs = {
        "test_accuracies": ("test_accuracy", "test accuracy (%)", "Test accuracy"),
        "loss": ("loss", loss_label, "Training loss"),
    }
    for name, (field, ylabel, heading) in specs.items():
        fig = Figure(figsize=(6.4, 4.4), dpi=100)
        ax = fig.add_subplot()
        for run in runs:
            epochs, values = _series(run["results"], field)
            ax.plot(epochs, values, color=COLORS[run["algo"]], marker="o", markersize=3,
                    label=_label(run, several_models))
        ax.set_ylabel(ylabel)
        if name == "loss":
            ax.set_yscale("log")  # a diverging run does not flatten the others
        ax.set_title(f"{heading}, {title}")
        figures[name] = fig

    angle_specs = {
        "weight_angles": ("weight_angles", "angle between W and B (degrees)",
                          "Angle between forward and feedback weights"),
        "delta_angles": ("delta_angles", "angle to the backprop delta (degrees)",
                         "Angle between the delta sent and backprop's"),
    }
    for name, (field, ylabel, heading) in angle_specs.items():
        layers = _layers(runs, field)
        if field == "delta_angles" and len(layers) > 1:
            layers = layers[:-1]  # the output layer receives the exact loss gradient
        fig = Figure(figsize=(8.4, 4.4), dpi=100)
        ax = fig.add_subplot()
        if len(layers) > MAX_LAYER_CURVES:
            for run in runs:
                _draw_layer_band(ax, run, field, layers, several_models)
            heading += f" (mean and range over {len(layers)} layers)"
        else:
            for run in runs:
                for i, layer in enumerate(layers):
                    epochs, values = _series(run["results"], field, layer)
                    if not epochs:
                        continue
                    ax.plot(epochs, values, color=COLORS[run["algo"]],
                            linestyle=LINESTYLES[i % len(LINESTYLES)],
                            marker=MARKERS[i % len(MARKERS)], markersize=3,
                            label=_label(run, several_models, layer))
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=-2)
        ax.set_title(f"{heading}, {title}", fontsize=11)
        figures[name] = fig

    for name, fig in figures.items():
        ax = fig.axes[0]
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            if name in angle_specs and len(ax.get_legend_handles_labels()[0]) > len(runs):
                # a curve per layer: the legend goes beside the axes
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            else:
                ax.legend(fontsize=8)
        fig.tight_layout()
    return figures


def _draw_layer_band(ax, run, field, layers, several_models):
    """One run's angles as the mean over `layers` per epoch and the min-max band around it."""
    by_epoch = {}
    for layer in layers:
        for epoch, value in zip(*_series(run["results"], field, layer)):
            by_epoch.setdefault(epoch, []).append(value)
    if not by_epoch:
        return
    epochs = sorted(by_epoch)
    values = [by_epoch[e] for e in epochs]
    color = COLORS[run["algo"]]
    ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values],
                    color=color, alpha=0.2, linewidth=0)
    ax.plot(epochs, [sum(v) / len(v) for v in values], color=color, marker="o", markersize=3,
            label=_label(run, several_models))


def _write_figures(figures, out_dir):
    """Writes `{name: Figure}` as `<out_dir>/<name>.png`; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = os.path.join(out_dir, f"{name}.png")
        FigureCanvasAgg(fig).print_png(path)
        paths.append(path)
    return paths


def plot_dataset(save_dir, dataset, figures_dir="figures", model=None):
    """Draws the four figures of `dataset`'s runs into `<figures_dir>/<dataset>/`.

    Returns:
        the paths of the PNG files written.

    Raises:
        FileNotFoundError: there is no run with results for `dataset` in `save_dir`.
    """
    runs = collect_runs(save_dir, dataset, model)
    if not runs:
        raise FileNotFoundError(
            f"No run with results for dataset {dataset!r}"
            + (f" and model {model!r}" if model else "")
            + f" in {os.path.join(save_dir, dataset)}: run keras-wt-train --dataset {dataset} "
            f"--save_dir {save_dir} first."
        )
    paths = _write_figures(make_figures(runs, dataset), os.path.join(figures_dir, dataset))
    logger.info("Wrote %s from the runs %s", ", ".join(paths),
                ", ".join(run["run_dir"] for run in runs))
    return paths


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-wt-plot",
        description="Draw test accuracy, loss, weight angles and delta angles of the "
        "keras-wt-train runs of a dataset.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument("--save_dir", default="./experiments",
                        help="the --save_dir of the runs")
    parser.add_argument("--dataset", nargs="+", default=None,
                        help="datasets to plot (default: every dataset in --save_dir)")
    parser.add_argument("--figures_dir", default=None,
                        help="figures go to <figures_dir>/<dataset>/ (default: figures; with "
                        "--sweep DIR: DIR/figures)")
    parser.add_argument("--model", default=None, choices=cli.MODELS,
                        help="only the runs of this model; None: all, labelled by model when "
                        "there are several")
    parser.add_argument("--sweep", default=None, metavar="DIR",
                        help="instead: the figures of a keras-wt-sweep folder (its summary.csv), "
                        "into --figures_dir if given, else DIR/figures")
    return parser


def plot_from_flags(argv=None):
    """Parses the command-line flags `argv` (default: `sys.argv[1:]`), draws the figures and
    returns the paths written. A bad flag exits with argparse's usage message (status 2)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sweep is not None:
        from keras_wt.app import sweep_plots

        try:
            return sweep_plots.plot_sweep(args.sweep, args.figures_dir)
        except FileNotFoundError as e:
            parser.error(str(e))
    names = args.dataset
    if names is None:
        names = sorted(
            d for d in (os.listdir(args.save_dir) if os.path.isdir(args.save_dir) else [])
            if d in cli.DATASETS
        )
        if not names:
            parser.error(f"no runs of {cli.DATASETS} in --save_dir={args.save_dir!r}")
    for name in names:
        if name not in cli.DATASETS:
            parser.error(f"--dataset={name!r} is not one of {cli.DATASETS}")
    paths = []
    for name in names:
        try:
            paths += plot_dataset(args.save_dir, name, args.figures_dir or "figures", args.model)
        except FileNotFoundError as e:
            parser.error(str(e))
    return paths


def main(argv=None):
    """The `keras-wt-plot` console script (exit status 0 on success)."""
    plot_from_flags(argv)
    return 0


if __name__ == "__main__":
    main()
