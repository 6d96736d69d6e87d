"""Everything keras_wt needs from a Keras backend beyond `keras.ops`, behind one interface.

The library computes with `keras.ops` wherever an op there does exactly what it needs; what
`keras.ops` does not offer (a custom gradient, the vector-Jacobian products of a bilinear op,
ordering edges between stateful ops, stateless random numbers whose bits agree with and without
XLA, compiled loops, the replica context of a distribution strategy) it takes from this package,
which picks the implementation for the backend Keras runs on (`keras.backend.backend()`):
`keras_wt.backend.tensorflow` or `keras_wt.backend.jax` (which draws TensorFlow's random numbers
with `keras_wt.backend.philox`). No other library module imports a backend framework
(tests/test_layout.py).

Each implementation is a module with the same names (each function's docstring in
`keras_wt/backend/tensorflow.py` says what another backend must provide). The interface:

- The step's kind: `STATELESS` (JAX: a step is a pure function of the state).
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
SUPPORTED = ("tensorflow", "jax")


def check_backend():
    """Returns the name of Keras's backend; raises `ImportError`, saying what to do, unless
    keras_wt implements it (`SUPPORTED`)."""
    backend = keras.backend.backend()
    if backend not in SUPPORTED:
        raise ImportError(
            f"keras_wt runs on Keras's TensorFlow or JAX backend, but Keras is using "
            f"backend={backend!r} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}): "
            "PyTorch's trainer has no stateless step for the feedback kernels' updates, and "
            "numpy cannot train. Set KERAS_BACKEND=tensorflow (or jax) before importing "
            'keras, or set "backend": "tensorflow" in ~/.keras/keras.json.'
        )
    return backend


BACKEND = check_backend()

if BACKEND == "jax":
    from keras_wt.backend import jax as _implementation
else:
    from keras_wt.backend import tensorflow as _implementation

KERNEL_ERRORS = _implementation.KERNEL_ERRORS
STATELESS = _implementation.STATELESS
add_n = _implementation.add_n
after = _implementation.after
assign_on_every_replica = _implementation.assign_on_every_replica
barrier = _implementation.barrier
control_dependencies = _implementation.control_dependencies
current_strategy = _implementation.current_strategy
custom_gradient = _implementation.custom_gradient
eager_scope = _implementation.eager_scope
fold_in = _implementation.fold_in
fori_loop = _implementation.fori_loop
function = _implementation.function
generator_normal = _implementation.generator_normal
gradient_tape = _implementation.gradient_tape
identity = _implementation.identity
in_cross_replica_context = _implementation.in_cross_replica_context
in_graph = _implementation.in_graph
is_distributed_value = _implementation.is_distributed_value
is_multi_worker = _implementation.is_multi_worker
is_tensor_spec = _implementation.is_tensor_spec
merge_call = _implementation.merge_call
read_value = _implementation.read_value
replica_context = _implementation.replica_context
stateless_bits = _implementation.stateless_bits
stateless_normal = _implementation.stateless_normal
stateless_rademacher = _implementation.stateless_rademacher
stateless_uniform = _implementation.stateless_uniform
trace_key = _implementation.trace_key
vjp = _implementation.vjp
