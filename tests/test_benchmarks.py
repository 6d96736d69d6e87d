"""The published-code timer of `benchmarks/` on a stand-in checkout written by the test."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import published_code  # noqa: E402

# A stand-in for the published classes: it logs the published epoch line with made-up seconds
# and records what it was given (shapes, learning rate, its BLAS environment).
STAND_IN = '''
import json, os


class {name}:
    def __init__(self, sizes, save_dir):
        self.sizes, self.save_dir = sizes, save_dir

    def train(self, x, y, xt, yt, batch_size, learning_rate, epochs, test_frequency):
        with open(os.path.join(self.save_dir, "log.txt"), "a") as f:
            for j in range(epochs):
                seconds = 0.25 * (j + 1)
                f.write("\\nEpoch {{}} completed in {{:.3f}}s, loss: 0.5\\n".format(j, seconds))
                f.write("Test accuracy: 10.0%\\n")
        seen = dict(sizes=self.sizes, x=list(x.shape), y=list(y.shape), x_max=float(x.max()),
                    y_sum=float(y.sum()), batch_size=batch_size, learning_rate=learning_rate,
                    blas=[k for k in os.environ if k.startswith("OPENBLAS_")])
        with open(os.environ["STAND_IN_RECORD"], "w") as f:
            json.dump(seen, f)
'''


@pytest.fixture
def checkout(tmp_path):
    folder = tmp_path / "published"
    (folder / "fcnn").mkdir(parents=True)
    for name in published_code.CLASSES.values():
        (folder / "fcnn" / f"{name}.py").write_text(STAND_IN.format(name=name))
    return folder


def test_the_published_epoch_is_read_from_its_log_in_a_process_without_the_blas_variables(
        checkout, tmp_path, monkeypatch):
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    published_code.save_data(data, ((rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
                                     rng.integers(0, 10, 40)),
                                    (rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
                                     rng.integers(0, 10, 8))))
    record = tmp_path / "record.json"
    monkeypatch.setenv("STAND_IN_RECORD", str(record))
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "1048576")

    seconds = published_code.epoch_seconds(str(checkout), "wm", 3, str(data))

    assert seconds == [0.25, 0.5, 0.75]
    seen = json.loads(record.read_text())
    assert seen["blas"] == []  # removed for the child only
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"
    assert seen["sizes"] == [784, 500, 10]
    assert seen["x"] == [40, 784] and seen["y"] == [40, 10] and seen["y_sum"] == 40.0
    assert 0.9 < seen["x_max"] <= 1.0
    assert seen["batch_size"] == 128 and seen["learning_rate"] == 0.05  # run.sh's wm


def test_a_folder_without_the_published_classes_is_refused_by_name(tmp_path):
    (tmp_path / "fcnn").mkdir()
    (tmp_path / "fcnn" / "FCNN_BP.py").write_text("")
    with pytest.raises(FileNotFoundError, match="FCNN_FA.py, fcnn/FCNN_KP.py, fcnn/FCNN_WM.py"):
        published_code.epoch_seconds(str(tmp_path), "bp", 1, "unused.npz")
    with pytest.raises(ValueError, match="no 'ss'"):
        published_code.epoch_seconds(str(tmp_path), "ss", 1, "unused.npz")
