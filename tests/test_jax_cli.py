"""`keras-wt-train` and `tpu/train_imagenet.py` on JAX (`KERAS_BACKEND=jax`, in subprocesses):
the same run folders, backups and resume as on TensorFlow. A run killed inside its second epoch
and resumed ends with exactly the model, optimizer state and records of an uninterrupted run."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_same_run, read_text, tiny_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "tests", "fault_injection.py")


def _run(args, fault=None, trainer=("-m", "keras_wt.app.cli")):
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    command = ([LAUNCHER, fault] if fault else []) + list(trainer) + list(args)
    return subprocess.run([sys.executable] + command, env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


# The weight mirror: its warm-up and noise counters are the most state to restore (Kolen–Pollack's
# trainable B on JAX is covered by the parity test's save, load and train).
@pytest.mark.parametrize("algo", ["wm"])
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


def test_the_imagenet_trainer_on_jax_resumes_a_killed_run_exactly(tmp_path):
    """`tpu/train_imagenet.py --strategy=default` on JAX, the weight mirror (its warm-up and
    noise counters are the most state to restore), on a tiny TFRecord ImageNet."""
    from keras_wt.app.data import datasets

    rng = np.random.default_rng(0)
    data_dir = tmp_path / "imagenet"
    for split, n in (("train", 24), ("validation", 8)):
        images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(n)]
        datasets.write_imagenet_tfrecords(data_dir, images, rng.integers(0, 4, n), split,
                                          num_shards=2)

    def flags(model_dir):
        return ["--strategy=default", f"--data_dir={data_dir}", "--model=cnn",
                f"--model_dir={model_dir}", "--algo=wm", "--image_size=16", "--num_classes=4",
                "--batch_size=8", "--epochs=3", "--steps_per_epoch=3", "--train_examples=24",
                "--eval_examples=8", "--lr_per_256=0.32", "--warmup_epochs=1",
                "--mirror_warmup_steps=2", "--mirror_batch_size=8", "--seed=1", "--verbose=0",
                "--no-divergence_check"]

    trainer = ["tpu/train_imagenet.py"]
    out = _run(flags(tmp_path / "straight"), trainer=trainer)
    assert out.returncode == 0, out.stderr[-3000:]
    out = _run(flags(tmp_path / "killed"), fault="batch:2:2", trainer=trainer)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    out = _run(flags(tmp_path / "killed"), trainer=trainer)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(str(tmp_path / "straight"), str(tmp_path / "killed"), epochs=3)
