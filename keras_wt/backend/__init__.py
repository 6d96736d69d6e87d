"""Everything keras_wt needs from a Keras backend beyond `keras.ops`, behind one interface.

The library computes with `keras.ops` wherever an op there does exactly what it needs; what
`keras.ops` does not offer (a custom gradient, the vector-Jacobian products of a bilinear op,
ordering edges between stateful ops, stateless random numbers whose bits agree with and without
XLA, compiled loops, the replica context of a distribution strategy) it takes from this package,
which picks the implementation for the backend Keras runs on (`keras.backend.backend()`): today
only `keras_wt.backend.tensorflow`. No other library module imports a backend framework
(tests/test_layout.py).

A JAX implementation is one more module with the same names (each function's docstring in
`keras_wt/backend/tensorflow.py` says what another backend must provide), imported below for
`"jax"`. The interface:

- Gradients: `custom_gradient`, `vjp`, `gradient_tape`.
- Values and ordering: `read_value`, `add_n`, `identity`, `after`, `barrier`,
  `control_dependencies`.
- Tracing and compiling: `in_graph`, `trace_key`, `eager_scope`, `function`, `fori_loop`,
  `KERNEL_ERRORS`, `is_tensor_spec`.
- Stateless random numbers: `fold_in`, `stateless_bits`, `stateless_normal`,
  `stateless_uniform`, `stateless_rademacher`, `generator_normal`.
- Distribution: `current_strategy`, `replica_context`, `in_cross_replica_context`,
  `merge_call`, `assign_on_every_replica`, `is_multi_worker`, `is_distributed_value`.
"""

import os

import keras

# The Keras backends keras_wt implements this interface for.
SUPPORTED = ("tensorflow",)


def check_backend():
    """Returns the name of Keras's backend; raises `ImportError`, saying what to do, unless
    keras_wt implements it (`SUPPORTED`)."""
    backend = keras.backend.backend()
    if backend not in SUPPORTED:
        raise ImportError(
            f"keras_wt needs the TensorFlow backend of Keras, but Keras is using "
            f"backend={backend!r} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}). "
            "Set KERAS_BACKEND=tensorflow before importing keras, or set "
            '"backend": "tensorflow" in ~/.keras/keras.json.'
        )
    return backend


check_backend()

from keras_wt.backend.tensorflow import KERNEL_ERRORS  # noqa: E402
from keras_wt.backend.tensorflow import add_n  # noqa: E402
from keras_wt.backend.tensorflow import after  # noqa: E402
from keras_wt.backend.tensorflow import assign_on_every_replica  # noqa: E402
from keras_wt.backend.tensorflow import barrier  # noqa: E402
from keras_wt.backend.tensorflow import control_dependencies  # noqa: E402
from keras_wt.backend.tensorflow import current_strategy  # noqa: E402
from keras_wt.backend.tensorflow import custom_gradient  # noqa: E402
from keras_wt.backend.tensorflow import eager_scope  # noqa: E402
from keras_wt.backend.tensorflow import fold_in  # noqa: E402
from keras_wt.backend.tensorflow import fori_loop  # noqa: E402
from keras_wt.backend.tensorflow import function  # noqa: E402
from keras_wt.backend.tensorflow import generator_normal  # noqa: E402
from keras_wt.backend.tensorflow import gradient_tape  # noqa: E402
from keras_wt.backend.tensorflow import identity  # noqa: E402
from keras_wt.backend.tensorflow import in_cross_replica_context  # noqa: E402
from keras_wt.backend.tensorflow import in_graph  # noqa: E402
from keras_wt.backend.tensorflow import is_distributed_value  # noqa: E402
from keras_wt.backend.tensorflow import is_multi_worker  # noqa: E402
from keras_wt.backend.tensorflow import is_tensor_spec  # noqa: E402
from keras_wt.backend.tensorflow import merge_call  # noqa: E402
from keras_wt.backend.tensorflow import read_value  # noqa: E402
from keras_wt.backend.tensorflow import replica_context  # noqa: E402
from keras_wt.backend.tensorflow import stateless_bits  # noqa: E402
from keras_wt.backend.tensorflow import stateless_normal  # noqa: E402
from keras_wt.backend.tensorflow import stateless_rademacher  # noqa: E402
from keras_wt.backend.tensorflow import stateless_uniform  # noqa: E402
from keras_wt.backend.tensorflow import trace_key  # noqa: E402
from keras_wt.backend.tensorflow import vjp  # noqa: E402
