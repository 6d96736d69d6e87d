"""Distribution strategies by name, and what each means for compilation and for writing files."""

import keras
import tensorflow as tf

STRATEGIES = ("tpu", "mirrored", "multiworker", "default", "data_parallel")


def create_strategy(name="default", tpu=None, devices=None):
    """Returns the `tf.distribute.Strategy` called `name`.

    Args:
        name: `"tpu"`, `"mirrored"`, `"multiworker"` or `"default"`; or, on JAX,
            `"data_parallel"`: `keras.distribution.DataParallel` over every device (set as
            Keras's distribution; the default strategy is returned, one "replica" whose batch
            is the global batch).
        tpu: for `"tpu"`: the TPU's name, or `"local"` (the default) on a TPU VM.
        devices: for `"mirrored"`: the devices to use (default: every GPU, else the CPU).

    `"multiworker"` reads the cluster from the `TF_CONFIG` environment variable.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not one of {STRATEGIES}")
    if name == "data_parallel":
        if keras.backend.backend() != "jax":
            raise ValueError(
                "strategy='data_parallel' is keras.distribution's DataParallel, which keras_wt "
                "runs on the JAX backend (KERAS_BACKEND=jax); on TensorFlow use 'mirrored', "
                "'multiworker' or 'tpu'."
            )
        # One SPMD program over every device of this process; the batch is the global batch,
        # which Keras splits across the devices.
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return tf.distribute.get_strategy()
    if name != "default" and keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"strategy={name!r} is a tf.distribute strategy, which only Keras's TensorFlow "
            f"backend runs; Keras is on {keras.backend.backend()!r}. On JAX, distribute with "
            "keras.distribution instead (e.g. keras.distribution.set_distribution("
            "keras.distribution.DataParallel()) before the model is built) and keep "
            "strategy='default'; or set KERAS_BACKEND=tensorflow."
        )
    if name == "tpu":
        tpu = tpu or "local"
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu not in ("", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def jit_compile_for(strategy_name):
    """The `jit_compile` argument of `model.compile` under the strategy `strategy_name`.

    * `"default"`: `True`: the whole training step is one XLA computation, as on a TPU.
    * `"data_parallel"` (JAX, `keras.distribution.DataParallel`): `True`, one SPMD program.
    * `"tpu"`: `False`, and yet every step runs as XLA: `TPUStrategy` compiles the replicated
      step for the TPU itself, so Keras's own XLA wrapping would only add a second, outer
      compilation (Keras's `jit_compile="auto"` is off under every `tf.distribute` strategy).
    * `"mirrored"`, `"multiworker"`: `False`. Keras's XLA-compiled step fails under these
      strategies even for stock Keras models ("Trying to access resource ... located in device
      CPU:1 from device CPU:0", keras-team/keras#19005). The per-replica computation still
      compiles with XLA when it is wrapped in its own `tf.function(jit_compile=True)` inside
      `strategy.run`, which is how the tests check that every algorithm compiles for a TPU.
    """
    if strategy_name not in STRATEGIES:
        raise ValueError(f"strategy={strategy_name!r} is not one of {STRATEGIES}")
    return strategy_name in ("default", "data_parallel")


def is_chief(strategy):
    """Whether this process writes checkpoints and summaries (always, except on the non-chief
    workers of a `MultiWorkerMirroredStrategy`)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def task_name(strategy):
    """`"<task type>-<task id>"` of this process (`"worker-0"` outside a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "worker-0"
    return f"{resolver.task_type}-{resolver.task_id}"
