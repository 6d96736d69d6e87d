"""The reference experiments: a run of `keras-wt-train`, new or resumed.

`keras-wt-train` (flags in `keras_wt.app.flags`) reproduces the command line of Akrout et al.'s
public NumPy code on top of `keras_wt.app.training.train`:

    keras-wt-train --dataset fashion_mnist --algo kp --n_epochs 5

What the flags mean, in keras_wt's units, is `keras_wt.app.published.train_config` (the published
units of the reference code converted there, once). A run writes the run folder of
`keras_wt.app.runs` in `<save_dir>/<dataset>/<algo>-V<i>/`; evaluated epochs (the first, every
`--test_frequency`-th after it and the last) are measured on the test set, and the weight and
delta angles on its first `keras_wt.app.published.PROBE_SIZE` examples. `--resume` continues an
interrupted run exactly (`keras_wt.app.backup.AtomicBackup`).
"""

import dataclasses
import logging
import os

from keras_wt import algorithms
from keras_wt.algorithms import Learning
from keras_wt.app import published
from keras_wt.app import runs
from keras_wt.app import training
from keras_wt.app.flags import validate

logger = logging.getLogger(__name__)

# Flags that may differ between an interrupted run and its `--resume`.
RESUMABLE_OVERRIDES = ("n_epochs", "data_dir", "verbose", "divergence_check")


class UsageError(ValueError):
    """The command line asks for something that cannot be done (exit status 2)."""


class ResumeError(UsageError):
    """`--resume` names no run, or flags that differ from the run's."""


def resolve_resume(config, explicit):
    """`(run_dir, config)` of the run to continue, or `(None, config)` for a new run.

    Without a folder, the latest `<algo>-V<i>` of the dataset whose saved flags agree with the
    flags given on the command line is continued. A run folder stopped before it saved its flags
    (`keras_wt.app.runs.is_unstarted`, no `experiment_config.json`) is started again in place with
    the flags given.

    Raises:
        ResumeError: `--resume` names no run folder, or one with other flags.
        keras_wt.app.runs.RunError: a run folder's saved flags are damaged.
    """
    fixed = sorted(set(explicit) - {"resume", "save_dir"} - set(RESUMABLE_OVERRIDES))
    resume = config["resume"]
    if resume == "latest":
        candidates = []
        for path in runs.run_dirs(config["save_dir"], config["dataset"], config["algo"]):
            saved = runs.read_config(path)
            if (saved is None and runs.is_unstarted(path)) or (
                    saved is not None and all(saved.get(f) == config[f] for f in fixed)):
                candidates.append(path)
        if not candidates:
            logger.info("--resume: no run of %s on %s in %s with these flags yet; starting a "
                        "new one", config["algo"], config["dataset"], config["save_dir"])
            return None, config
        resume = max(candidates, key=runs.run_version)
    if not os.path.isdir(resume):
        raise ResumeError(f"--resume={resume!r} is not a run folder: it does not exist")
    saved = runs.read_config(resume)
    if saved is None and runs.is_unstarted(resume):
        logger.info("%s was stopped before it saved its flags and holds nothing trained: "
                    "starting it again with the flags given", resume)
        return resume, dict(config, resume=None)
    if saved is None:
        raise ResumeError(f"--resume={resume!r} is not a run folder: it has no {runs.CONFIG_FILE}")
    for flag in fixed:
        if config[flag] != saved.get(flag):
            raise ResumeError(
                f"--{flag}={config[flag]!r} differs from the resumed run's {saved.get(flag)!r} "
                f"({resume}); only {RESUMABLE_OVERRIDES} may change when resuming"
            )
    flags = {flag: saved[flag] for flag in config if flag in saved}
    for flag in RESUMABLE_OVERRIDES:
        if flag in explicit:
            flags[flag] = config[flag]
    flags["resume"] = None
    flags["save_dir"] = config["save_dir"]
    return resume, validate(dict(config, **flags))


def ignored_flags(config, explicit):
    """The flags given that the algorithm does not use: the `--mirror_*` flags unless its `B`
    learns by mirroring, `--kp_weight_decay` unless it learns through the optimizer,
    `--local_loss_decay` unless it learns from a local loss."""
    learns = algorithms.get(config["algo"]).learns_feedback
    return sorted(
        flag for flag in explicit
        if (flag.startswith("mirror_") and learns != Learning.MIRROR)
        or (flag == "kp_weight_decay" and learns != Learning.OPTIMIZER)
        or (flag == "local_loss_decay" and learns != Learning.LOSS)
    )


def run(config, explicit=frozenset()):
    """Runs (or resumes) one experiment; returns its run folder.

    A new run's folder is deleted again when the run fails before it trained anything (bad
    data, an unwritable disk); a run folder this call did not create is never deleted.

    Args:
        config: the flag dict of `keras_wt.app.cli.parse_args`.
        explicit: the flags given on the command line (used to check a `--resume`).
    """
    ignored = ignored_flags(config, explicit)
    if ignored:
        logger.warning("%s: not used by --algo %s, ignored",
                       ", ".join(f"--{flag}" for flag in ignored), config["algo"])
    run_dir, config = resolve_resume(config, set(explicit)) if config["resume"] else (None, config)
    settings = published.train_config(config)  # bad settings fail here, before a folder is made
    new = run_dir is None
    if new:
        save_dir = config["save_dir"]
        if os.path.exists(save_dir) and not os.path.isdir(save_dir):
            raise UsageError(f"--save_dir={save_dir!r} is a file, not a folder: runs are written "
                             "to <save_dir>/<dataset>/<algo>-V<i>/")
        run_dir = runs.new_run_dir(save_dir, config["dataset"], config["algo"])
        logger.info("New run %s", run_dir)
    with runs.RunLock(run_dir):  # at once: nobody takes a new folder over (train takes it too)
        try:
            training.train(dataclasses.replace(settings, model_dir=run_dir), flags=config,
                           derived=published.derived(settings))
        except Exception:
            if new:  # bad data, a full disk...: leave no run folder that never trained behind
                runs.remove_unstarted(run_dir)
            raise
    return run_dir
