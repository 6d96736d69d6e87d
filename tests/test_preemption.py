"""Crash-safe preemption: a training process killed at any point — inside a training epoch, inside
any write of a backup or of the run's records, while it resumes — and then resumed ends exactly
where an uninterrupted run ends: the same weights, feedback kernels `B`, optimizer state,
`results.json`, `history.csv` and TensorBoard scalars (each epoch exactly once), bit for bit.

Two kinds of chains run one command line in a subprocess again and again on the same run folder;
every run but the last is killed, the last finishes, and the run folder is compared with an
uninterrupted run's (keras-wt-train on a tiny MNIST-format dataset, the ImageNet trainer on fake
TFRecords):

* at named points: `tests/fault_injection.py` (test-only; the shipped code has no fault hooks)
  kills the process at the next point of a list, so the chain passes through every stage of a
  backup write once;
* at random instants: SIGKILL, SIGTERM or Ctrl-C (SIGINT) from outside, most of them while the
  run trains, restores or writes, some while it starts up. The default run kills a small sample;
  `pytest --long` runs `test_random_kills_across_rules` (24 kills across four rules, minutes).

Slow (a subprocess per run, ~10 s each on two cores).
"""

import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_same_run, read_text, tiny_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "tests", "fault_injection.py")
TIMEOUT_S = 300

# Points in the order a run reaches them, 3 epochs of 3 steps: kills in the first backup's
# writes (before its file is renamed there is no backup yet: the run starts over), inside
# epoch 2, and in the second backup's writes (resumed from the first backup, or, after the
# manifest, from the second). A kill between the first backup's rename and its manifest
# (manifest:1) leaves a complete file and no manifest: the next run recovers from the file, so
# it cannot reach written:1; the two chains together pass every point.
EVERY_POINT = ["weights:1", "renamed:1", "written:1", "batch:2:2", "weights:2", "renamed:2",
               "manifest:2", "written:2"]
SOME_POINTS = ["weights:1", "manifest:1", "batch:2:2", "manifest:2"]


def _env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return env


def _run(args, fault=None):
    command = [LAUNCHER, fault] + list(args) if fault else list(args)
    return subprocess.run([sys.executable] + command, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S, cwd=ROOT)


def _chain(args, points, resume_args=(), finish=True):
    """Runs `args`, killed at each of `points` in turn (resuming with `resume_args` after the
    first), then (`finish`) once more to the end."""
    for i, point in enumerate(points):
        out = _run(list(args) + (list(resume_args) if i else []), fault=point)
        assert out.returncode == -signal.SIGKILL, (point, out.returncode, out.stderr[-3000:])
    if finish:
        out = _run(list(args) + list(resume_args))
        assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("algo,points", [("kp", EVERY_POINT), ("wm", SOME_POINTS)])
def test_keras_wt_train_survives_a_kill_anywhere(data_dir, tmp_path, algo, points):
    """The chain of kills at points; for wm, then a sample of kills at random instants (SIGTERM,
    Ctrl-C) before the run finishes (the campaign: `test_random_kills_across_rules`)."""
    straight, *times = _straight_run(data_dir, tmp_path / "straight", algo, 3)
    killed_dir = tmp_path / "killed"
    flags = ["-m", "keras_wt.app.cli"] + tiny_flags(data_dir, killed_dir, algo, "--n_epochs", "3")
    run_dir = str(killed_dir / "mnist" / f"{algo}-V0")
    sample = algo == "wm"
    _chain(flags, points, resume_args=["--resume", run_dir], finish=not sample)
    if sample:
        landed = random_kill_chain(flags + ["--resume", run_dir], run_dir, 2, random.Random(7),
                                   *times, 3, signals=(signal.SIGTERM, signal.SIGINT))
        assert landed, "the run ended before a kill landed"
    assert os.listdir(killed_dir / "mnist") == [f"{algo}-V0"]  # always the same run continued
    assert_same_run(straight, run_dir, epochs=3)
    log = read_text(run_dir, "log.txt")
    # Each resumption is marked where it starts: after the first backup's manifest is in place
    # (written:1) the run resumes after epoch 1; a kill before it restarts from the first epoch.
    assert "Resuming" in log and "after epoch 1" in log
    assert "Restarting" in log


# --------------------------------------------------------------------------------------------
# Kills at random instants
# --------------------------------------------------------------------------------------------

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
# A killed process's status: killed by the signal, or (SIGINT) keras-wt-train's Ctrl-C exit.
KILLED = {-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 130}


def _epochs_done(run_dir):
    try:
        return json.loads(read_text(run_dir, os.path.join("backup", "manifest.json")))["epochs"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def random_kill_chain(args, run_dir, kills, rng, startup_s, setup_s, epoch_s, epochs,
                      signals=SIGNALS):
    """Runs `args` (with `--resume`) until `kills` processes were killed at random instants,
    then to the end (a process that ends before its kill finishes the run: the chain stops
    there). The instants, by kill: at a random point of the start-up (`startup_s`:
    imports, data) for every fourth; of the set-up once it logged that it starts training
    (`setup_s`: building, restoring, cutting the records back, compiling) for every fourth
    after the first; for the others, at a random point of the `epoch_s` seconds after the
    summary line of the next epoch (its records and its backup are being written, or the next
    epoch trains). The signal cycles through `signals`. Returns one `(signal, seconds after the
    process started, epochs backed up before, after)` per kill."""
    landed = []
    while True:
        log = _read_log(run_dir)
        before = _epochs_done(run_dir)
        start = time.monotonic()
        process = subprocess.Popen([sys.executable] + list(args), env=_env(), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        sig = signals[len(landed) % len(signals)] if len(landed) < kills else None
        if sig is not None:
            phase = len(landed) % 4
            if phase == 3:
                time.sleep(rng.uniform(0, startup_s))
            elif phase == 0:
                _wait_for(run_dir, "Training ", log, process, start)
                time.sleep(rng.uniform(0, setup_s))
            else:
                _wait_for(run_dir, f"epoch {before + 1}/{epochs} ", log, process, start)
                time.sleep(rng.uniform(0, epoch_s))
            if process.poll() is None:
                process.send_signal(sig)
            else:
                sig = None
        at = time.monotonic() - start
        _, err = process.communicate(timeout=TIMEOUT_S)
        if sig is not None and process.returncode in KILLED:
            landed.append((sig.name, round(at, 2), before, _epochs_done(run_dir)))
            assert "Traceback" not in err or process.returncode != 130, err[-3000:]
            continue
        assert process.returncode == 0, (process.returncode, err[-3000:])
        return landed


def _read_log(run_dir):
    try:
        return read_text(run_dir, "log.txt")
    except FileNotFoundError:
        return ""


def _wait_for(run_dir, text, log, process, start):
    """Until the run's log holds `text` once more than `log` did (or the process ended)."""
    while (_read_log(run_dir).count(text) == log.count(text) and process.poll() is None
           and time.monotonic() < start + TIMEOUT_S):
        time.sleep(0.01)


def _log_times(run_dir):
    """`{first two words of a message: its time}` of the lines of a run's log.txt, which begin
    "YYYY-MM-DD HH:MM:SS,mmm LEVEL message"."""
    times = {}
    for line in read_text(run_dir, "log.txt").splitlines():
        try:
            when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:  # the continuation of a message of several lines
            continue
        words = line[24:].split(" ")[1:3]
        times.setdefault(" ".join(words), when)
    return times


def _straight_run(data_dir, save_dir, algo, epochs):
    """An uninterrupted run: `(run folder, start-up seconds (until it logs that it starts
    training), set-up seconds (from there to its first epoch's summary line: building,
    compiling, the first epoch), an epoch's seconds (between summary lines))`, measured on it."""
    flags = tiny_flags(data_dir, save_dir, algo, "--n_epochs", str(epochs))
    run_dir = os.path.join(str(save_dir), "mnist", f"{algo}-V0")
    start = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "keras_wt.app.cli"] + flags, env=_env(),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    _wait_for(run_dir, "Training ", "", process, start)
    startup_s = time.monotonic() - start
    _, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, err[-3000:]
    times = _log_times(run_dir)
    summaries = [times[f"epoch {e}/{epochs}"] for e in range(1, epochs + 1)]
    epoch_s = float(np.median(np.diff(summaries)))
    return run_dir, startup_s, summaries[0] - times["Training mlp"], epoch_s


def _random_kills(data_dir, tmp_path, algo, kills, seed, epochs=6):
    straight, *times = _straight_run(data_dir, tmp_path / "straight", algo, epochs)
    killed_dir = tmp_path / "killed"
    run_dir = str(killed_dir / "mnist" / f"{algo}-V0")
    flags = tiny_flags(data_dir, killed_dir, algo, "--n_epochs", str(epochs), "--resume")
    landed = random_kill_chain(["-m", "keras_wt.app.cli"] + flags, run_dir, kills,
                               random.Random(seed), *times, epochs)
    print(f"{algo}: kills (signal, s after start, epochs backed up before, after): {landed}")
    assert len(landed) == kills
    assert os.listdir(killed_dir / "mnist") == [f"{algo}-V0"]
    assert_same_run(straight, run_dir, epochs=epochs)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("algo,seed", [("kp", 1), ("wm", 2), ("brsf", 3), ("sa", 4)])
def test_random_kills_across_rules(data_dir, tmp_path, algo, seed):
    """Six kills at random instants per rule, 24 in all (`pytest --long`)."""
    _random_kills(data_dir, tmp_path, algo, kills=6, seed=seed, epochs=12)


# --------------------------------------------------------------------------------------------
# The ImageNet trainer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """24 training and 8 validation JPEGs in the standard TFRecord layout."""
    from keras_wt.app.data import datasets

    directory = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("validation", 8)):
        images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(n)]
        datasets.write_imagenet_tfrecords(directory, images, rng.integers(0, 4, n), split,
                                          num_shards=2)
    return str(directory)


@pytest.mark.slow
# The weight mirror only (its noise counters and its warm-up are the most state to restore):
# keras-wt-train's chain above covers kp at every point, and both trainers write their state
# through the same `keras_wt.app.backup`.
@pytest.mark.parametrize("algo", ["wm"])
def test_imagenet_trainer_survives_a_kill_anywhere(fake_imagenet, tmp_path, algo):
    def flags(model_dir):
        return ["tpu/train_imagenet.py", "--strategy=default", f"--data_dir={fake_imagenet}",
                "--model=cnn", f"--model_dir={model_dir}", f"--algo={algo}", "--image_size=16",
                "--num_classes=4", "--batch_size=8", "--epochs=3", "--steps_per_epoch=3",
                "--train_examples=24", "--eval_examples=8",
                "--lr_per_256=0.32", "--warmup_epochs=1", "--mirror_warmup_steps=2",
                "--mirror_batch_size=8", "--seed=1", "--verbose=0",
                # Random images and labels: the loss rises past 2 × ln 4 in epoch 2, which does
                # not matter to resuming exactly.
                "--no-divergence_check"]

    assert _run(flags(tmp_path / "straight")).returncode == 0
    _chain(flags(tmp_path / "killed"), ["manifest:1", "batch:2:2", "written:2"])
    assert_same_run(str(tmp_path / "straight"), str(tmp_path / "killed"), epochs=3)
