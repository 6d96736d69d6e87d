"""Nothing lost and nothing silently wrong around a run: damaged backups and records, two
writers, early kills, divergence, bad data and environment faults. Next to the kill chains of
`tests/test_preemption.py`; the faults are made here, from the test side (damaged files, a
second process, monkeypatched OS calls, a file-size limit), never by hooks in the package.

Every case ends in a correct recovery (the run then equals an uninterrupted one) or in a refusal
of one line on standard error with exit status 1 (a failure while running) or 2 (bad usage),
never in a traceback or a silently wrong run.
"""

import errno
import hashlib
import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_wt.app import cli
from conftest import BATCH, N_TRAIN, assert_same_run, read_text, tiny_flags, write_idx
from keras_wt.app import backup as backup_lib
from keras_wt import layers as wt
from keras_wt import models
from keras_wt.app import resume
from keras_wt.app import runs
from keras_wt.app import callbacks as run_callbacks
from keras_wt.app import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = -(-N_TRAIN // BATCH)  # steps per epoch of the tiny dataset (3)


def _main(argv, capsys):
    """`(exit status, stdout, stderr)` of keras-wt-train run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_refused(code, err, status, *words):
    """A one-line refusal with `status` that says each of `words`, without a traceback."""
    assert code == status, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


# --------------------------------------------------------------------------------------------
# Verified backups (keras_wt.app.backup), without training runs: a model stepped by hand
# --------------------------------------------------------------------------------------------


def _tiny_model():
    model = keras.Sequential([keras.Input((3,)), wt.Dense(2, feedback="fa")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    return model


def _backed_up(tmp_path, epochs=3, keep=False):
    """A model trained one step per epoch for `epochs` epochs, backed up after each; returns
    `(backup folder, {epochs: [weights and optimizer variables]})`."""
    model = _tiny_model()
    backup = backup_lib.AtomicBackup(str(tmp_path / "backup"), keep=keep, steps_per_epoch=1)
    backup.set_model(model)
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    states = {}
    for epoch in range(1, epochs + 1):
        model.train_on_batch(x, y)
        backup.save(epoch)
        states[epoch] = [np.array(v) for v in model.weights + model.optimizer.variables]
    return str(tmp_path / "backup"), states


def _restore(directory, steps_per_epoch=1):
    model = _tiny_model()
    epochs = backup_lib.AtomicBackup(directory, steps_per_epoch=steps_per_epoch).restore(model)
    return epochs, [np.array(v) for v in model.weights + model.optimizer.variables]


def _assert_state(state, expected):
    assert len(state) == len(expected)
    for a, b in zip(state, expected):
        np.testing.assert_array_equal(a, b)


def _flip_byte(path, where=0.5):
    data = bytearray(open(path, "rb").read())
    data[int(len(data) * where)] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_the_manifest_records_each_backups_checksum_and_keeps_the_previous_one(tmp_path):
    directory, states = _backed_up(tmp_path)
    manifest = json.loads(read_text(directory, "manifest.json"))
    # The newest backup and the one before it (the fallback); the first is deleted.
    assert sorted(os.listdir(directory)) == [
        "epoch-0002.weights.h5", "epoch-0003.weights.h5", "manifest.json"]
    assert (manifest["epochs"], manifest["iterations"], manifest["steps_per_epoch"]) == (3, 3, 1)
    assert [e["epochs"] for e in manifest["previous"]] == [2]
    for entry in [manifest] + manifest["previous"]:
        with open(os.path.join(directory, entry["weights"]), "rb") as f:
            assert entry["sha256"] == hashlib.sha256(f.read()).hexdigest()
    epochs, state = _restore(directory)
    assert epochs == 3
    _assert_state(state, states[3])
    directory, _ = _backed_up(tmp_path / "kept", keep=True)  # per-epoch checkpoints
    assert [e["epochs"] for e in json.loads(read_text(directory, "manifest.json"))["previous"]] \
        == [2, 1]


@pytest.mark.parametrize("damage,says", [
    (lambda d: _flip_byte(os.path.join(d, "epoch-0003.weights.h5")), "checksum differs"),
    (lambda d: _flip_byte(os.path.join(d, "epoch-0003.weights.h5"), where=0.999),
     "checksum differs"),
    (lambda d: os.truncate(os.path.join(d, "epoch-0003.weights.h5"), 1000), "checksum differs"),
    (lambda d: os.remove(os.path.join(d, "epoch-0003.weights.h5")), "file is missing"),
    # "epochs": 3 -> 5 would skip two epochs: 3 steps are not 5 epochs of 1 step.
    (lambda d: _edit_manifest(d, epochs=5), "3 steps after 5 epochs"),
    (lambda d: _edit_manifest(d, iterations=2), "2 steps after 3 epochs"),
])
def test_a_damaged_newest_backup_falls_back_to_the_previous_one(tmp_path, caplog, damage, says):
    directory, states = _backed_up(tmp_path)
    damage(directory)
    with caplog.at_level(logging.WARNING, "keras_wt"):
        epochs, state = _restore(directory)
    assert epochs == 2
    _assert_state(state, states[2])
    assert "epoch-0003.weights.h5" in caplog.text and says in caplog.text
    assert "Resuming from epoch-0002.weights.h5" in caplog.text


def _edit_manifest(directory, **changes):
    path = os.path.join(directory, "manifest.json")
    manifest = dict(json.loads(read_text(directory, "manifest.json")), **changes)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _a_format_1_manifest(directory):
    """The manifest as keras_wt wrote it before checksums (runs made then still resume)."""
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"epochs": 3, "iterations": 3, "weights": "epoch-0003.weights.h5"}, f)


@pytest.mark.parametrize("damage,says", [
    (lambda d: os.remove(os.path.join(d, "manifest.json")), "manifest.json is missing"),
    (lambda d: open(os.path.join(d, "manifest.json"), "w").close(), "manifest.json is damaged"),
    (lambda d: open(os.path.join(d, "manifest.json"), "w").write('{"epochs": 3, "iter'),
     "manifest.json is damaged"),
    (lambda d: open(os.path.join(d, "manifest.json"), "w").write("[3]"),
     "manifest.json is damaged"),
    (_a_format_1_manifest, None),
])
def test_a_missing_or_damaged_manifest_is_recovered_from_the_backup_files(
        tmp_path, caplog, damage, says):
    directory, states = _backed_up(tmp_path)
    damage(directory)
    with caplog.at_level(logging.WARNING, "keras_wt"):
        epochs, state = _restore(directory)
    assert epochs == 3
    _assert_state(state, states[3])
    if says:  # the files' step counts are checked; their checksums were in the manifest
        assert says in caplog.text and "checksum is unknown" in caplog.text
    # The next backup writes a complete manifest again, listing what it kept.
    model = _tiny_model()
    backup = backup_lib.AtomicBackup(directory, steps_per_epoch=1)
    assert backup.restore(model) == 3
    model.train_on_batch(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
    backup.save(4)
    manifest = json.loads(read_text(directory, "manifest.json"))
    assert manifest["epochs"] == 4 and [e["epochs"] for e in manifest["previous"]] == [3]
    assert sorted(os.listdir(directory)) == [
        "epoch-0003.weights.h5", "epoch-0004.weights.h5", "manifest.json"]


def test_when_no_backup_passes_its_checks_the_restore_is_refused_naming_each(tmp_path):
    directory, _ = _backed_up(tmp_path)
    for name in ("epoch-0002.weights.h5", "epoch-0003.weights.h5"):
        _flip_byte(os.path.join(directory, name))
    with pytest.raises(backup_lib.BackupError) as info:
        _restore(directory)
    message = str(info.value)
    assert "\n" not in message and "Refusing to resume" in message
    assert "epoch-0003.weights.h5: its checksum" in message
    assert "epoch-0002.weights.h5: its checksum" in message
    # Without a manifest the files are checked by loading them: another run's file (its step
    # count is not epochs × steps_per_epoch of this run) is refused too.
    directory, _ = _backed_up(tmp_path / "other")
    os.remove(os.path.join(directory, "manifest.json"))
    with pytest.raises(backup_lib.BackupError, match="holds step 3, not the 6 recorded"):
        _restore(directory, steps_per_epoch=2)
    # A damaged manifest and no file at all: nothing to resume from, and no silent restart.
    os.makedirs(tmp_path / "empty" / "backup")
    open(tmp_path / "empty" / "backup" / "manifest.json", "w").close()
    with pytest.raises(backup_lib.BackupError, match="manifest.json is damaged"):
        _restore(str(tmp_path / "empty" / "backup"))
    assert _restore(str(tmp_path / "none"))[0] == 0  # no backup yet: a new run


# --------------------------------------------------------------------------------------------
# Records of a resumed run (keras_wt.app.resume)
# --------------------------------------------------------------------------------------------


def test_history_is_cut_back_to_the_backed_up_epochs_byte_for_byte(tmp_path):
    path = str(tmp_path / "history.csv")
    rows = ["epoch,accuracy,loss\r\n", "0,10.5,2.25\r\n", "1,20.5,1.25\r\n", "2,30.5,0.75\r\n"]
    with open(path, "w", newline="") as f:
        f.write("".join(rows) + "3,40.5,0.")  # the last row cut short by a kill
    kept = resume.trim_history(path, 2)
    assert read_text(str(tmp_path), "history.csv") == "".join(rows[:3])
    assert kept == {1: {"epoch": "0", "accuracy": "10.5", "loss": "2.25"},
                    2: {"epoch": "1", "accuracy": "20.5", "loss": "1.25"}}
    assert resume.trim_history(path, 0) == {}
    assert read_text(str(tmp_path), "history.csv") == rows[0]
    with open(path, "wb") as f:  # damage: CSVLogger starts the file again, with a warning
        f.write(b"\xff\xfe\x00garbage")
    assert resume.trim_history(path, 2) == {}
    assert read_text(str(tmp_path), "history.csv") == ""


# --------------------------------------------------------------------------------------------
# keras-wt-train on damaged run folders: recover and equal an uninterrupted run, or refuse
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs_kp(data_dir, tmp_path_factory):
    """kp on the tiny dataset: an uninterrupted 3-epoch run, and a run of 2 epochs that
    `--resume --n_epochs 3` continues."""
    root = tmp_path_factory.mktemp("runs_kp")
    straight = cli.train_from_flags(tiny_flags(data_dir, root / "straight", "kp",
                                               "--n_epochs", "3"))
    stopped = cli.train_from_flags(tiny_flags(data_dir, root / "stopped", "kp",
                                              "--n_epochs", "2"))
    return straight, stopped


def _copy(run, tmp_path):
    target = str(tmp_path / "mnist" / "kp-V0")
    shutil.copytree(run, target)
    return target


def _resume_to_3(data_dir, run_dir, capsys):
    save_dir = os.path.dirname(os.path.dirname(run_dir))
    return _main(tiny_flags(data_dir, save_dir, "kp", "--n_epochs", "3", "--resume", run_dir),
                 capsys)


def _remove(run_dir, *names):
    for name in names:
        path = os.path.join(run_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


@pytest.mark.parametrize("damage,says", [
    # The newest backup damaged: resumed from the one before (epoch 1), epoch 2 trained again.
    (lambda r: _flip_byte(os.path.join(r, "backup", "epoch-0002.weights.h5")), "checksum"),
    # An unreadable manifest: recovered from the backup files.
    (lambda r: open(os.path.join(r, "backup", "manifest.json"), "w").write("{"), "damaged"),
    # results.json deleted: rebuilt from history.csv.
    (lambda r: _remove(r, "results.json"), "Rebuilt epochs 1, 2"),
])
def test_keras_wt_train_recovers_from_a_damaged_run_folder(
        data_dir, tmp_path, capsys, runs_kp, damage, says):
    straight, stopped = runs_kp
    run_dir = _copy(stopped, tmp_path)
    damage(run_dir)
    code, out, err = _resume_to_3(data_dir, run_dir, capsys)
    assert code == 0, err
    assert says in out and says in read_text(run_dir, "log.txt")  # never silent
    assert_same_run(straight, run_dir, epochs=3)


@pytest.mark.parametrize("damage,says", [
    (lambda r: [_flip_byte(os.path.join(r, "backup", f"epoch-000{e}.weights.h5"))
                for e in (1, 2)], "No usable backup"),
    (lambda r: _remove(r, "backup"), "holds no backup: refusing to start it over"),
    (lambda r: _remove(r, "results.json", "history.csv"), "cannot rebuild epochs 1, 2"),
    (lambda r: open(os.path.join(r, "experiment_config.json"), "w").write('{"algo": '),
     "experiment_config.json is damaged"),
])
def test_keras_wt_train_refuses_a_run_folder_it_cannot_trust(
        data_dir, tmp_path, capsys, runs_kp, damage, says):
    _, stopped = runs_kp
    run_dir = _copy(stopped, tmp_path)
    damage(run_dir)
    log = read_text(run_dir, "log.txt")
    code, _, err = _resume_to_3(data_dir, run_dir, capsys)
    _assert_refused(code, err, 1, says)
    assert read_text(run_dir, "log.txt").startswith(log)  # kept, and says why it stopped


def test_a_resumed_run_that_skips_evaluation_keeps_the_history_columns(
        data_dir, tmp_path, capsys):
    """--test_frequency 2: the resumed run's first epoch (2) is not evaluated, so it logs fewer
    keys than the run's first epoch did; its row still lines up with the header."""
    straight = cli.train_from_flags(tiny_flags(data_dir, tmp_path / "a", "bp", "--n_epochs",
                                               "3", "--test_frequency", "2"))
    stopped = cli.train_from_flags(tiny_flags(data_dir, tmp_path / "b", "bp", "--n_epochs",
                                              "1", "--test_frequency", "2"))
    resumed = cli.train_from_flags(tiny_flags(data_dir, tmp_path / "b", "bp", "--n_epochs",
                                              "3", "--test_frequency", "2", "--resume"))
    assert resumed == stopped
    history = read_text(resumed, "history.csv")
    assert history == read_text(straight, "history.csv")
    assert history.splitlines()[2].count(",NA") >= 2  # epoch 2: no test loss, no test accuracy


# --------------------------------------------------------------------------------------------
# One writer per run folder
# --------------------------------------------------------------------------------------------

HOLDER = """
import fcntl, os, sys, time
f = open(os.path.join(sys.argv[1], "run.lock"), "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"{os.getpid()}\\n"); f.flush()
print("held", flush=True)
time.sleep(120)
"""


def test_the_run_lock_admits_one_process_names_the_holder_and_dies_with_it(tmp_path):
    run_dir = str(tmp_path)
    with runs.RunLock(run_dir), runs.RunLock(run_dir):  # reentrant within a process
        assert read_text(run_dir, "run.lock") == f"{os.getpid()}\n"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(runs.RunLocked, match=f"being written by process {holder.pid}"):
            with runs.RunLock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    with runs.RunLock(run_dir):  # the kernel released the dead holder's lock
        assert read_text(run_dir, "run.lock") == f"{os.getpid()}\n"
    assert os.path.exists(os.path.join(run_dir, "run.lock"))  # never deleted


@pytest.mark.slow
def test_two_resumes_of_one_run_never_train_it_together(data_dir, tmp_path, capsys, runs_kp):
    """A --resume while another process trains the folder is refused with that process's pid;
    the folder is trained once, each epoch recorded once."""
    straight, stopped = runs_kp
    run_dir = _copy(stopped, tmp_path)
    flags = tiny_flags(data_dir, tmp_path, "kp", "--n_epochs", "3", "--resume", run_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    other = subprocess.Popen([sys.executable, "-m", "keras_wt.app.cli"] + flags, cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while "Training mlp" not in read_text(run_dir, "log.txt").split("Saved the trained")[-1]:
        assert other.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    log = read_text(run_dir, "log.txt")
    code, _, err = _main(flags, capsys)  # while the other process compiles and trains
    _, other_err = other.communicate(timeout=300)
    assert other.returncode == 0, other_err
    _assert_refused(code, err, 1, f"being written by process {other.pid}")
    assert read_text(run_dir, "log.txt").startswith(log)  # the refused process wrote nothing
    assert_same_run(straight, run_dir, epochs=3)


# --------------------------------------------------------------------------------------------
# A run is resumable from its first second
# --------------------------------------------------------------------------------------------


def test_the_config_is_saved_before_the_data_load_and_an_early_kill_resumes(
        data_dir, tmp_path, capsys, monkeypatch, runs_kp):
    straight, _ = runs_kp
    flags = tiny_flags(data_dir, tmp_path, "kp", "--n_epochs", "3")
    run_dir = str(tmp_path / "mnist" / "kp-V0")

    def interrupted_load(*args, **kwargs):  # Ctrl-C while the data load
        assert os.path.exists(os.path.join(run_dir, "experiment_config.json"))
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.datasets, "load_numpy", interrupted_load)
        code, _, err = _main(flags, capsys)
    assert code == 130 and "--resume" in err and "Traceback" not in err
    assert _main(flags + ["--resume"], capsys)[0] == 0  # the latest run: this one
    assert os.listdir(tmp_path / "mnist") == ["kp-V0"]
    assert "Restarting" in read_text(run_dir, "log.txt")
    assert_same_run(straight, run_dir, epochs=3)
    # Killed between the folder's creation and its config: only a log. Started again in place.
    os.remove(os.path.join(run_dir, "experiment_config.json"))
    for name in os.listdir(run_dir):
        if name not in ("log.txt", "run.lock"):
            _remove(run_dir, name)
    assert _main(flags + ["--resume", run_dir], capsys)[0] == 0
    assert_same_run(straight, run_dir, epochs=3)


# --------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------


def test_the_explosion_threshold_is_the_loss_of_a_network_that_learned_nothing():
    labels = np.array([3, 7])
    zeros = np.zeros((2, 10), "float32")
    summed = models.SummedSigmoidCrossEntropy(from_logits=True)(labels, zeros)
    softmax = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, zeros)
    assert run_callbacks.zero_logit_loss("summed_sigmoid", 10) == pytest.approx(float(summed))
    assert run_callbacks.zero_logit_loss("softmax", 10) == pytest.approx(float(softmax))
    assert run_callbacks.zero_logit_loss("summed_sigmoid", 10) == pytest.approx(10 * math.log(2))


def _stopper(tmp_path, **kwargs):
    model = _tiny_model()
    model.optimizer.build(model.trainable_variables)
    stop = run_callbacks.StopOnDivergence(str(tmp_path / "diverged.json"), **kwargs)
    stop.set_model(model)
    stop.on_epoch_begin(0)
    return model, stop


def test_a_loss_above_the_threshold_for_n_steps_stops_the_run(tmp_path):
    model, stop = _stopper(tmp_path, reference=1.0, factor=2.0, steps=6)
    stop.on_train_batch_end(0, {"loss": 2.5})
    stop.on_train_batch_end(1, {"loss": 1.5})  # back below: the count starts again
    stop.on_train_batch_end(3, {"loss": 2.5})  # two steps per call: 2 steps
    stop.on_train_batch_end(5, {"loss": 2.5})  # 4
    with pytest.raises(run_callbacks.TrainingDiverged, match="for 6 steps: it exploded"):
        stop.on_train_batch_end(7, {"loss": 2.5})  # 6
    record = json.loads(read_text(str(tmp_path), "diverged.json"))
    assert record["epoch"] == 1 and record["batch"] == 8 and record["loss"] == "2.5"
    # An epoch shorter than the steps: its mean decides at its end, from the second epoch on
    # (the first's holds the initial loss, which some networks start above the reference).
    model, stop = _stopper(tmp_path, reference=1.0, factor=2.0, steps=100)
    stop.on_train_batch_end(2, {"loss": 2.5})
    stop.on_epoch_end(0, {"loss": 2.5})
    stop.on_epoch_begin(1)
    stop.on_train_batch_end(2, {"loss": 2.5})
    with pytest.raises(run_callbacks.TrainingDiverged, match="epoch's mean training loss"):
        stop.on_epoch_end(1, {"loss": 2.5})
    _, stop = _stopper(tmp_path, reference=None)  # --no-divergence_check: no explosion rule
    stop.on_train_batch_end(200, {"loss": 1e6})
    stop.on_epoch_end(0, {"loss": 1e6})


def test_non_finite_weights_or_metrics_stop_the_run_at_the_epoch_end(tmp_path):
    model, stop = _stopper(tmp_path, reference=None)
    with pytest.raises(run_callbacks.TrainingDiverged, match="val_accuracy is nan"):
        stop.on_epoch_end(0, {"loss": 0.5, "val_accuracy": float("nan"),
                              "weight_angle/dense": float("nan")})
    stop.on_epoch_end(0, {"loss": 0.5, "delta_angle/dense": float("nan")})  # angles: measured
    layer = model.layers[0]
    layer.feedback_kernel.assign(np.full(layer.feedback_kernel.shape, np.inf, "float32"))
    with pytest.raises(run_callbacks.TrainingDiverged, match="non-finite values in .*feedback_kernel"):
        stop.on_epoch_end(0, {"loss": 0.5})
    with pytest.raises(run_callbacks.TrainingDiverged, match="loss is inf"):
        stop.on_train_batch_end(0, {"loss": float("inf")})


def test_a_finite_explosion_stops_keras_wt_train_unless_the_check_is_off(
        data_dir, tmp_path, capsys):
    """The issue's repro: --learning_rate 1e6 saturates the MLP's loss at 16.12 (each step's
    sigmoid outputs at 0 or 1), finite, more than 2 × 10·ln 2 = 13.86."""
    flags = tiny_flags(data_dir, tmp_path, "bp", "--learning_rate", "1e6", "--n_epochs", "3")
    code, _, err = _main(flags, capsys)
    _assert_refused(code, err, 1, "the run diverged", "exploded")
    record = json.loads(read_text(str(tmp_path / "mnist" / "bp-V0"), "diverged.json"))
    assert 2 * 10 * math.log(2) < float(record["loss"]) < math.inf
    code, _, err = _main(flags + ["--resume"], capsys)
    _assert_refused(code, err, 1, "resuming it would diverge again")
    code, _, err = _main(flags + ["--no-divergence_check"], capsys)
    assert code == 0, err
    results = json.loads(read_text(str(tmp_path / "mnist" / "bp-V1"), "results.json"))
    assert results["epoch_3"]["loss"] > 2 * 10 * math.log(2)


# --------------------------------------------------------------------------------------------
# Bad input and environment faults: one line, the right status, no run folder left behind
# --------------------------------------------------------------------------------------------


def _tiny_data(directory, train_shape=(28, 28), test_shape=(28, 28), damage=None):
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    for prefix, n, shape in (("train", N_TRAIN, train_shape), ("t10k", 8, test_shape)):
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
                  rng.integers(0, 256, (n, *shape)))
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"),
                  rng.integers(0, 10, n))
    if damage:
        path = os.path.join(directory, "train-images-idx3-ubyte.gz")
        os.truncate(path, os.path.getsize(path) // 2)
    return str(directory)


@pytest.mark.parametrize("data,says", [
    (dict(damage=True), "train-images-idx3-ubyte.gz is damaged"),
    (dict(test_shape=(32, 32)), "the training images are (28, 28, 1) but the test images "
                                "(32, 32, 1)"),
])
def test_bad_data_is_a_one_line_error_and_leaves_no_run_folder(tmp_path, capsys, data, says):
    flags = tiny_flags(_tiny_data(tmp_path / "data", **data), tmp_path / "runs", "kp")
    code, _, err = _main(flags, capsys)
    _assert_refused(code, err, 1, says)
    assert os.listdir(tmp_path / "runs" / "mnist") == []


@pytest.mark.parametrize("flag,value,says", [
    ("--seed", "99999999999", "--seed=99999999999 is not allowed"),
    ("--seed", "-5", "--seed=-5 is not allowed"),
    ("--save_dir", None, "is a file, not a folder"),
])
def test_bad_flags_are_a_one_line_usage_error(data_dir, tmp_path, capsys, flag, value, says):
    if value is None:
        value = str(tmp_path / "a_file")
        open(value, "w").close()
    code, _, err = _main(tiny_flags(data_dir, tmp_path, "kp") + [flag, value], capsys)
    _assert_refused(code, err, 2, says)
    assert not os.path.exists(tmp_path / "mnist")


def test_an_unwritable_save_dir_is_a_one_line_error(data_dir, tmp_path, capsys, monkeypatch):
    """A read-only folder (simulated: the tests run as root, whom permissions do not stop)."""
    makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    code, _, err = _main(tiny_flags(data_dir, tmp_path / "ro", "kp"), capsys)
    _assert_refused(code, err, 1, "Read-only file system")


@pytest.mark.slow
def test_a_full_disk_is_a_one_line_error_and_the_run_resumes_after(
        data_dir, tmp_path, capsys, runs_kp):
    """Every file the process writes is limited to 20 kB (RLIMIT_FSIZE: a write past it fails
    with EFBIG, as on a full disk with ENOSPC); the tiny MLP's backup (~60 kB) cannot be
    written. The run stops with one line, exit 1 (not a crash); resumed with room, it ends as
    an uninterrupted run."""
    straight, _ = runs_kp

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    flags = tiny_flags(data_dir, tmp_path, "kp", "--n_epochs", "3")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "keras_wt.app.cli"] + flags, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, preexec_fn=limit)
    _assert_refused(out.returncode, out.stderr, 1, "File too large")
    run_dir = str(tmp_path / "mnist" / "kp-V0")
    assert _main(flags + ["--resume", run_dir], capsys)[0] == 0
    assert_same_run(straight, run_dir, epochs=3)


def test_durable_writes_flush_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append("folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    runs.write_json(str(tmp_path / "results.json"), {"epoch_1": {"loss": 1.0}})
    assert synced == ["file", "folder"]
    assert json.loads(read_text(str(tmp_path), "results.json")) == {"epoch_1": {"loss": 1.0}}
    assert os.listdir(tmp_path) == ["results.json"]


def test_the_imagenet_trainer_stops_on_a_truncated_or_missing_shard(tmp_path, capsys):
    """A shard cut inside a record's length field reads as a shorter file, without an error
    from TensorFlow: the trainer counts each pass against --train_examples and stops."""
    import tensorflow as tf

    from keras_wt.app.data import datasets

    data = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("validation", 4)):
        images = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(n)]
        datasets.write_imagenet_tfrecords(data, images, rng.integers(0, 4, n), split,
                                          num_shards=2)
    shard = data / "train-00001-of-00002"
    raw, offsets, position = shard.read_bytes(), [], 0
    while position < len(raw):  # TFRecord framing: length (8 bytes), its CRC (4), data, CRC (4)
        offsets.append(position)
        position += 16 + struct.unpack("<Q", raw[position:position + 8])[0]
    shard.write_bytes(raw[:offsets[-3] + 4])  # cut inside the third last record's length
    assert sum(1 for _ in tf.data.TFRecordDataset(str(shard))) == 5  # of 8: read as EOF
    flags = ["--strategy=default", f"--data_dir={data}", "--model=cnn", "--image_size=8",
             "--num_classes=4", "--batch_size=4", "--epochs=1", "--steps_per_epoch=2",
             "--eval_steps=0", "--train_examples=16", "--alignment=none", "--verbose=0"]
    code, _, err = _main_imagenet(flags, capsys)
    _assert_refused(code, err, 1, "ImageNet train files in", "one pass read 13 examples, but 16 are declared")
    shard.unlink()
    code, _, err = _main_imagenet(flags, capsys)
    _assert_refused(code, err, 1, "holds 1 train-*-of-00002 files, not the 2")


def _main_imagenet(argv, capsys):
    """`(exit status, stdout, stderr)` of tpu/train_imagenet.py run in this process."""
    spec = importlib.util.spec_from_file_location(
        "train_imagenet", os.path.join(ROOT, "tpu", "train_imagenet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
