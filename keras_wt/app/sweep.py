"""Sweeps: a grid of `keras-wt-train` runs, its summary over seeds and its figures.

    keras-wt-sweep --save_dir sweeps/lr --algo bp fa kp --seed 1 2 3 \\
        --learning_rate 0.01 0.03 0.1 0.3 --n_epochs 20 [--shard 0/4]

Every `keras-wt-train` flag may take several values, and the grid is their product (here
3 rules × 3 seeds × 4 rates = 36 runs). A value with commas is one value of a flag that takes
a list (`--size_hidden_layers 500 250,250`: two points, `[500]` and `[250, 250]`); a flag given
without a value (`--no-batch_norm`) goes to every run unchanged. Every point is checked by
`keras-wt-train`'s own parser before anything runs.

The sweep folder:

    DIR/sweep.json                        the grid of the last call (flags and their values)
    DIR/runs/<point>/                     one point's --save_dir; <point> names its settings,
                                          e.g. algo=kp,learning_rate=0.1,n_epochs=20,seed=2
    DIR/runs/<point>/<dataset>/<algo>-V0/ its run folder (keras_wt.app.runs's format)
    DIR/summary.csv                       one row per cell: a point without its seed
    DIR/figures/<flag>.png                final test accuracy against each swept setting

A point is run as `keras-wt-train <its flags> --save_dir DIR/runs/<point> --resume`, in this
process, one after another: a finished point (its `model.keras` written) or one that diverged
(`diverged.json`) is skipped, an interrupted one resumes from its last epoch, bit for bit. So
re-running the command after a kill, a preemption or an extension of the grid does only what is
left. The points are numbered in the grid's order; `--shard i/n` runs those whose number is
`i` modulo `n` (0 ≤ i < n), so that `n` processes or the tasks of a cluster's array job share a
grid over a shared filesystem. Each point is claimed with `keras_wt.app.runs.RunLock` on its
folder: a point another process is running is left to it, whatever the sharding.
"""

import csv
import itertools
import logging
import math
import os

from keras_wt.app import runs as runs_lib

logger = logging.getLogger(__name__)

GRID_FILE = "sweep.json"
SUMMARY_FILE = "summary.csv"
RUNS_DIR = "runs"
FIGURES_DIR = "figures"
# Flags a sweep sets itself.
RESERVED_FLAGS = ("save_dir", "resume")
# Flags that do not change a run's result: left out of the point's name.
UNNAMED_FLAGS = ("data_dir", "verbose")
SUMMARY_STATS = ("n", "final_mean", "final_std", "best_mean", "best_std", "diverged", "pending")


class SweepError(ValueError):
    """A sweep's command line or folder cannot be used; the message says why."""


def parse_grid(tokens):
    """`{flag: [value, ...]}` of a sweep's `keras-wt-train` flags, in the order given.

    `tokens` are command-line words: `--flag v1 v2 ...` or `--flag=v`; a flag without values
    maps to `[]` (it is passed unchanged).

    Raises:
        SweepError: a value before any flag, a flag given twice, or a flag the sweep sets.
    """
    grid = {}
    flag = None
    for token in tokens:
        if token.startswith("--"):
            name, has_value, value = token[2:].partition("=")
            if not name:
                raise SweepError(f"{token!r} is not a flag")
            if name in grid:
                raise SweepError(f"--{name} is given twice: give all its values after one --{name}")
            if name in RESERVED_FLAGS:
                raise SweepError(
                    f"--{name} is set by the sweep (--save_dir is the sweep's folder, each point "
                    "resumes its own run); leave it out of the grid"
                )
            grid[name] = [value] if has_value else []
            flag = None if has_value else name
        elif flag is None:
            raise SweepError(f"the value {token!r} does not follow a flag")
        else:
            grid[flag].append(token)
    return grid


def _flag_words(flag, value):
    if value is None:
        return [f"--{flag}"]
    return [f"--{flag}", *value.split(",")]


def expand(grid):
    """Every point of `grid`: a list of `{flag: value}` (`None` for a flag without values), in
    the order of `itertools.product` over the flags as given."""
    flags = list(grid)
    choices = [grid[f] or [None] for f in flags]
    return [dict(zip(flags, values)) for values in itertools.product(*choices)]


def point_name(point):
    """The folder name of a point: its settings with a value, sorted by flag
    (`algo=kp,learning_rate=0.1,seed=2`); path separators in values become `_`."""
    parts = [
        f"{flag}={value.replace(os.sep, '_')}" for flag, value in sorted(point.items())
        if value is not None and flag not in UNNAMED_FLAGS
    ]
    return ",".join(parts) or "default"


def point_argv(point):
    """The `keras-wt-train` words of a point (without --save_dir and --resume)."""
    argv = []
    for flag, value in point.items():
        argv += _flag_words(flag, value)
    return argv


def parse_shard(text):
    """`(i, n)` of `--shard i/n`.

    Raises:
        SweepError: not two integers with 0 <= i < n.
    """
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        i = n = None
    if i is None or not 0 <= i < n:
        raise SweepError(f"--shard={text!r} is not allowed: it must be i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def check_points(points, parse_args):
    """Runs `keras-wt-train`'s parser (`parse_args(argv) -> (config, explicit)`) on every point,
    so that no run starts before every point is known to be valid.

    Raises:
        SweepError: naming the point and the parser's reason.
    """
    for point in points:
        argv = point_argv(point) + ["--save_dir", "unused"]
        try:
            parse_args(argv)
        except (ValueError, SystemExit) as e:
            reason = str(e) if isinstance(e, ValueError) else "see the message above"
            raise SweepError(f"the point {point_name(point)} is not a valid run: {reason}") from None


def run_folder(point_dir):
    """The run folder under a point's folder (`<dataset>/<algo>-V<i>` holding a configuration;
    the latest), or `None`."""
    if not os.path.isdir(point_dir):
        return None
    found = []
    for dataset in sorted(os.listdir(point_dir)):
        for run_dir in runs_lib.run_dirs(point_dir, dataset):
            if os.path.exists(os.path.join(run_dir, runs_lib.CONFIG_FILE)):
                found.append((runs_lib.run_version(run_dir), run_dir))
    return max(found)[1] if found else None


def state(point_dir):
    """`"finished"`, `"diverged"`, `"started"` or `"new"`."""
    run_dir = run_folder(point_dir)
    if run_dir is None:
        return "new"
    if os.path.exists(os.path.join(run_dir, runs_lib.DIVERGED_FILE)):
        return "diverged"
    if os.path.exists(os.path.join(run_dir, runs_lib.MODEL_FILE)):
        return "finished"
    return "started"


def shard_points(points, shard):
    i, n = shard
    return [p for k, p in enumerate(points) if k % n == i]


def run_points(save_dir, points, train):
    """Runs every point not finished, diverged or held by another process.

    Args:
        train: `train(argv)`, one `keras-wt-train` run in this process (raises `SystemExit`
            with a non-zero code when it fails).

    Returns:
        `{point name: outcome}`: "finished" (already, or now), "diverged", "taken" (another
        process holds it) or "failed (status s)".
    """
    outcomes = {}
    for k, point in enumerate(points):
        name = point_name(point)
        point_dir = os.path.join(save_dir, RUNS_DIR, name)
        os.makedirs(point_dir, exist_ok=True)
        try:
            with runs_lib.RunLock(point_dir):
                before = state(point_dir)
                if before in ("finished", "diverged"):
                    logger.info("[%d/%d] %s: %s, skipped", k + 1, len(points), name, before)
                    outcomes[name] = before
                    continue
                logger.info("[%d/%d] %s: %s", k + 1, len(points), name,
                            "resuming" if before == "started" else "starting")
                status = 0
                try:
                    train(point_argv(point) + ["--save_dir", point_dir, "--resume"])
                except SystemExit as e:
                    status = e.code if isinstance(e.code, int) else 1
                after = state(point_dir)
                if after == "diverged" or (status == 0 and after == "finished"):
                    outcomes[name] = after
                else:
                    outcomes[name] = f"failed (status {status})"
                    logger.warning("%s failed with status %s; the sweep goes on", name, status)
        except runs_lib.RunLocked:
            logger.info("[%d/%d] %s: taken by another process, left to it", k + 1, len(points),
                        name)
            outcomes[name] = "taken"
    return outcomes


def _accuracies(run_dir):
    """`(final, best)` test accuracy of a run's `results.json` (`None` when not evaluated)."""
    _, results = runs_lib.load_results(run_dir)
    values = [
        results[key]["test_accuracy"] for key in sorted(results, key=runs_lib.key_epoch)
        if "test_accuracy" in results[key]
    ]
    return (values[-1], max(values)) if values else (None, None)


def _mean_std(values):
    if not values:
        return "", ""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, ""
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(save_dir, grid):
    """Writes `DIR/summary.csv`, one row per cell of the grid (a point without its seed): the
    cell's settings, `n` (finished runs), the mean and sample standard deviation (n − 1) over
    seeds of the final and of the best test accuracy, and how many runs diverged or are not
    finished. Returns the rows (dicts)."""
    flags = [f for f in grid if f != "seed" and f not in UNNAMED_FLAGS]
    cells = {}
    for point in expand(grid):
        key = tuple(point[f] for f in flags)
        cell = cells.setdefault(key, {"final": [], "best": [], "diverged": 0, "pending": 0})
        point_dir = os.path.join(save_dir, RUNS_DIR, point_name(point))
        status = state(point_dir)
        if status == "diverged":
            cell["diverged"] += 1
            continue
        final, best = _accuracies(run_folder(point_dir)) if status == "finished" else (None, None)
        if final is None:
            cell["pending"] += 1
            continue
        cell["final"].append(final)
        cell["best"].append(best)
    rows = []
    for key, cell in cells.items():
        row = {f: ("" if v is None else v) for f, v in zip(flags, key)}
        row["n"] = len(cell["final"])
        row["final_mean"], row["final_std"] = _mean_std(cell["final"])
        row["best_mean"], row["best_std"] = _mean_std(cell["best"])
        row["diverged"], row["pending"] = cell["diverged"], cell["pending"]
        rows.append(row)
    path = os.path.join(save_dir, SUMMARY_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=flags + list(SUMMARY_STATS))
        writer.writeheader()
        writer.writerows(rows)
    runs_lib.replace_file(tmp, path)
    return rows


def write_grid(save_dir, grid):
    os.makedirs(save_dir, exist_ok=True)
    runs_lib.write_json(os.path.join(save_dir, GRID_FILE), {"grid": grid})


def read_grid(save_dir):
    """The grid of `DIR/sweep.json`.

    Raises:
        SweepError: there is none.
    """
    path = os.path.join(save_dir, GRID_FILE)
    if not os.path.exists(path):
        raise SweepError(f"{save_dir} holds no {GRID_FILE}: give the grid's flags")
    try:
        return runs_lib.read_json(path)["grid"]
    except (ValueError, KeyError, TypeError):
        raise SweepError(f"{path} is damaged: give the grid's flags again") from None


def read_summary(save_dir):
    """The rows of `DIR/summary.csv` (strings), and its settings columns."""
    path = os.path.join(save_dir, SUMMARY_FILE)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        flags = [c for c in reader.fieldnames if c not in SUMMARY_STATS]
    return rows, flags
