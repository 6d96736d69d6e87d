"""Crash-safe preemption: a training process killed (SIGKILL) at any point — inside a training
epoch, or inside any write of a backup — and then resumed ends exactly where an uninterrupted run
ends: the same weights, feedback kernels `B`, optimizer state and results, bit for bit.

Each chain runs one command line in a subprocess again and again on the same run folder. Every
run but the last is killed by the `KERAS_WT_FAULT` hook of `keras_wt.backup` at the next point of
the list, so the chain passes through every such point once; the last run finishes. The final
model is compared with an uninterrupted run's (keras-wt-train on a tiny MNIST-format dataset,
the ImageNet trainer on fake TFRecords). Slow (a subprocess per point; about a minute and a half
on two cores), but the README's test command runs it.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300

# Points in the order a run reaches them, 3 epochs of 3 steps: kills in the first backup's
# writes (no complete backup yet: the run starts over), inside epoch 2, and in the second
# backup's writes (resumed from the first backup, or, after the manifest, from the second).
EVERY_POINT = ["weights:1", "renamed:1", "manifest:1", "written:1", "batch:2:2", "weights:2",
               "renamed:2", "manifest:2", "written:2"]
SOME_POINTS = ["weights:1", "written:1", "batch:2:2", "manifest:2"]


def _run(args, fault=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("KERAS_WT_FAULT", None)
    if fault:
        env["KERAS_WT_FAULT"] = fault
    return subprocess.run([sys.executable] + args, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=ROOT)


def _chain(args, points, resume_args=()):
    """Runs `args`, killed at each of `points` in turn (resuming with `resume_args` after the
    first), then once more to the end."""
    for i, point in enumerate(points):
        out = _run(list(args) + (list(resume_args) if i else []), fault=point)
        assert out.returncode == -signal.SIGKILL, (point, out.returncode, out.stderr[-3000:])
    out = _run(list(args) + list(resume_args))
    assert out.returncode == 0, out.stderr[-3000:]


def _weights(path):
    import keras

    import keras_wt  # noqa: F401  (registers the layers)

    model = keras.saving.load_model(path)
    return {v.path: v.numpy() for v in model.weights}, {
        f"optimizer/{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}


def _assert_same_run(a, b):
    for name in ("model.keras",):
        (wa, oa), (wb, ob) = _weights(os.path.join(a, name)), _weights(os.path.join(b, name))
        assert list(wa) == list(wb) and any("feedback_kernel" in k for k in wa)
        for key in wa:
            np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)
        for key in oa:
            np.testing.assert_array_equal(oa[key], ob[key], err_msg=key)
    with open(os.path.join(a, "results.json")) as f:
        ra = json.load(f)
    with open(os.path.join(b, "results.json")) as f:
        rb = json.load(f)
    assert list(ra) == list(rb)
    for key in ra:
        ra[key].pop("seconds"), rb[key].pop("seconds")
        assert ra[key] == rb[key], key


@pytest.mark.slow
@pytest.mark.parametrize("algo,points", [("kp", EVERY_POINT), ("wm", SOME_POINTS)])
def test_keras_wt_train_survives_a_kill_anywhere(data_dir, tmp_path, algo, points):
    flags = tiny_flags(data_dir, tmp_path / "straight", algo, "--n_epochs", "3")
    assert _run(["-m", "keras_wt_cli"] + flags).returncode == 0
    killed_dir = tmp_path / "killed"
    flags = tiny_flags(data_dir, killed_dir, algo, "--n_epochs", "3")
    run_dir = str(killed_dir / "mnist" / f"{algo}-V0")
    _chain(["-m", "keras_wt_cli"] + flags, points, resume_args=["--resume", run_dir])
    assert os.listdir(killed_dir / "mnist") == [f"{algo}-V0"]  # always the same run continued
    _assert_same_run(str(tmp_path / "straight" / "mnist" / f"{algo}-V0"), run_dir)


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """24 training and 8 validation JPEGs in the standard TFRecord layout."""
    from keras_wt import datasets

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
# through the same `keras_wt.backup`.
@pytest.mark.parametrize("algo", ["wm"])
def test_imagenet_trainer_survives_a_kill_anywhere(fake_imagenet, tmp_path, algo):
    def flags(model_dir):
        return ["tpu/train_imagenet.py", "--strategy=default", f"--data_dir={fake_imagenet}",
                "--model=cnn", f"--model_dir={model_dir}", f"--algo={algo}", "--image_size=16",
                "--num_classes=4", "--batch_size=8", "--epochs=3", "--steps_per_epoch=3",
                "--lr_per_256=0.32", "--warmup_epochs=1", "--mirror_warmup_steps=2",
                "--mirror_batch_size=8", "--seed=1", "--verbose=0"]

    assert _run(flags(tmp_path / "straight")).returncode == 0
    _chain(flags(tmp_path / "killed"), ["manifest:1", "batch:2:2", "written:2"])
    _assert_same_run(str(tmp_path / "straight"), str(tmp_path / "killed"))
