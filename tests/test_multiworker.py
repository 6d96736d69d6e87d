"""MultiWorkerMirroredStrategy with two local worker processes on the loopback interface.

Each worker (tests/multiworker_worker.py) trains `kp` and `wm` MLPs on different data with the
trainer's strategy, optimizer and callbacks; afterwards both must hold the same `B` (and `W`),
`B` must have learned, and for `kp` the difference `B − W` must have shrunk by exactly
`(1 − lr·λ)` per step.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_allclose

WORKER = os.path.join(os.path.dirname(__file__), "multiworker_worker.py")
TIMEOUT_S = 240


def _free_ports(n):
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_workers(out_dir, num_workers=2):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(num_workers)]}
    procs = []
    for index in range(num_workers):
        env = dict(os.environ)
        task = {"type": "worker", "index": index}
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": task})
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(WORKER)), env.get("PYTHONPATH", "")]
        )
        log = open(os.path.join(out_dir, f"worker-{index}.log"), "w")
        procs.append(
            (subprocess.Popen([sys.executable, WORKER, out_dir], env=env, stdout=log,
                              stderr=subprocess.STDOUT), log)
        )
    failed = []
    try:
        for index, (proc, _) in enumerate(procs):
            try:
                if proc.wait(timeout=TIMEOUT_S) != 0:
                    failed.append(index)
            except subprocess.TimeoutExpired:
                failed.append(index)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if failed:
        logs = "\n".join(
            f"--- worker {i} ---\n" + open(os.path.join(out_dir, f"worker-{i}.log")).read()[-4000:]
            for i in failed
        )
        pytest.fail(f"multi-worker training failed on workers {failed}:\n{logs}")


@pytest.fixture(scope="module")
def worker_outputs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("multiworker"))
    _run_workers(out_dir)
    return out_dir


def _load(out_dir, algo):
    return [dict(np.load(os.path.join(out_dir, f"{algo}-{task}.npz"))) for task in (0, 1)]


@pytest.mark.parametrize("algo", ["kp", "wm"])
def test_workers_end_with_identical_learned_feedback(worker_outputs, algo):
    first, second = _load(worker_outputs, algo)
    assert first.keys() == second.keys()
    feedback = sorted(k for k in first if k.startswith("B/"))
    assert feedback, "no feedback kernels were saved"
    for key in sorted(first):
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    for key in feedback:
        initial = first["B0/" + key[2:]]
        assert np.abs(first[key] - initial).max() > 1e-4, f"{key} did not learn"
    assert int(first["iterations"]) == 3


def test_kolen_pollack_invariant_across_workers(worker_outputs):
    # 3 steps at lr 0.1 with decoupled decay 0.01 / (1 - 0.9) = 0.1.
    arrays = _load(worker_outputs, "kp")[0]
    shrink = (1.0 - 0.1 * 0.1) ** 3
    for key in (k for k in arrays if k.startswith("B/")):
        name = key[2:]
        before = arrays["B0/" + name] - arrays["W0/" + name]
        after = arrays["B/" + name] - arrays["W/" + name]
        assert_allclose(after, shrink * before, rtol=1e-4, atol=1e-6)


def test_only_the_chief_writes_checkpoints(worker_outputs):
    run = os.path.join(worker_outputs, "run-kp")
    assert os.path.exists(os.path.join(run, "backup", "epoch-0001.weights.h5"))
    assert os.path.exists(os.path.join(run, "backup", "manifest.json"))
    assert os.path.exists(os.path.join(run, "backup-worker-1", "manifest.json"))
    assert os.path.exists(os.path.join(run, "history.csv"))
