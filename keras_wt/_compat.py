"""Every use of a private Keras internal, each with the reason no public API serves.

Nothing else in keras_wt reaches into `keras.src` or a private Keras attribute; the one private
TensorFlow internal keras_wt uses is in the backend module, with its reason
(`keras_wt.backend.tensorflow.merge_call`). Each entry says why, names the upstream issue it
works around where there is one, and is guarded: it checks that the internal still exists
(raising a `RuntimeError` that names it) or applies only to the Keras versions it was checked
against. Each is scoped to keras_wt's own objects or to the duration of a call, never patched
into the process for good.
"""

import contextlib
import inspect
import types

import keras

from keras_wt import backend

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
        for child in children(node):
            visit(child)

    visit(layer)
    return layers


def children(layer):
    """The direct sublayers of `layer` (`[]` for a bare `keras.Operation`), in the order they
    were created: the same `Layer._flatten_layers` as `flatten_layers`, one level deep."""
    if not isinstance(layer, keras.layers.Layer):
        return []
    if not hasattr(layer, "_flatten_layers"):
        raise _unsupported("Layer._flatten_layers")
    return list(layer._flatten_layers(include_self=False, recursive=False))


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



def replace_child(parent, old, new):
    """Puts `new` in place of `old` wherever `parent` holds it: in the layer tracker (keeping
    its place in `parent`'s weight order) and in every attribute, list or dict of `parent`
    that refers to it. Returns whether `parent` held `old` anywhere but its tracker (`False`:
    nothing was changed).

    The reasons are those of `replace_sublayer`; used by `keras_wt.nested` for a composite twin
    (`SeparableConv2D`, `MultiHeadAttention`) that the stock layer cannot become in place.
    """
    tracker = getattr(parent, "_tracker", None)
    if tracker is None or not hasattr(tracker, "replace_tracked_value"):
        raise _unsupported("the layer tracker's replace_tracked_value")
    store = getattr(parent, "_layers", None)
    places = []
    for name, value in vars(parent).items():
        if value is old:
            places.append((name, None))
        elif isinstance(value, (list, dict)) and value is not store:
            keys = range(len(value)) if isinstance(value, list) else list(value)
            places.extend((name, key) for key in keys if value[key] is old)
    if not places:
        return False
    tracker.replace_tracked_value("layers", old, new)
    for name, key in places:
        if key is None:
            object.__setattr__(parent, name, new)
        else:
            getattr(parent, name)[key] = new
    return True


@contextlib.contextmanager
def unlocked(layer):
    """Inside this context `layer`, though built, may create weights (`add_weight`).

    Keras locks a layer's tracker at the end of `build` and has no public way to add state
    afterwards; its own `Embedding.enable_lora` and `Layer.quantize` unlock it the same way.
    Used by `keras_wt.nested`, which turns a built stock layer into its feedback twin in place
    and creates `B` there (`FeedbackLayer.build_feedback`).
    """
    tracker = getattr(layer, "_tracker", None)
    if tracker is None or not hasattr(tracker, "unlock"):
        raise _unsupported("the layer tracker's lock and unlock")
    was_locked = tracker.locked
    tracker.unlock()
    try:
        yield layer
    finally:
        if was_locked:
            tracker.lock()


# `Layer.__new__` wraps each instance's `build` and `quantize` in closures (kept on the
# instance) over the methods of the class the layer was created as; the free variable holding
# that method, per wrapped method.
_WRAPPED_METHODS = {"build": "original_build_method", "quantize": "original_quantize_method"}


def set_class(layer, cls):
    """Makes `layer` an instance of `cls`, in place: a stock layer becomes its feedback twin
    (a subclass with the same attributes and call signature) and back, a layer becomes
    `keras_wt.nested`'s saving subclass of its own class and back.

    Python allows it for classes of one layout; what Keras adds is the per-instance wrappers
    of `build` and `quantize` (`Layer.__new__`), closures over the *original* class's methods:
    they are pointed at `cls`'s, so that a layer converted before it was built builds as `cls`.
    Keras has no public way to change a layer's class (nor an upstream issue asking for one).
    """
    cells = []
    for method, variable in _WRAPPED_METHODS.items():
        wrapper = vars(layer).get(method)
        code = getattr(wrapper, "__code__", None)
        if code is None or variable not in code.co_freevars:
            raise _unsupported(f"Layer.__new__'s wrapper of {method} ({variable})")
        cells.append((method, wrapper.__closure__[code.co_freevars.index(variable)]))
    old = type(layer)
    if old.call is not cls.call:
        ours = list(inspect.signature(old.call).parameters)
        theirs = list(inspect.signature(cls.call).parameters)
        if ours != theirs:
            raise ValueError(
                f"Cannot turn layer {layer.name!r} from {old.__name__} into {cls.__name__}: "
                f"their call signatures differ ({ours} and {theirs})."
            )
    object.__setattr__(layer, "__class__", cls)
    for method, cell in cells:
        cell.cell_contents = types.MethodType(getattr(cls, method), layer)


def graph_parents(model):
    """`{id(operation): [the operations feeding it]}` over every call of every operation in the
    graph of Functional model `model` (not recursing into nested models).

    Read from the graph itself (`Function._nodes_by_depth`, the nodes Keras runs the model
    by), not from `get_config()`: a Functional subclass (keras-hub's backbones and tasks)
    overrides `get_config` with its constructor arguments. Keras has no public accessor of a
    functional model's nodes.
    """
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if nodes_by_depth is None:
        raise _unsupported("Function._nodes_by_depth")
    parents = {}
    for nodes in nodes_by_depth.values():
        for node in nodes:
            found = parents.setdefault(id(node.operation), [])
            found.extend(parent.operation for parent in node.parent_nodes)
    return parents


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


def train_function_ending_with(model, after_step):
    """`model`'s training function, made as `model.make_train_function` makes it for its
    current compilation, from a `train_step` that calls `after_step()` (in the step's replica
    context, after the optimizer's update) after the model's own. The model keeps its own
    `train_step` and `train_function`.

    Used by `keras_wt.callbacks.MirrorCallback(in_train_step=True)`, which swaps the result in
    as `model.train_function` for the duration of `fit`: the weight mirror's steps then run in
    the compiled step, with no host round trip, whatever the model's class. Keras's public way
    to change the step is to subclass the model and override `train_step`; for any model a
    callback is given, it has none. `make_train_function` reads `self.train_step` when it makes
    the function, so `train_step` is set on this instance for that moment only (a plain
    attribute, past Keras's and TensorFlow's attribute tracking) and removed after. No upstream
    issue asking for a hook after the optimizer's update in the compiled step was found.
    """
    if not callable(getattr(model, "make_train_function", None)):
        raise _unsupported("Trainer.make_train_function")
    if "force" not in inspect.signature(model.make_train_function).parameters:
        raise _unsupported("Trainer.make_train_function(force=True)")
    original = model.train_step
    plain = model.train_function

    if backend.STATELESS:
        # Keras's JAX trainer: `train_step(state, data) -> (logs, state)`, a pure function.
        # `after_step` runs on the new state, as the model's variables it reads and assigns.
        def train_step(state, data):
            logs, state = original(state, data)
            return logs, _stateless(model, state, after_step)
    else:
        def train_step(data):
            logs = original(data)
            after_step()
            return logs

    object.__setattr__(model, "train_step", train_step)
    try:
        model.make_train_function(force=True)
        return model.train_function
    finally:
        object.__delattr__(model, "train_step")
        model.train_function = plain


def _stateless(model, state, fn):
    """Runs `fn()` on the JAX training state `(trainable, non-trainable, optimizer, metrics
    values)` as if they were the values of the model's and its optimizer's variables
    (`keras.StatelessScope`), and returns the state with what `fn` assigned to them."""
    trainable, non_trainable, optimizer, metrics = state
    groups = (
        (model.trainable_variables, trainable),
        (model.non_trainable_variables, non_trainable),
        (model.optimizer.variables, optimizer),
    )
    mapping = [pair for variables, values in groups for pair in zip(variables, values)]
    with keras.StatelessScope(state_mapping=mapping) as scope:
        fn()
    return tuple(
        [scope.get_current_value(variable) for variable in variables]
        for variables, _ in groups
    ) + (metrics,)


def built_variables(optimizer):
    """The variables `optimizer` was built for (`Optimizer._trainable_variables`): what
    `Optimizer.apply(grads)` updates when it is given no variables. Keras keeps them only
    privately; `keras_wt.optimizers.KolenPollack.apply` falls back to them as Keras's own
    `apply` does."""
    if not hasattr(optimizer, "_trainable_variables"):
        raise _unsupported("Optimizer._trainable_variables")
    return optimizer._trainable_variables


def optimizer_strategy(optimizer):
    """The distribution strategy `optimizer` was created under, through which its updates are
    assigned (`Optimizer._distribution_strategy`, set by Keras's TensorFlow optimizer at
    construction). `keras_wt.optimizers.KolenPollack` assigns `B` and the decayed `W` through
    the same strategy as the wrapped optimizer's updates, also when called outside any strategy
    scope; Keras has no public accessor."""
    if backend.STATELESS:  # JAX: one program, whatever the devices (keras_wt.backend.jax)
        return backend.current_strategy()
    if not hasattr(optimizer, "_distribution_strategy"):
        raise _unsupported("Optimizer._distribution_strategy")
    return optimizer._distribution_strategy


def model_strategy(model):
    """`model.distribute_strategy` (TensorFlow's trainer); on JAX, which has none, the one
    program of `keras_wt.backend.jax`."""
    if backend.STATELESS:
        return backend.current_strategy()
    return model.distribute_strategy


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
    strategy = model_strategy(model)
    if not (_KERAS_MULTIWORKER_BUG and backend.is_multi_worker(strategy)):
        yield model
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer

    def local_share(value):
        if backend.is_distributed_value(value):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(local_share, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and backend.is_multi_worker(strategy):
            return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    model._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield model
    finally:
        tf_trainer.reduce_per_replica = original
        del model._maybe_symbolic_build


def conv_lstm_cell_class():
    """The stock cell of `keras.layers.ConvLSTM1D/2D/3D`, which `keras_wt.layers.ConvLSTMCell`
    subclasses (its forward pass and dropout masks are the stock ones). Keras creates it inside
    the `ConvLSTM*` layers and does not export it (no public `keras.layers.ConvLSTMCell`; no
    upstream issue asking for one was found)."""
    try:
        from keras.src.layers.rnn.conv_lstm import ConvLSTMCell
    except ImportError:
        raise _unsupported("keras.src.layers.rnn.conv_lstm.ConvLSTMCell") from None
    return ConvLSTMCell


def read_without_autocast(variable):
    """`variable`'s value in its own dtype, also inside a layer call under mixed precision, whose
    autocast scope would cast it to the compute dtype.

    The recurrent twins read each kernel once per layer call, outside the time loop, and cast
    it at every step, as the stock cell's per-step read does: the weight gradient of each step
    is then cast back before the steps are summed, in the variable's dtype (summed in float16 it
    would lose precision). Keras has no public way to read a variable past the autocast scope;
    `AutocastScope(None)` is the scope that casts nothing.
    """
    try:
        from keras.src.backend.common.variables import AutocastScope
    except ImportError:
        raise _unsupported("keras.src.backend.common.variables.AutocastScope") from None
    with AutocastScope(None):
        return backend.read_value(variable)


def in_training_call():
    """Whether the layer call being run is a training call (`training=True` in Keras's call
    context, which `Layer.__call__` fills in for the whole call, as it passes `training` to
    every nested layer). Keras keeps the context in a private global attribute
    (`Layer._get_call_context` reads it); used where JAX runs the backward hooks of
    `keras_wt.layers` in the forward pass (`FeedbackLayer._on_backward_in_forward`)."""
    from keras.src.backend.common import global_state

    context = global_state.get_global_attribute("current_call_ctx")
    return bool(context is not None and context.get_value("training"))
