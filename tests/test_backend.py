"""keras_wt refuses a Keras backend other than TensorFlow, with advice."""

import keras
import pytest

from keras_wt._backend import check_backend


def test_tensorflow_backend_passes():
    check_backend()


def test_non_tensorflow_backend_is_refused(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with pytest.raises(ImportError, match=r"backend='jax'.*KERAS_BACKEND=tensorflow"):
        check_backend()
