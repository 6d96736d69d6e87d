"""The console scripts `keras-wt-train`, `keras-wt-sweep`, `keras-wt-plot`: flags parsed before
TensorFlow is imported (the flags themselves: `keras_wt.app.flags`), their values checked
against the configs they become after.

Importing the keras_wt library imports Keras and TensorFlow (several seconds, and TensorFlow's
own log lines); this module imports neither (`keras_wt` and `keras_wt.app` load lazily), so
`keras-wt-train --help` and an unknown flag or value answer at once; `main` then quiets TensorFlow's C++ log
(unless `--verbose 3` or `TF_CPP_MIN_LOG_LEVEL` says otherwise) and hands the validated flags to
`keras_wt.app.experiment.run` (what they mean: `keras_wt.app.published.train_config`).
`python -m keras_wt.app.cli` is `keras-wt-train`.
"""

import argparse
import contextlib
import logging
import os
import sys

# The flags (and the names they take, which tests check against the library's).
from keras_wt.app.flags import (  # noqa: F401
    ALGORITHMS,
    DATASETS,
    MODELS,
    NOISE_DISTRIBUTIONS,
    PUBLISHED_LEARNING_RATES,
    HelpFormatter,
    build_parser,
    check,
    parse_args,
    parse_flags,
)


@contextlib.contextmanager
def _quiet_tensorflow(verbose):
    """Inside it TensorFlow is imported and its devices set up without its C++ log (oneDNN and
    CUDA notices, "failed call to cuInit"), unless `--verbose 3` asks for it.

    `TF_CPP_MIN_LOG_LEVEL` (set unless the user set it) silences the C++ log after TensorFlow
    has initialised its logging; what TensorFlow 2.21 logs before that goes through Abseil to the
    standard error stream whatever the level (abseil/abseil-cpp#1718), so standard error is
    sent to /dev/null while TensorFlow is imported and its devices are listed. A Python error
    there still reaches the console: the stream is restored before it propagates."""
    if verbose >= 3:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    yield


class _Console(logging.StreamHandler):
    """The `keras_wt` log (the per-epoch summary lines) on standard output: the `sys.stdout` of
    the moment, so a replaced stream (a test's capture, a redirection) gets it too."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler sets it; the current sys.stdout is used instead
        pass


def _console_log(verbose=1):
    """The `keras_wt` log on the console: its INFO lines (the run's setup, one summary line per
    epoch) unless `--verbose 0`, which leaves warnings and errors (`log.txt` has everything)."""
    logger = logging.getLogger("keras_wt")
    console = next((h for h in logger.handlers if isinstance(h, _Console)), None)
    if console is None:
        console = _Console()
        logger.addHandler(console)
    console.setLevel(logging.WARNING if verbose == 0 else logging.INFO)
    logger.setLevel(logging.INFO)


def train_from_flags(argv=None):
    """Parses the command-line flags `argv` (default: `sys.argv[1:]`), runs the experiment and
    returns its run folder.

    Errors end in one line on standard error, never a traceback (unless `--verbose 3`): a bad
    flag exits with argparse's usage message (status 2), a command line that cannot be carried
    out (flags that contradict the run resumed, a `--save_dir` that is a file) with status 2,
    a failure while running (bad or missing data, a full or read-only disk, a run folder held by
    another process, a damaged backup, a run that diverged) with status 1, Ctrl-C with 130.
    """
    parser = build_parser()
    try:
        config, explicit = parse_flags(argv)  # before TensorFlow: the flags' own rules
    except ValueError as e:
        parser.error(str(e))
    try:
        with _quiet_tensorflow(config["verbose"]):
            from keras_wt.app import experiment
            from keras_wt.app import training
        try:
            check(config)  # the settings' ranges, each its config's rule
        except ValueError as e:
            parser.error(str(e))
        _console_log(config["verbose"])
        try:
            return experiment.run(config, explicit)
        except Exception as e:
            failure = training.describe_failure(e)
            if failure is None or config["verbose"] >= 3:
                raise
            status, message = failure
            parser.exit(status, f"{parser.prog}: error: {message}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted; continue the run with --resume\n")


def main(argv=None):
    """The `keras-wt-train` console script (exit status 0 on success)."""
    train_from_flags(argv)
    return 0


def build_sweep_parser():
    """The parser of `keras-wt-sweep`'s own flags; every other word is a `keras-wt-train` flag
    of the grid (`keras_wt.sweep.parse_grid`)."""
    parser = argparse.ArgumentParser(
        prog="keras-wt-sweep",
        usage="keras-wt-sweep --save_dir DIR [--shard i/n] [--summary_only] "
        "[--<keras-wt-train flag> VALUE [VALUE ...]] ...",
        description="Run a grid of keras-wt-train runs (every train flag may take several "
        "values; the grid is their product), skip finished runs, resume interrupted ones, and "
        "write DIR/summary.csv (mean and std over seeds) and DIR/figures/ (keras_wt.sweep).",
        epilog="example: keras-wt-sweep --save_dir sweeps/lr --algo bp fa kp --seed 1 2 3 "
        "--learning_rate 0.01 0.03 0.1 --n_epochs 20",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--save_dir", required=True, metavar="DIR",
                        help="the sweep's folder: DIR/runs/<point>/, DIR/summary.csv, "
                        "DIR/figures/")
    parser.add_argument("--shard", default=None, metavar="i/n",
                        help="run only the points whose number is i modulo n (0 <= i < n); "
                        "the summary covers the whole grid")
    parser.add_argument("--summary_only", action="store_true",
                        help="run nothing: write the summary and figures of what is there "
                        "(the grid of DIR/sweep.json unless grid flags are given)")
    return parser


def sweep_from_flags(argv=None):
    """Parses `keras-wt-sweep`'s command line, runs its points (`keras_wt.sweep`), writes the
    summary and figures; returns `{point name: outcome}`. Exit status 2 for a bad grid, 1 when
    a point failed (a divergence is a result, not a failure)."""
    parser = build_sweep_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    with _quiet_tensorflow(0):
        from keras_wt.app import sweep

    try:
        grid = sweep.parse_grid(rest) if rest else sweep.read_grid(args.save_dir)
        shard = sweep.parse_shard(args.shard) if args.shard else (0, 1)
        points = sweep.expand(grid)
        sweep.check_points(points, parse_args)
    except sweep.SweepError as e:
        parser.error(str(e))
    _console_log()
    outcomes = {}
    if not args.summary_only:
        sweep.write_grid(args.save_dir, grid)
        mine = sweep.shard_points(points, shard)
        logging.getLogger("keras_wt").info(
            "Sweep %s: %d points, %d in this shard", args.save_dir, len(points), len(mine))

        def train(point_argv):
            import keras

            try:
                train_from_flags(point_argv)
            finally:  # a fresh Keras state for the next point, as in a new process
                keras.backend.clear_session()

        outcomes = sweep.run_points(args.save_dir, mine, train)
    sweep.summarize(args.save_dir, grid)
    from keras_wt.app import sweep_plots

    sweep_plots.plot_sweep(args.save_dir)
    failed = sorted(name for name, outcome in outcomes.items() if outcome.startswith("failed"))
    if failed:
        parser.exit(1, f"{parser.prog}: error: {len(failed)} point(s) failed: "
                       f"{', '.join(failed)}; run the command again to retry them\n")
    return outcomes


def sweep_main(argv=None):
    """The `keras-wt-sweep` console script (exit status 0 when every point ran)."""
    sweep_from_flags(argv)
    return 0


def plot_main(argv=None):
    """The `keras-wt-plot` console script (`keras_wt.app.plots`), with TensorFlow's C++ log silenced
    as for `keras-wt-train` (it imports keras_wt, hence TensorFlow)."""
    with _quiet_tensorflow(0):
        from keras_wt.app import plots
    return plots.main(argv)


if __name__ == "__main__":
    sys.exit(main())
