"""Figures of a `keras-wt-sweep` folder: the final test accuracy against each swept setting
(`sweep_figures`), drawn from its `summary.csv` by `plot_sweep` (`keras-wt-plot --sweep DIR`,
and `keras-wt-sweep` itself after running)."""

import logging
import os

from matplotlib.figure import Figure

from keras_wt.algorithms import LONG_NAMES
from keras_wt.app.plots import COLORS, LINESTYLES, _write_figures

logger = logging.getLogger(__name__)


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def sweep_figures(rows, flags):
    """Figures of a sweep's summary rows (`keras_wt.app.sweep.read_summary`): for every swept
    numeric setting, the final test accuracy against it, mean over seeds with a band of ± one
    standard deviation, one curve per rule (and per value of the other swept settings); a point
    where every run diverged is an `x` at the bottom of the axes in its curve's colour. The axis
    is logarithmic when the values span 10× or more (symmetric-log when one of them is 0), with
    a tick at each swept value. A sweep of rules alone gets `"algo"`: each rule's mean ± std.
    Returns `{setting: Figure}`."""
    varying = [f for f in flags if len({row[f] for row in rows}) > 1]
    figures = {}
    for flag in varying:
        xs = {row[flag]: _number(row[flag]) for row in rows}
        if flag == "algo" or any(x is None for x in xs.values()):
            continue
        others = [f for f in varying if f != flag]
        curves = {}
        for row in rows:
            curves.setdefault(tuple(row[f] for f in others), []).append(row)
        fig = Figure(figsize=(8.4, 4.4), dpi=100)
        ax = fig.add_subplot()
        diverged_marks = []
        for i, (key, curve) in enumerate(sorted(curves.items())):
            curve.sort(key=lambda row: xs[row[flag]])
            done = [row for row in curve if row["final_mean"] != ""]
            x = [xs[row[flag]] for row in done]
            mean = [float(row["final_mean"]) for row in done]
            std = [float(row["final_std"] or 0.0) for row in done]
            settings = dict(zip(others, key))
            algo = settings.pop("algo", None)
            color = COLORS.get(algo, f"C{i % 10}")
            label = ", ".join(
                ([LONG_NAMES.get(algo, algo)] if algo else [])
                + [f"{f}={v}" for f, v in settings.items()]
            ) or None
            ax.fill_between(x, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=color, alpha=0.2,
                            linewidth=0)
            ax.plot(x, mean, color=color, marker="o", markersize=3,
                    linestyle=LINESTYLES[(i if algo is None else 0) % len(LINESTYLES)],
                    label=label)
            diverged_marks += [(xs[row[flag]], color) for row in curve
                               if row["final_mean"] == "" and int(row.get("diverged") or 0)]
        for x, color in diverged_marks:  # at the bottom of the axes, whatever its y range
            ax.plot([x], [0.03], transform=ax.get_xaxis_transform(), color=color, marker="x",
                    markersize=7, linestyle="none", clip_on=False)
        if diverged_marks:
            ax.plot([], [], color="grey", marker="x", linestyle="none",
                    label="all runs diverged")
        _swept_axis(ax, sorted(xs.items(), key=lambda item: item[1]))
        ns = sorted({int(row["n"]) for row in rows if int(row["n"] or 0) > 0})
        ax.set_xlabel(flag)
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"Final test accuracy against {flag} "
                     f"(mean ± std over {'/'.join(map(str, ns))} seeds)", fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        figures[flag] = fig
    if not figures and "algo" in varying:
        figures["algo"] = _sweep_rules_figure(rows, flags)
    return figures


def _swept_axis(ax, values):
    """A tick at each swept `(text, value)`, labelled as given; a log axis when the positive
    values span 10× or more (symmetric-log, linear below the smallest positive value, when one
    of them is 0)."""
    positive = [x for _, x in values if x > 0]
    if positive and max(positive) >= 10 * min(positive):
        if len(positive) == len(values):
            ax.set_xscale("log")
        elif all(x >= 0 for _, x in values):
            ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xticks([x for _, x in values], [text for text, _ in values])
    ax.minorticks_off()


def _sweep_rules_figure(rows, flags):
    """A sweep over rules (and seeds) only: the final test accuracy of each rule, mean over
    seeds with ± one standard deviation."""
    rows = [row for row in rows if row["final_mean"] != ""]
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        algo = row["algo"]
        ax.errorbar([i], [float(row["final_mean"])], yerr=[float(row["final_std"] or 0.0)],
                    color=COLORS.get(algo, "gray"), marker="o", capsize=4)
    ax.set_xticks(range(len(rows)), [row["algo"] for row in rows])
    ns = sorted({int(row["n"]) for row in rows})
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"Final test accuracy per rule (mean ± std over {'/'.join(map(str, ns))} seeds)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def plot_sweep(save_dir, figures_dir=None):
    """Draws `sweep_figures` of `<save_dir>/summary.csv` into `figures_dir` (default
    `<save_dir>/figures`) as `<setting>.png`; returns the paths written.

    Raises:
        FileNotFoundError: the sweep has no summary yet.
    """
    from keras_wt.app import sweep

    path = os.path.join(save_dir, sweep.SUMMARY_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run keras-wt-sweep --save_dir "
                                f"{save_dir} first")
    rows, flags = sweep.read_summary(save_dir)
    paths = _write_figures(sweep_figures(rows, flags),
                           figures_dir or os.path.join(save_dir, sweep.FIGURES_DIR))
    if paths:
        logger.info("Wrote %s", ", ".join(paths))
    return paths
