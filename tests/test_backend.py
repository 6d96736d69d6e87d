"""keras_wt refuses a Keras backend other than TensorFlow, with advice."""

import os
import subprocess
import sys


def test_non_tensorflow_backend_is_refused():
    env = dict(os.environ, KERAS_BACKEND="numpy")
    result = subprocess.run(
        [sys.executable, "-c", "import keras_wt"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "backend='numpy'" in result.stderr and "KERAS_BACKEND=tensorflow" in result.stderr
