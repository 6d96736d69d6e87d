"""`keras-wt-train` on JAX (`KERAS_BACKEND=jax`, in subprocesses): the same run folders,
backups and resume as on TensorFlow. A run killed inside its second epoch and resumed ends with
exactly the model, optimizer state and records of an uninterrupted run."""

import os
import signal
import subprocess
import sys

import pytest

from conftest import assert_same_run, read_text, tiny_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "tests", "fault_injection.py")


def _run(args, fault=None):
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    command = ([LAUNCHER, fault] if fault else []) + ["-m", "keras_wt.app.cli"] + list(args)
    return subprocess.run([sys.executable] + command, env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.parametrize("algo", ["kp", "wm"])
def test_keras_wt_train_on_jax_resumes_a_killed_run_exactly(data_dir, tmp_path, algo):
    flags = tiny_flags(data_dir, tmp_path / "straight", algo, "--n_epochs", "3")
    out = _run(flags)
    assert out.returncode == 0, out.stderr[-3000:]
    straight = str(tmp_path / "straight" / "mnist" / f"{algo}-V0")
    assert "on 1 replica" in read_text(straight, "log.txt")
    flags = tiny_flags(data_dir, tmp_path / "killed", algo, "--n_epochs", "3")
    run_dir = str(tmp_path / "killed" / "mnist" / f"{algo}-V0")
    out = _run(flags, fault="batch:2:2")
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    out = _run(flags + ["--resume", run_dir])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after epoch 1" in read_text(run_dir, "log.txt")
    assert_same_run(straight, run_dir, epochs=3)
