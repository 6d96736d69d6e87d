"""Every use of a private TensorFlow or Keras internal, each with the reason no public API serves.

Nothing else in keras_wt reaches into `keras.src`, `tf.__internal__` or a private Keras
attribute. Each entry says why, names the upstream issue it works around where there is one, and
is guarded: it checks that the internal still exists (raising a `RuntimeError` that names it) or
applies only to the Keras versions it was checked against. Each is scoped to keras_wt's own
objects or to the duration of a call, never patched into the process for good.
"""

import contextlib

import keras
import tensorflow as tf

_TESTED = ((3, 0), (3, 15))  # the Keras versions these workarounds were written against


def _version():
    return tuple(int(part) for part in keras.__version__.split(".")[:2])


def _unsupported(what):
    return RuntimeError(
        f"keras_wt needs {what}, which Keras {keras.__version__} no longer provides (keras_wt "
        f"was tested with Keras {'.'.join(map(str, _TESTED[0]))} to "
        f"{'.'.join(map(str, _TESTED[1]))}). Please report this at the keras_wt issue tracker."
    )


def flatten_layers(layer):
    """`layer` and all its sublayers (nested models and layers inside layers), depth first.

    Keras has no public way to list the sublayers of a layer that is not a model (for instance
    the four `EinsumDense` projections of a `MultiHeadAttention`); `Layer._flatten_layers` is
    the method Keras itself uses for this (no upstream issue asking for a public one was found;
    tracked in keras_wt's report for issue 9).
    """
    if not isinstance(layer, keras.layers.Layer):
        return [layer]  # a bare `keras.Operation` of a functional graph
    if not hasattr(layer, "_flatten_layers"):
        raise _unsupported("Layer._flatten_layers")
    # Depth first, children in the order they were created (Keras's own recursive walk visits
    # them in reverse).
    layers, seen = [], set()

    def visit(node):
        if id(node) in seen:
            return
        seen.add(id(node))
        layers.append(node)
        for child in node._flatten_layers(include_self=False, recursive=False):
            visit(child)

    visit(layer)
    return layers


def replace_sublayer(parent, attribute, new):
    """Sets `parent.<attribute> = new` in place of the built sublayer there, keeping its place
    in `parent`'s weight order and dropping the old sublayer's weights from `parent`.

    Keras tracks a sublayer when it is assigned to an attribute and has no public way to stop
    tracking it (assigning another layer appends it, and the old weights stay in
    `parent.weights`); the tracker's own `replace_tracked_value` does exactly the swap. Used by
    `keras_wt.layers.MultiHeadAttention`, whose projections the stock `build` creates as stock
    `EinsumDense` layers with no hook to create another class.
    """
    tracker = getattr(parent, "_tracker", None)
    if tracker is None or not hasattr(tracker, "replace_tracked_value"):
        raise _unsupported("the layer tracker's replace_tracked_value")
    old = getattr(parent, attribute)
    tracker.replace_tracked_value("layers", old, new)
    setattr(parent, attribute, new)



def untrack_variable(layer, variable):
    """Removes `variable` from `layer`'s weights (it is no longer listed, saved or trained).

    Keras has no public way to delete a layer's weight; `Layer._untrack_variable` is the
    method Keras itself uses to undo `add_weight`. Used by
    `keras_wt.unused_feedback.drop_unused_feedback` on a built model, so that its forward
    weights keep the values (and random draws) of a build with every `B`.
    """
    if not hasattr(layer, "_untrack_variable"):
        raise _unsupported("Layer._untrack_variable")
    layer._untrack_variable(variable)


# The Keras 3 releases whose multi-worker `fit` needs `multi_worker_fit` (checked on 3.15).
_KERAS_MULTIWORKER_BUG = _version() >= (3, 0)


def flush_summary_writers(callback):
    """Flushes the event files a `keras.callbacks.TensorBoard` callback has open.

    Its `tf.summary` writers flush every two minutes and when training ends; Keras exposes no
    flush, and keeps the writers in the private dict `TensorBoard._writers` (created on first
    use, so only the writers that exist are flushed). keras_wt's trainer flushes them at every
    epoch's end, before the epoch's backup, so that a kill never loses the summaries of an epoch
    the backup holds.
    """
    writers = getattr(callback, "_writers", None)
    if not isinstance(writers, dict):
        raise _unsupported("TensorBoard._writers")
    for writer in writers.values():
        writer.flush()


def merge_call(fn, strategy, *args):
    """Runs `fn(strategy, *args)` in the cross-replica context, from a replica context or from
    outside any (`tf.__internal__.distribute.interim.maybe_merge_call`). The public
    `ReplicaContext.merge_call` fails outside a replica context, and Keras's own optimizers use
    this same internal for their variable updates."""
    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)


def is_multi_worker(strategy):
    """Whether `strategy` spans several worker processes (the test Keras's trainer uses)."""
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


@contextlib.contextmanager
def multi_worker_fit(model):
    """Inside this context `model.fit`/`evaluate` work under a multi-worker
    `MultiWorkerMirroredStrategy`; a no-op under any other strategy or Keras version.

    Keras 3's `fit` fails there in two places (keras-team/keras#20585,
    tensorflow/tensorflow#72388):

    1. Before training Keras builds the model on one sample batch that it averages over the
       replicas with `strategy.reduce("MEAN", (x, y))`, which fails on the tuple. Only the
       batch's shapes and dtypes matter there, so this model (only this instance) is built on
       this worker's first replica's share.
    2. Every step Keras averages the replicas' loss and metrics with
       `strategy.reduce("MEAN", v, axis=0)`, which fails on scalars. Keras's
       `reduce_per_replica` is replaced, for the duration of the context only, by one that
       averages multi-worker values with `axis=None` (other strategies pass through).
    """
    strategy = model.distribute_strategy
    if not (_KERAS_MULTIWORKER_BUG and is_multi_worker(strategy)):
        yield model
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer

    def local_share(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local_share, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    model._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield model
    finally:
        tf_trainer.reduce_per_replica = original
        del model._maybe_symbolic_build
