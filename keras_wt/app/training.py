"""One training run, from a typed config to `model.fit`: what every front end calls.

`keras-wt-train` (the reference experiments) and `tpu/train_imagenet.py` (ResNets on ImageNet)
both turn their flags into a `TrainConfig` (`keras_wt.app.config`) and call `train`, which goes strategy → data → model →
compile → callbacks → `fit` and writes the run folder of `keras_wt.app.runs`:

* data: a small dataset held in memory (`keras_wt.app.data.pipelines.train_dataset`, an order that depends
  on `(seed, epoch)` only), or ImageNet TFRecords / synthetic ImageNet batches;
* the model of `keras_wt.models` with `feedback=config.algo`;
* SGD with momentum and weight decay of the kernels (`keras_wt.schedules.OptimizerConfig`: for an
  algorithm whose `B` learns through the optimizer, `KolenPollack`), a learning-rate schedule,
  the softmax or the reference summed-sigmoid cross-entropy, accuracy in percent;
* evaluation by `fit(validation_data=...)` on the evaluated epochs (`evaluated_epochs`);
* callbacks (`keras_wt.app.callbacks.create_callbacks`): the weight mirror where a layer
  learns `B` by mirroring,
  `AlignmentCallback`, `StopOnDivergence`, `ResultsRecorder` (`results.json` and the summary
  line), `CSVLogger`, `TensorBoard`, and `keras_wt.app.backup.AtomicBackup` (every epoch's backup
  kept with `keep_checkpoints`).

One process writes a run folder at a time (`keras_wt.app.runs.RunLock`, held for the whole run), and
`experiment_config.json` (`keras_wt.app.records`) is written before anything slow (the data), so a run killed at any
instant can be resumed.

Resuming: `AtomicBackup` saves the model's weights (W, the feedback kernels B, batch-norm
statistics) and the optimizer's variables (momentum, step count) at the end of every epoch, so
that a kill at any instant leaves a complete backup (Keras's `BackupAndRestore` does not; see
`keras_wt.app.backup`), and checks what it reads back. The learning rate is a function of the step
count, the weight-mirror noise is seeded by it and the in-memory data order by the epoch, so a
run restarted on the same run folder continues exactly where its last completed epoch ended;
`keras_wt.app.resume` first cuts its records back to that epoch, so each epoch is recorded once.
"""

import contextlib
import logging
import math
import os

import keras
import numpy as np
import tensorflow as tf

from keras_wt import metrics
from keras_wt import models
from keras_wt import unused_feedback
from keras_wt._compat import multi_worker_fit
from keras_wt.app import callbacks as run_callbacks
from keras_wt.app import records
from keras_wt.app import resume
from keras_wt.app import runs
from keras_wt.app import strategies
from keras_wt.app.callbacks import TrainingDiverged
from keras_wt.app.config import evaluated_epochs
from keras_wt.app.data import datasets
from keras_wt.app.data import pipelines

logger = logging.getLogger("keras_wt")


# --------------------------------------------------------------------------------------------
# Data, model, optimizer
# --------------------------------------------------------------------------------------------


DataError = datasets.DataError


def _data(config):
    """`(make_train, evaluation, input_shape, num_train)` of the run: `make_train(first_epoch)`
    is the training data from epoch `first_epoch` (0-based) on.

    Raises:
        DataError: a damaged file, too few examples, or test images of another shape than the
            training images (checked here, before a model is built for them).
    """
    data = config.data
    if data.dataset == "imagenet":
        num_train = data.resolved_train_examples

        def make_imagenet(first_epoch=0):
            return pipelines.imagenet_datasets(
                data.data_dir, data.batch_size, image_size=data.image_size,
                num_classes=data.resolved_num_classes,
                use_synthetic_data=data.use_synthetic_data, seed=config.seed,
                first_epoch=first_epoch, epochs=config.epochs,
                steps_per_epoch=data.resolved_steps_per_epoch(num_train),
                train_examples=num_train, eval_examples=data.resolved_eval_examples,
            )

        shape = (data.image_size, data.image_size, 3)
        return (lambda first_epoch: make_imagenet(first_epoch)[0]), make_imagenet()[1], shape, \
            num_train
    try:
        (x_train, y_train), (x_test, y_test) = datasets.load_numpy(data.dataset, data.data_dir)
    except ValueError as e:  # a damaged or inconsistent file, named by keras_wt.app.data.datasets
        raise DataError(str(e)) from e
    if data.train_subset is not None:
        x_train, y_train = x_train[:data.train_subset], y_train[:data.train_subset]
    if len(x_train) < data.batch_size or not len(x_test):
        raise DataError(
            f"{data.dataset} has {len(x_train)} training and {len(x_test)} test examples: "
            f"fewer than one batch of {data.batch_size} to train on, or none to test on."
        )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{data.dataset} ({data.data_dir or 'the standard places'}): the training images "
            f"are {x_train.shape[1:]} but the test images {x_test.shape[1:]}; both splits must "
            "have one image shape. Check that the files belong to one dataset."
        )
    flatten = config.model.name == "mlp"
    one_pass = math.ceil(len(x_train) / data.batch_size)
    if data.steps_per_epoch is not None and data.steps_per_epoch > one_pass:
        raise ValueError(
            f"steps_per_epoch={data.steps_per_epoch} is more than the {one_pass} batches of "
            f"one pass over the {len(x_train)} training examples; give at most {one_pass}."
        )

    def make_train(first_epoch):
        return pipelines.train_dataset(
            x_train, y_train, data.batch_size, config.seed, first_epoch, config.epochs, flatten,
            steps_per_epoch=data.steps_per_epoch,
        )

    evaluation = pipelines.test_dataset(x_test, y_test, flatten)
    shape = (int(np.prod(x_train.shape[1:])),) if flatten else tuple(x_train.shape[1:])
    return make_train, evaluation, shape, len(x_train)


def build_model(config, input_shape=None):
    """The network `config.model.name` for `config.algo` with `config.model.options`, at
    `input_shape` (default: ImageNet crops of `config.data.image_size`; fixed, since the weight
    mirror draws noise of each layer's input shape). Unless `config.model.keep_unused_feedback`,
    the layers whose `B` no gradient uses are built without one (`keras_wt.unused_feedback`)."""
    if input_shape is None:
        input_shape = (config.data.image_size, config.data.image_size, 3)
    model = models.get(
        config.model.name,
        input_shape=tuple(input_shape),
        num_classes=config.data.resolved_num_classes,
        feedback=config.algo,
        seed=config.seed,
        dtype=config.resolved_dtype,
        **config.model.options,
    )
    if not config.model.keep_unused_feedback:
        # After the build, so the weights are those drawn with every B (same seed, same W).
        unused_feedback.drop_unused_feedback(model)
    return model


def _outputs_logits(model):
    activation = getattr(model.layers[-1], "activation", None)
    return activation is None or activation is keras.activations.linear


def compile_model(model, config, steps_per_epoch, strategy_name=None, steps_per_execution=None):
    """Compiles `model` with the schedule and optimizer of `config.optimizer`
    (`keras_wt.schedules.OptimizerConfig.create`), the loss and accuracy (percent; ImageNet: also
    top-5) of `config`, `steps_per_execution` steps per call (default:
    `config.resolved_steps_per_execution`); returns the learning-rate schedule. ImageNet labels
    are one-hot, the small datasets' integer classes."""
    optimizer, schedule = config.optimizer.create(config.algo, steps_per_epoch, config.epochs)
    imagenet = config.data.dataset == "imagenet"
    from_logits = _outputs_logits(model)
    if config.loss == "summed_sigmoid":
        loss = models.SummedSigmoidCrossEntropy(from_logits=from_logits)
    elif imagenet:
        loss = keras.losses.CategoricalCrossentropy(
            from_logits=from_logits, label_smoothing=config.label_smoothing
        )
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    accuracies = [metrics.accuracy]
    if imagenet:
        accuracies.append(metrics.top5_accuracy)
    jit_compile = config.jit_compile
    if jit_compile is None:
        jit_compile = strategies.jit_compile_for(strategy_name or config.strategy)
    model.compile(
        optimizer=optimizer,
        loss=loss,
        # Weighted, so that the zero-weight padding of the last evaluation batch is not counted.
        weighted_metrics=accuracies,
        jit_compile=jit_compile,
        # Under the strategy's scope: the current strategy is the model's.
        steps_per_execution=steps_per_execution or config.resolved_steps_per_execution(
            steps_per_epoch),
    )
    return schedule


def _probe_batch(evaluation, size):
    """The first `size` evaluation examples `(x, y)`."""
    xs, ys, n = [], [], 0
    for batch in evaluation:
        xs.append(batch[0])
        ys.append(batch[1])
        n += int(batch[1].shape[0])
        if n >= size:
            break
    return tf.concat(xs, 0)[:size], tf.concat(ys, 0)[:size]


def train(config, strategy=None, callbacks=(), flags=None, derived=None):
    """Trains `config.model` with `config.algo` on `config.data`, evaluating on the
    evaluated epochs (`evaluated_epochs`); continues the run in `config.model_dir` if it has a
    backup.

    Args:
        config: a `TrainConfig`.
        strategy: a `tf.distribute.Strategy`, instead of creating `config.strategy`.
        callbacks: extra Keras callbacks, run before the backup is written.
        flags: the command-line flags, recorded in `experiment_config.json`.
        derived: values derived from the flags (e.g. converted units), recorded with them.

    Returns:
        `(model, history)`.

    Raises:
        keras_wt.app.runs.RunLocked: another process writes `config.model_dir`.
        keras_wt.app.runs.RunError: its backup or records cannot be trusted (the message says why).
        DataError: the data cannot be trained on.
        TrainingDiverged: the run diverged (`StopOnDivergence`), or diverged before.
        ValueError: a resumed run's settings differ from the saved ones.
    """
    if strategy is None:
        strategy = strategies.create_strategy(
            config.strategy, tpu=config.tpu, devices=config.mirrored_devices
        )
    replicas = strategy.num_replicas_in_sync
    if config.data.batch_size % replicas:
        raise ValueError(
            f"batch_size={config.data.batch_size} must be divisible by the {_replicas(replicas)}."
        )
    chief = strategies.is_chief(strategy)
    writes = bool(config.model_dir) and chief
    if writes:
        tf.io.gfile.makedirs(config.model_dir)
    # The lock first: a process locked out writes nothing, not even the log.
    lock = runs.RunLock(config.model_dir) if writes else contextlib.nullcontext()
    with lock, records.LogFile(config.model_dir if writes else None) as log:
        try:
            return _train(config, strategy, callbacks, flags, derived, writes)
        except Exception as e:
            failure = describe_failure(e)
            if failure:  # the front end prints it; log.txt says why the run stopped
                log.note(failure[1])
            raise


def _fit(model, config, make_train, first_epoch, callbacks, steps_per_epoch, **fit_args):
    """`model.fit` of epochs `first_epoch` … `config.epochs − 1` on `make_train(first_epoch)`.

    With `steps_per_execution="auto"` where several steps per call are allowed, in two `fit`s:
    the first epoch at `resolved_steps_per_execution`'s steps per call, timed and then stopped
    (`CallTimer`), then the rest at `tuned_steps_per_execution`'s, on `make_train(first_epoch +
    1)`: the stream a run resumed after that epoch reads, so the batches, and everything
    computed, are those of one `fit` (and of one step per call). Both `fit`s have the run's
    `epochs`. Callbacks see `on_train_begin` and `on_train_end` once per `fit`, as in a resumed
    run. Returns the `History`, of both `fit`s.
    """
    def fit(first, callbacks):
        return model.fit(make_train(first), epochs=config.epochs, initial_epoch=first,
                         callbacks=callbacks, steps_per_epoch=steps_per_epoch, **fit_args)

    # Tuned only where it can change: "auto", several steps per call allowed but fewer than the
    # epoch's, and an epoch after the first.
    if not (config.steps_per_execution == "auto"
            and 1 < model.steps_per_execution < steps_per_epoch
            and first_epoch + 1 < config.epochs):
        return fit(first_epoch, callbacks)
    timer = run_callbacks.CallTimer(stop_after_epoch=True)
    first = fit(first_epoch, list(callbacks) + [timer])  # last: it ends the fit
    if timer.stopped:  # another callback ended the run
        return first
    steps_per_execution = config.tuned_steps_per_execution(
        steps_per_epoch, timer.seconds_per_step, model.steps_per_execution)
    if steps_per_execution != model.steps_per_execution:
        logger.info("%d steps per host call from epoch %d on (%.3g s per step in epoch %d).",
                    steps_per_execution, first_epoch + 2, timer.seconds_per_step,
                    first_epoch + 1)
        # Keras builds its step functions for one `steps_per_execution`: built again.
        model.steps_per_execution = steps_per_execution
        model.make_train_function(force=True)
        model.make_test_function(force=True)
        model.predict_function = None
    rest = fit(first_epoch + 1, callbacks)
    for key, values in first.history.items():
        rest.history[key] = values + rest.history.get(key, [])
    rest.epoch = first.epoch + rest.epoch
    return rest


def _replicas(n):
    return f"{n} replica" if n == 1 else f"{n} replicas"


def _op_error_line(message):
    """The line of a TensorFlow error message that says what went wrong (not where): for a
    failed `tf.debugging.Assert`, its message."""
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")
    lines = [line.strip() for line in message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(noise)] or lines or [""]
    line = useful[0]
    if "assertion failed: [" in line:
        line = line.split("assertion failed: [", 1)[1].rsplit("]", 1)[0]
    return line


def describe_failure(error):
    """`(exit status, one-line message)` for an error that stopped a run for another reason
    than a bug, or `None` (a bug, whose traceback is worth seeing).

    Status 1, a failure while running: bad or missing data (`DataError`, a missing dataset's
    `FileNotFoundError`, an error TensorFlow raised while it read the files), the disk (any
    `OSError`: full, read-only), the run folder (`keras_wt.app.runs.RunError`: held by another
    process, a damaged backup), a run that diverged (`TrainingDiverged`). Status 2, settings that
    cannot be used: any other `ValueError` (a value out of range, settings that differ from those
    of the run resumed).
    """
    if isinstance(error, (TrainingDiverged, runs.RunError, DataError, OSError)):
        return 1, str(error)
    if isinstance(error, tf.errors.OpError):
        return 1, f"{type(error).__name__}: {_op_error_line(error.message)}"
    if isinstance(error, ValueError):
        return 2, str(error)
    return None


def _train(config, strategy, callbacks, flags, derived, writes):
    # First: the seed of every random op created from here on (data shuffles included).
    keras.utils.set_random_seed(config.seed)
    continued = False
    if writes:  # before the data (slow): a run killed while it loads them can be resumed
        continued = records.record_config(config, flags, derived)
    make_train, evaluation, input_shape, num_train = _data(config)
    steps_per_epoch = config.data.resolved_steps_per_epoch(num_train)
    steps_per_execution = config.resolved_steps_per_execution(steps_per_epoch, strategy)
    if steps_per_epoch % steps_per_execution:
        # Keras runs whole executions: the last one of every epoch would take batches of the
        # next epoch from the stream, and a resumed run would not see the same batches.
        logger.warning(
            "steps_per_execution=%d does not divide the %d steps of an epoch: every epoch will "
            "take %d batches of the next one, and a resumed run will not continue exactly.",
            steps_per_execution, steps_per_epoch, -steps_per_epoch % steps_per_execution,
        )
    mirror = config.resolved_mirror(num_train)
    if writes:
        records.record_config(config, flags, dict(
            derived or {}, steps_per_epoch=steps_per_epoch, mirror_warmup_steps=mirror.warmup_steps
        ))
    logger.info(
        "Training %s with feedback=%r on %s on %s (%s, dtype %s): global batch %d, "
        "%d steps per epoch, %d epochs, peak learning rate %.4g.",
        config.model.name, config.algo, config.data.dataset,
        _replicas(strategy.num_replicas_in_sync), config.strategy,
        config.resolved_dtype, config.data.batch_size, steps_per_epoch, config.epochs,
        config.optimizer.learning_rate,
    )
    with strategy.scope():
        model = build_model(config, input_shape)
        compile_model(model, config, steps_per_epoch, steps_per_execution=steps_per_execution)
    optimizer_steps = config.optimizer_steps_per_epoch(steps_per_epoch, steps_per_execution)
    first_epoch, results = 0, {}
    if config.model_dir:
        with strategy.scope():
            first_epoch = run_callbacks.create_backup(config, strategy, optimizer_steps).restore(model)
    if writes:
        results = resume.prepare(config.model_dir, first_epoch,
                                 evaluated_epochs(config.epochs, config.eval_every),
                                 optimizer_steps)
    if first_epoch:
        logger.info("Resuming %s after epoch %d (its latest good backup); any later epoch logged "
                    "above was interrupted and is trained again.", config.model_dir, first_epoch)
    elif continued:
        logger.info("Restarting %s from its first epoch: the interrupted run completed none.",
                    config.model_dir)
    probe = None
    if config.alignment == "full":
        probe = _probe_batch(evaluation, config.alignment_probe_size)
    all_callbacks = run_callbacks.create_callbacks(
        model, config, strategy, probe=probe, results=results, extra=callbacks,
        mirror=mirror, steps_per_epoch=optimizer_steps,
    )
    eval_steps = config.resolved_eval_steps
    with multi_worker_fit(model):
        history = _fit(
            model, config, make_train, first_epoch, all_callbacks,
            steps_per_epoch=steps_per_epoch,
            validation_data=None if eval_steps == 0 else evaluation,
            validation_steps=eval_steps or None,
            validation_freq=evaluated_epochs(config.epochs, config.eval_every),
            shuffle=False,  # the pipelines shuffle, per epoch
            verbose=config.verbose,
        )
    if writes:
        path = os.path.join(config.model_dir, runs.MODEL_FILE)
        tmp = os.path.join(config.model_dir, f"tmp-{runs.MODEL_FILE}")
        if runs.is_local(path):
            model.save(tmp)  # then renamed: a kill while it saves leaves the previous file
            runs.replace_file(tmp, path)
        else:
            model.save(path)
        logger.info("Saved the trained model to %s", path)
    return model, history

