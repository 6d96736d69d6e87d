"""The trainer (`keras_wt.app.training.train`) as the ImageNet front end uses it: schedule, weight
decay, mirror rates, data, distribution, resuming.

The expensive checks share one set of tiny ImageNet-layout TFRecords and the session's
two-CPU MirroredStrategy:

* a ResNet-18 (32x32 images) whose stages use the five algorithms trains with its forward and
  backward pass compiled by XLA on each replica, as on a TPU;
* the trainer runs end to end on the TFRecords under MirroredStrategy;
* a run resumed from the backup of an interrupted run ends exactly where the uninterrupted run
  ends.
"""

import dataclasses
import importlib.util
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from conftest import assert_allclose
from keras_wt.app.data import datasets
from keras_wt import layers as layers_lib
from keras_wt import models
from keras_wt.app.data import pipelines
from keras_wt import schedules
from keras_wt.app import strategies
from keras_wt.app import callbacks as run_callbacks
from keras_wt.app import training
from keras_wt.app.config import (
    IMAGENET_OPTIMIZER,
    RECIPE_MIRROR,
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from keras_wt.schedules import OptimizerConfig

NUM_CLASSES = 10
IMAGE_SIZE = 32
BATCH = 8  # global: 4 per replica on two CPUs
N_TRAIN, N_VALIDATION = 32, 20  # the examples of `imagenet_dir`


def _imagenet_data(imagenet_dir, steps_per_epoch):
    """The `DataConfig` of the small TFRecords of `imagenet_dir`."""
    return DataConfig(data_dir=imagenet_dir, image_size=IMAGE_SIZE, train_examples=N_TRAIN,
                      eval_examples=N_VALIDATION, num_classes=NUM_CLASSES, batch_size=BATCH,
                      steps_per_epoch=steps_per_epoch)


def _load_cli():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "tpu", "train_imagenet.py")
    spec = importlib.util.spec_from_file_location("train_imagenet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """32 training and 20 validation JPEGs of 36-47 pixels in the standard TFRecord layout."""
    directory = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)

    def images(n):
        return [
            rng.integers(0, 256, size=(*rng.integers(36, 48, size=2), 3), dtype=np.uint8)
            for _ in range(n)
        ]

    datasets.write_imagenet_tfrecords(
        directory, images(N_TRAIN), rng.integers(0, NUM_CLASSES, N_TRAIN), "train", num_shards=2
    )
    datasets.write_imagenet_tfrecords(
        directory, images(N_VALIDATION), rng.integers(0, NUM_CLASSES, N_VALIDATION), "validation",
        num_shards=1
    )
    return str(directory)


# --------------------------------------------------------------------------------------------
# Schedule and optimizer
# --------------------------------------------------------------------------------------------


def test_step_schedule_warms_up_then_decays_tenfold():
    schedule = schedules.learning_rate_schedule(
        schedules.peak_learning_rate(1024), steps_per_epoch=10, epochs=90, warmup_epochs=5,
        decay_epochs=(30, 60, 80),
    )
    peak = 0.1 * 1024 / 256
    expected = {0: peak / 50, 24: peak * 25 / 50, 49: peak, 50: peak, 299: peak,
                300: peak * 0.1, 599: peak * 0.1, 600: peak * 0.01, 800: peak * 0.001}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-6), step


def test_cosine_schedule_reaches_zero_at_the_last_epoch():
    schedule = schedules.learning_rate_schedule(
        0.1, steps_per_epoch=10, epochs=90, schedule="cosine", warmup_epochs=5
    )
    assert float(schedule(49)) == pytest.approx(0.1)
    midpoint = 50 + (900 - 50) // 2
    assert float(schedule(midpoint)) == pytest.approx(0.05, rel=1e-5)
    assert float(schedule(900)) == pytest.approx(0.0, abs=1e-9)
    restored = schedules.WarmupSchedule.from_config(schedule.get_config())
    assert float(restored(123)) == float(schedule(123))


def test_schedule_values_are_those_of_the_tensorflow_implementation_bit_for_bit():
    """The schedule in `keras.ops` gives, at every step, the float32 of the implementation in
    `tf.*` it replaced (values recorded from it): warm-up, step decay, cosine, and the decay
    budget's λ summed over the steps."""
    step = schedules.learning_rate_schedule(0.4, steps_per_epoch=10, epochs=90, warmup_epochs=5)
    recorded = {0: "0x1.0624dep-7", 24: "0x1.99999ap-3", 49: "0x1.99999ap-2",
                50: "0x1.99999ap-2", 299: "0x1.99999ap-2", 300: "0x1.47ae16p-5",
                600: "0x1.0624dep-8", 800: "0x1.a36e30p-12"}
    for t, value in recorded.items():
        assert float(step(t)) == float.fromhex(value), t
    # The warm-up by hand, in float32: peak·(t + 1)/warmup_steps.
    for t in range(50):
        hand = np.float32(np.float32(0.4) * np.float32(t + 1)) / np.float32(50)
        assert np.float32(step(t)) == hand, t
    cosine = schedules.learning_rate_schedule(0.05, steps_per_epoch=7, epochs=13,
                                              schedule="cosine", warmup_epochs=1.5)
    recorded = {0: "0x1.47ae14p-8", 9: "0x1.99999ap-5", 10: "0x1.99999ap-5",
                11: "0x1.99722ep-5", 50: "0x1.a18aeap-6", 90: "0x1.3b6ccep-16", 91: "0x0p+0",
                93: "0x0p+0"}
    for t, value in recorded.items():
        assert float(cosine(t)) == float.fromhex(value), t
    halving = schedules.learning_rate_schedule(0.1, steps_per_epoch=3, epochs=10,
                                               warmup_epochs=0, decay_epochs=(2, 5),
                                               decay_rate=0.5)
    assert [float(halving(t)) for t in (5, 6, 14, 15)] == [
        float.fromhex(v) for v in ("0x1.99999ap-4", "0x1.99999ap-5", "0x1.99999ap-5",
                                   "0x1.99999ap-6")]
    assert schedules.decay_for_budget(step, 903, 5.0) == float.fromhex("0x1.4ce589537a0bap-5")
    assert schedules.decay_for_budget(cosine, 94, 5.0) == float.fromhex("0x1.1344d0d595bdap+1")


def _dense_bn_model(feedback):
    inputs = keras.Input((4,))
    x = layers_lib.Dense(3, feedback=feedback)(inputs)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, layers_lib.Dense(2, feedback=feedback)(x))


def test_weight_decay_shrinks_kernels_only_by_lr_times_decoupled_decay():
    model = _dense_bn_model("fa")
    lr, wd, momentum = 0.5, 1e-2, 0.9
    decay = schedules.decoupled_weight_decay(wd, momentum)
    assert decay == pytest.approx(0.1)
    optimizer = schedules.create_optimizer("fa", lr, momentum=momentum, weight_decay=wd)
    for variable in model.trainable_variables:  # give biases, gamma and beta non-zero values
        variable.assign(variable + 0.5)
    before = [v.numpy() for v in model.trainable_variables]
    feedback = [layer.feedback_kernel.numpy() for layer in layers_lib.feedback_layers(model)]
    variables = model.trainable_variables
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    for variable, old in zip(model.trainable_variables, before):
        factor = (1 - lr * decay) if variable.name == "kernel" else 1.0
        assert_allclose(variable.numpy(), factor * old, rtol=1e-6)
    for layer, old in zip(layers_lib.feedback_layers(model), feedback):
        np.testing.assert_array_equal(layer.feedback_kernel.numpy(), old)  # FA: B stays fixed


def test_kolen_pollack_optimizer_decays_w_and_b_identically():
    model = _dense_bn_model("kp")
    lr = 0.5
    optimizer = schedules.create_optimizer("kp", lr, momentum=0.9, weight_decay=1e-2)
    assert isinstance(optimizer, keras_wt.optimizers.KolenPollack)
    assert optimizer.kp_weight_decay == pytest.approx(0.1)
    assert not optimizer.inner_optimizer.weight_decay
    for variable in model.trainable_variables:
        variable.assign(variable + 0.5)
    variables = model.trainable_variables
    before = [v.numpy() for v in variables]
    feedback = [layer.feedback_kernel.numpy() for layer in layers_lib.feedback_layers(model)]
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    for variable, old in zip(variables, before):
        factor = (1 - lr * 0.1) if variable.name == "kernel" else 1.0
        assert_allclose(variable.numpy(), factor * old, rtol=1e-6)
    for layer, old in zip(layers_lib.feedback_layers(model), feedback):
        assert_allclose(layer.feedback_kernel.numpy(), (1 - lr * 0.1) * old, rtol=1e-6)
    assert schedules.create_optimizer("bp", 0.1, weight_decay=0).weight_decay is None


def test_jit_compile_follows_the_strategy():
    assert strategies.jit_compile_for("default") is True
    for name in ("tpu", "mirrored", "multiworker"):
        assert strategies.jit_compile_for(name) is False
    with pytest.raises(ValueError, match="strategy='gpu' is not one of"):
        strategies.jit_compile_for("gpu")


# --------------------------------------------------------------------------------------------
# Weight mirror and alignment
# --------------------------------------------------------------------------------------------


def test_default_mirror_brings_every_b_to_w_scale():
    model = models.cnn(
        input_shape=(12, 12, 3), filters=(4, 8), kernel_size=3, dense_units=8,
        num_classes=4, feedback="wm", seed=3,
    )
    # The trainer's defaults σ = λ = 1, with a faster rate and a bigger batch to converge in
    # 40 steps.
    callback = run_callbacks.create_mirror_callback(model, dataclasses.replace(
        RECIPE_MIRROR, learning_rate=0.2, batch_size=256, warmup_steps=0))
    assert (callback.noise_std, callback.decay) == (1.0, 1.0)
    callback.set_model(model)
    callback.on_train_begin()
    for counter in range(40):
        callback.mirror(counter)
    # B -> (σ²/λ)·W = W for every layer, convolutions with "same" padding included (each kernel
    # entry's step is averaged over the positions where it reads real input): the error signal
    # keeps its scale. 0.8^40 of the random start is left; the finite noise batch leaves at most
    # atan √(d_in·η·λ/(2n)) = atan √(72·0.2/512) ≈ 9.5° (the 72-input dense layer) and a norm
    # ratio of about 1/cos θ.
    for name, ratio in keras_wt.alignment.norm_ratios(model).items():
        assert 0.9 < ratio < 1.1, (name, ratio)
    for name, degrees in keras_wt.alignment.weight_angles(model).items():
        assert degrees < 15, (name, degrees)
    assert run_callbacks.create_mirror_callback(models.cnn(feedback="kp"), RECIPE_MIRROR) is None


def test_weight_alignment_writes_angles_for_every_layer():
    model = _dense_bn_model("ss")
    callback = keras_wt.callbacks.AlignmentCallback(probe=None)
    callback.set_model(model)
    logs = {}
    callback.on_epoch_end(0, logs)
    names = [layer.name for layer in layers_lib.feedback_layers(model)]
    expected_keys = [f"{kind}/{n}" for kind in ("weight_angle", "norm_ratio") for n in names]
    assert sorted(logs) == sorted(expected_keys)
    layer = layers_lib.feedback_layers(model)[0]
    expected = keras_wt.alignment.angle(
        layer.kernel.numpy(), np.sign(layer.kernel.numpy()) * np.sqrt(2.0 / 3)
    )
    assert logs[f"weight_angle/{layer.name}"] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Data and flags
# --------------------------------------------------------------------------------------------


def test_evaluation_batches_are_padded_with_zero_weights():
    images = tf.reshape(tf.range(5 * 2 * 2 * 3, dtype=tf.float32), (5, 2, 2, 3))
    ds = tf.data.Dataset.from_tensor_slices((images, tf.constant([0, 1, 2, 0, 1])))
    batches = list(pipelines.pad_to_batches(ds, 4, num_classes=3))
    assert len(batches) == 2
    x, y, w = batches[1]
    assert x.shape == (4, 2, 2, 3) and y.shape == (4, 3)
    np.testing.assert_array_equal(w, [1, 0, 0, 0])
    np.testing.assert_array_equal(y[0], [0, 1, 0])
    np.testing.assert_array_equal(x[1:], np.zeros((3, 2, 2, 3)))


def test_flags_map_to_the_config():
    config = cli.parse_flags(
        ["--tpu=local", "--strategy=tpu", "--data_dir=gs://bucket/imagenet",
         "--model_dir=gs://bucket/run", "--model=resnet50", "--algo=kp", "--batch_size=1024",
         "--schedule=cosine", "--decay_epochs=30,60,80", "--label_smoothing=0.1",
         "--steps_per_execution=200", "--no-zero_init_residual"]
    )
    assert config.strategy == "tpu" and config.tpu == "local"
    assert config.model.name == "resnet50" and config.algo == "kp"
    assert config.optimizer.decay_epochs == (30, 60, 80) and config.optimizer.schedule == "cosine"
    assert config.resolved_dtype == "mixed_bfloat16"
    assert config.data.resolved_steps_per_epoch(1281167) == 1281167 // 1024
    assert config.model.options == {"zero_init_residual": False}
    assert config.steps_per_execution == 200
    assert config.optimizer.learning_rate == pytest.approx(0.4)
    assert config.epochs == 90 and config.optimizer.l2 == 1e-4 and config.optimizer.momentum == 0.9
    # The defaults are the configs' own: the recipe's mirror, ImageNet's optimizer.
    assert config.mirror == dataclasses.replace(RECIPE_MIRROR, seed=config.seed)
    assert config.optimizer == dataclasses.replace(IMAGENET_OPTIMIZER, schedule="cosine")
    with pytest.raises(SystemExit):
        cli.parse_flags(["--strategy=default"])  # neither --data_dir nor --use_synthetic_data


def test_callbacks_measure_before_logging_and_back_up_last(tmp_path):
    config = TrainConfig(
        data=DataConfig(use_synthetic_data=True), model=ModelConfig(name="cnn"), algo="wm",
        model_dir=str(tmp_path), mirror=dataclasses.replace(RECIPE_MIRROR, warmup_steps=0),
    )
    model = models.cnn(input_shape=(8, 8, 3), num_classes=4, feedback="wm")
    extra = keras.callbacks.Callback()
    callbacks = run_callbacks.create_callbacks(
        model, config, tf.distribute.get_strategy(), extra=[extra]
    )
    kinds = [type(cb).__name__ for cb in callbacks]
    # The mirror and the alignment write before anything reads `logs`; the divergence check
    # before anything records the epoch; the backup of an epoch is written after everything
    # else of the epoch (the user's callbacks included).
    assert kinds.index("AlignmentCallback") > kinds.index("MirrorCallback")
    assert kinds.index("StopOnDivergence") > kinds.index("AlignmentCallback")
    for reader in (run_callbacks.ResultsRecorder, keras.callbacks.CSVLogger,
                   keras.callbacks.TensorBoard):
        (index,) = [i for i, cb in enumerate(callbacks) if isinstance(cb, reader)]
        assert index > kinds.index("StopOnDivergence"), reader
    assert kinds[-1] == "AtomicBackup" and callbacks[-2] is extra
    assert callbacks[-1].keep  # every epoch's backup kept: the per-epoch checkpoints
    config = dataclasses.replace(config, algo="kp", keep_checkpoints=False)
    model = models.cnn(input_shape=(8, 8, 3), num_classes=4, feedback="kp")
    kinds = [type(cb).__name__ for cb in run_callbacks.create_callbacks(
        model, config, tf.distribute.get_strategy())]
    assert "MirrorCallback" not in kinds


# --------------------------------------------------------------------------------------------
# Every algorithm, XLA per replica, two replicas
# --------------------------------------------------------------------------------------------

# One ResNet-18 holds every algorithm, a stage each: compiling a ResNet-18 with XLA costs about
# 6 s of CPU per replica device, so five separate networks would take most of this suite's
# time budget while running the same per-layer code.
STAGE_ALGORITHMS = {"stem": "ss", "stage1": "bp", "stage2": "fa", "stage3": "wm", "stage4": "kp",
                    "classifier": "kp"}


def _mixed_resnet18():
    """ResNet-18 whose feedback layers use the algorithm of their stage (`STAGE_ALGORITHMS`)."""
    base = models.resnet18(
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), num_classes=NUM_CLASSES, feedback="fa", seed=0
    )

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, layers_lib.FeedbackLayer):
            config["feedback"] = STAGE_ALGORITHMS[layer.name.split("_")[0]]
        return layer.__class__.from_config(config)

    return keras.models.clone_model(base, clone_function=clone)


def _local(variable, strategy):
    return [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]


def test_resnet18_trains_every_algorithm_with_xla_on_every_replica(imagenet_dir, two_cpu_strategy):
    strategy = two_cpu_strategy
    steps = 3
    # Warm-up over the first 2 steps, then x0.1: the three steps use three learning rates.
    config = TrainConfig(
        data=_imagenet_data(imagenet_dir, steps_per_epoch=2), model=ModelConfig(name="resnet18"),
        algo="kp", epochs=2, optimizer=OptimizerConfig(
            learning_rate=0.1, warmup_epochs=1, decay_epochs=(1,), l2=0.01),
    )
    with strategy.scope():
        model = _mixed_resnet18()
        schedule = training.compile_model(
            model, config, steps_per_epoch=2, strategy_name="mirrored"
        )
        optimizer = model.optimizer  # KolenPollack: the stage-4 layers are kp layers
        optimizer.build(model.trainable_variables)
    # The five rules of the stages; the others are checked under replicas in test_rules.py.
    layers = {a: [l for l in layers_lib.feedback_layers(model) if l.feedback == a]
              for a in set(STAGE_ALGORITHMS.values())}
    assert all(layers.values())
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="sum")

    def loss_and_gradients(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True)) / BATCH
        return loss, tape.gradient(loss, model.trainable_variables)

    compiled = tf.function(loss_and_gradients, jit_compile=True)

    def replica_step(images, labels):
        loss, grads = compiled(images, labels)
        optimizer.apply(grads, model.trainable_variables)  # all-reduces the gradients
        return loss, grads

    @tf.function
    def train_step(images, labels):
        return strategy.run(replica_step, args=(images, labels))

    # The mirror's own XLA compilation is checked with convolutions in the resume test below.
    mirror = run_callbacks.create_mirror_callback(model, dataclasses.replace(
        RECIPE_MIRROR, learning_rate=0.5, batch_size=8, warmup_steps=0))
    mirror.set_model(model)
    mirror.on_train_begin()
    assert mirror.mirror.layers == layers["wm"]

    train_data, _ = pipelines.imagenet_datasets(
        imagenet_dir, BATCH, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES
    )
    iterator = iter(strategy.experimental_distribute_dataset(train_data))
    stored = layers["fa"] + layers["wm"] + layers["kp"]
    initial_b = {layer.name: layer.feedback_kernel.numpy() for layer in stored}
    decay = schedules.decoupled_weight_decay(config.optimizer.l2, config.optimizer.momentum)
    for step in range(steps):
        images, labels = next(iterator)
        if step == 0:  # the replica's XLA gradients equal TensorFlow's, for every algorithm
            first_images = strategy.experimental_local_results(images)[0]
            first_labels = strategy.experimental_local_results(labels)[0]
            _, eager = loss_and_gradients(first_images, first_labels)
        difference = {l.name: l.feedback_kernel.numpy() - l.kernel.numpy() for l in layers["kp"]}
        losses, grads = train_step(images, labels)
        for loss in strategy.experimental_local_results(losses):
            assert np.isfinite(float(loss)), (step, float(loss))
        if step == 0:
            xla = [strategy.experimental_local_results(g)[0] for g in grads]
            for variable, a, b in zip(model.trainable_variables, xla, eager):
                assert_allclose(a, b, rtol=2e-3, atol=2e-5)
        # Kolen-Pollack: B - W shrinks by exactly (1 - lr_t * decay) at step t.
        shrink = 1.0 - float(schedule(step)) * decay
        for layer in layers["kp"]:
            assert_allclose(
                layer.feedback_kernel.numpy() - layer.kernel.numpy(),
                shrink * difference[layer.name], rtol=1e-4, atol=1e-6,
            )
        mirror.mirror(step)
    assert int(optimizer.iterations.numpy()) == steps
    assert len({float(schedule(t)) for t in range(steps)}) == steps

    # Every replica holds the same weights, feedback kernels and optimizer state. (Not the
    # batch-norm moving statistics: Keras 3 keeps them per replica, each an average of its own
    # batches, as in stock Keras models.)
    replicated = model.trainable_weights + [l.feedback_kernel for l in stored] + optimizer.variables
    for variable in replicated:
        first, second = _local(variable, strategy)
        np.testing.assert_array_equal(first, second, err_msg=variable.path)
    assert all(layer.feedback_kernel is None for layer in layers["bp"] + layers["ss"])
    for layer in layers["fa"]:  # fixed
        np.testing.assert_array_equal(layer.feedback_kernel.numpy(), initial_b[layer.name])
    for layer in layers["wm"] + layers["kp"]:  # learned
        moved = np.abs(layer.feedback_kernel.numpy() - initial_b[layer.name]).max()
        assert moved > 1e-5, (layer.name, moved)


# --------------------------------------------------------------------------------------------
# The trainer end to end
# --------------------------------------------------------------------------------------------


def test_steps_per_execution_under_strategies(two_cpu_strategy):
    """Keras 3 cannot run several steps per call under a MirroredStrategy of several replicas
    (keras-team/keras#19246): "auto" is 1 there and an explicit value above 1 is refused."""
    auto = TrainConfig(algo="kp", data=DataConfig(dataset="mnist"), steps_per_execution="auto")
    assert auto.resolved_steps_per_execution(469) == 7
    assert auto.resolved_steps_per_execution(469, two_cpu_strategy) == 1
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert auto.resolved_steps_per_execution(469, one_device) == 7
    explicit = dataclasses.replace(auto, steps_per_execution=4)
    assert explicit.resolved_steps_per_execution(469) == 4
    with pytest.raises(ValueError, match="keras-team/keras#19246"):
        explicit.resolved_steps_per_execution(469, two_cpu_strategy)


def test_trainer_runs_on_tfrecords_under_mirrored_strategy(
    imagenet_dir, two_cpu_strategy, tmp_path
):
    config = cli.parse_flags(
        ["--strategy=mirrored", f"--data_dir={imagenet_dir}", f"--model_dir={tmp_path}",
         "--algo=wm", f"--image_size={IMAGE_SIZE}", f"--num_classes={NUM_CLASSES}",
         f"--batch_size={BATCH}", "--epochs=1", "--steps_per_epoch=3",
         f"--train_examples={N_TRAIN}", f"--eval_examples={N_VALIDATION}",
         "--mirror_warmup_steps=2", "--mirror_batch_size=8", "--verbose=0"]
    )
    # A small network keeps this fast; a ResNet-18 trains on these files in the test above.
    config = dataclasses.replace(config, model=ModelConfig(name="cnn"))
    model, history = training.train(config, strategy=two_cpu_strategy)
    logs = {k: v[-1] for k, v in history.history.items()}
    for key in ("loss", "accuracy", "top5_accuracy", "val_loss", "val_accuracy",
                "val_top5_accuracy"):
        assert np.isfinite(logs[key]), key
    # The 20 validation images come in batches of 8 padded to full size; the padding must not
    # count: evaluation equals top-1/top-5 computed by hand over the 20 images.
    _, evaluation = pipelines.imagenet_datasets(
        imagenet_dir, BATCH, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES
    )
    measured = model.evaluate(evaluation, return_dict=True, verbose=0)
    images, labels = zip(*datasets.imagenet(
        imagenet_dir, "validation", None, image_size=IMAGE_SIZE, training=False
    ).as_numpy_iterator())
    logits = model.predict(np.stack(images), verbose=0)
    ranks = np.argsort(-logits, axis=1)
    assert len(labels) == 20
    assert measured["accuracy"] == pytest.approx(100 * np.mean(ranks[:, 0] == labels), abs=1e-4)
    assert measured["top5_accuracy"] == pytest.approx(
        100 * np.mean([label in row[:5] for label, row in zip(labels, ranks)]), abs=1e-4
    )
    for layer in layers_lib.feedback_layers(model):
        if not layer.feedback_used:  # the first convolution: no gradient uses its B
            assert layer.name == "conv_1" and layer.feedback_kernel is None
            assert f"weight_angle/{layer.name}" not in logs
            continue
        assert f"weight_angle/{layer.name}" in logs
        first, second = _local(layer.feedback_kernel, two_cpu_strategy)
        np.testing.assert_array_equal(first, second)
    assert os.path.exists(tmp_path / "backup" / "epoch-0001.weights.h5")
    assert os.path.exists(tmp_path / "backup" / "manifest.json")
    with open(tmp_path / "history.csv") as f:
        header = f.readline()
    assert "val_top5_accuracy" in header and "weight_angle/classifier" in header
    # TensorBoard (a dependency in setup.py) gets the angles and the learning rate too.
    (events,) = (tmp_path / "tensorboard" / "train").iterdir()
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events)) for v in e.summary.value}
    assert {"epoch_weight_angle/classifier", "epoch_norm_ratio/conv_2", "epoch_learning_rate",
            "epoch_top5_accuracy"} <= tags


def _feedback_kernels(model):
    """`{layer_name: B}` of every stored feedback kernel of `model`."""
    return {layer.name: layer.feedback_kernel.numpy()
            for layer in layers_lib.feedback_layers(model) if layer.feedback_kernel is not None}


class _Preempt(keras.callbacks.Callback):
    """Copies the run's directory as it is when epoch `epoch` begins: what a preempted job
    leaves behind (the backup is written at the end of every epoch)."""

    def __init__(self, source, target, epoch):
        super().__init__()
        self.source, self.target, self.epoch = source, target, epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            shutil.copytree(self.source, self.target)


@pytest.mark.parametrize("algo", ["kp", "wm"])
def test_resumed_run_continues_exactly(algo, tmp_path):
    run, preempted = str(tmp_path / "run"), str(tmp_path / "preempted")
    config = cli.parse_flags(
        ["--strategy=default", "--use_synthetic_data", f"--model_dir={run}", f"--algo={algo}",
         "--image_size=12", "--num_classes=4", "--batch_size=8", "--epochs=2",
         "--steps_per_epoch=3", "--eval_steps=0", "--lr_per_256=0.32", "--warmup_epochs=1",
         "--weight_decay=0.01", "--mirror_warmup_steps=2", "--mirror_batch_size=32",
         "--mirror_learning_rate=0.3", "--verbose=0",
         # Random images and labels at this rate: the loss explodes in epoch 2 (wm: 10.7, over
         # 2 × ln 4), which does not matter to resuming exactly.
         "--no-divergence_check"]
    )
    config = dataclasses.replace(config, model=ModelConfig(name="cnn"))
    assert strategies.jit_compile_for(config.strategy)  # the whole step under XLA
    uninterrupted, _ = training.train(config, callbacks=[_Preempt(run, preempted, epoch=1)])
    resumed, history = training.train(dataclasses.replace(config, model_dir=preempted))

    assert history.epoch == [1]  # only the second epoch ran again
    assert int(resumed.optimizer.iterations.numpy()) == 6
    for a, b in zip(uninterrupted.weights, resumed.weights):  # W, B, batch-norm statistics
        assert a.path == b.path
        assert np.all(np.isfinite(a.numpy())), a.path
        assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(uninterrupted.optimizer.variables, resumed.optimizer.variables):
        assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)
    feedback = _feedback_kernels(resumed)
    assert feedback
    initial = _feedback_kernels(training.build_model(config, (12, 12, 3)))
    for name, value in feedback.items():  # B learned, so restoring it mattered
        assert np.abs(value - initial[name]).max() > 1e-4, name


@pytest.mark.parametrize("flag", ["--lr_per_256=nan", "--lr_per_256=-1", "--steps_per_epoch=0",
                                  "--eval_steps=-1", "--batch_size=0", "--momentum=1",
                                  "--mirror_noise_std=0", "--num_classes=1"])
def test_imagenet_flags_out_of_range_are_refused(flag):
    with pytest.raises(SystemExit) as info:
        cli.parse_flags(["--use_synthetic_data", flag])
    assert info.value.code == 2


def test_augmented_imagenet_stream_is_the_same_in_every_run(imagenet_dir):
    def first_batches():
        ds = datasets.imagenet(imagenet_dir, "train", 4, image_size=IMAGE_SIZE, training=True,
                               seed=5).repeat()
        return [x.numpy() for x, _ in ds.take(6)]

    a, b = first_batches(), first_batches()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], a[1])


# One rule per way of getting B (none, fixed, per-step state, mirror, optimizer, local loss,
# direct feedback): ss, frsf and ia share theirs with a rule listed.
@pytest.mark.parametrize("algo", ["bp", "fa", "brsf", "wm", "kp", "sa", "dfa"])
def test_two_runs_on_tfrecords_are_bit_identical(imagenet_dir, tmp_path, algo):
    """A fixed --seed makes the ImageNet trainer reproducible on CPU (XLA): file and example
    order, augmentation, weights, B and the mirror noise."""
    config = TrainConfig(
        data=_imagenet_data(imagenet_dir, steps_per_epoch=4), model=ModelConfig(name="cnn"),
        algo=algo, epochs=1, eval_steps=0,
        optimizer=OptimizerConfig(learning_rate=0.1, warmup_epochs=0, l2=0.01),
        mirror=dataclasses.replace(RECIPE_MIRROR, warmup_steps=2, batch_size=8),
        alignment="none", verbose=0, seed=3,
    )
    first, _ = training.train(config)
    second, _ = training.train(config)
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(first.optimizer.variables, second.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mirror_flags_without_the_weight_mirror_are_named():
    assert cli.ignored_flags(cli.parse_flags(
        ["--use_synthetic_data", "--algo=kp", "--mirror_decay=0.5", "--mirror_every=2"])) == [
        "mirror_decay", "mirror_every"]
    assert cli.ignored_flags(cli.parse_flags(
        ["--use_synthetic_data", "--algo=wm", "--mirror_decay=0.5"])) == []


@pytest.mark.parametrize("algo", ["kp", "wm"])
def test_resumed_run_on_tfrecords_continues_exactly(imagenet_dir, tmp_path, algo):
    """Every epoch's batches depend on (seed, epoch) alone, so a run preempted after epoch 1 and
    resumed on real TFRecords ends bit for bit where the uninterrupted run ends."""
    run, preempted = str(tmp_path / "run"), str(tmp_path / "preempted")
    config = TrainConfig(
        data=_imagenet_data(imagenet_dir, steps_per_epoch=3), model=ModelConfig(name="cnn"),
        algo=algo, model_dir=run, epochs=2, eval_steps=0,
        optimizer=OptimizerConfig(learning_rate=0.1, warmup_epochs=0.5, l2=0.01),
        mirror=dataclasses.replace(RECIPE_MIRROR, warmup_steps=2, batch_size=8),
        alignment="none", verbose=0, seed=0,  # 0: the global seed too
        divergence_check=False,  # the loss explodes in epoch 2 (to ~1e13): not what is tested
    )
    uninterrupted, _ = training.train(config, callbacks=[_Preempt(run, preempted, epoch=1)])
    resumed, history = training.train(dataclasses.replace(config, model_dir=preempted))
    assert history.epoch == [1]
    for a, b in zip(uninterrupted.weights, resumed.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(uninterrupted.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
