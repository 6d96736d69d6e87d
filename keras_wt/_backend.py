"""Refuse any Keras backend other than TensorFlow, with an error that says what to do."""

import os


def check_backend():
    """Raises `ImportError` unless Keras runs on the TensorFlow backend."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            f"keras_wt needs the TensorFlow backend of Keras, but Keras is using "
            f"backend={backend!r} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}). "
            "Set KERAS_BACKEND=tensorflow before importing keras, or set "
            '"backend": "tensorflow" in ~/.keras/keras.json.'
        )
