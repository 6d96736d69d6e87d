"""One worker process of tests/test_multiworker.py (not a test module).

Reads the cluster from TF_CONFIG, creates the trainer's MultiWorkerMirroredStrategy and, for
`kp` and `wm`, trains a small keras_wt MLP for a few steps with the trainer's optimizer and
callbacks on data of its own (each worker draws different examples, so only a correct
all-reduce keeps the replicas equal). Writes `<out_dir>/<algo>-<task>.npz` with every kernel
`W` and feedback kernel `B` before (`W0/...`, `B0/...`) and after (`W/...`, `B/...`) training.

Usage: TF_CONFIG=... python tests/multiworker_worker.py OUT_DIR
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_wt import layers as layers_lib  # noqa: E402
from keras_wt import models  # noqa: E402
from keras_wt import schedules  # noqa: E402
from keras_wt.app import strategies  # noqa: E402
from keras_wt.app import callbacks as run_callbacks  # noqa: E402
from keras_wt.app.config import RECIPE_MIRROR, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from keras_wt._compat import multi_worker_fit  # noqa: E402

BATCH_SIZE = 8  # global: 4 per worker
STEPS = 3
LEARNING_RATE = 0.1
WEIGHT_DECAY = 0.01  # decoupled: 0.01 / (1 - 0.9) = 0.1


def snapshot(model, suffix=""):
    """`{"W<suffix>/<layer>": W, "B<suffix>/<layer>": B}` of every feedback layer."""
    arrays = {}
    for layer in layers_lib.feedback_layers(model):
        arrays[f"W{suffix}/{layer.name}"] = layer.kernel.numpy()
        if layer.feedback_kernel is not None:
            arrays[f"B{suffix}/{layer.name}"] = layer.feedback_kernel.numpy()
    return arrays


def main(out_dir):
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = strategies.create_strategy("multiworker")
    rng = np.random.default_rng(100 + task)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 4, size=64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(BATCH_SIZE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    data = data.with_options(options)
    for algo in ("kp", "wm"):
        keras.utils.set_random_seed(0)
        config = TrainConfig(
            data=DataConfig(use_synthetic_data=True, batch_size=BATCH_SIZE),
            model=ModelConfig(name="mlp"),
            algo=algo,
            model_dir=os.path.join(out_dir, f"run-{algo}"),
            strategy="multiworker",
            mirror=dataclasses.replace(RECIPE_MIRROR, learning_rate=0.2, batch_size=8,
                                       warmup_steps=1),
        )
        with strategy.scope():
            model = models.mlp(
                input_shape=(6,), hidden=(16,), num_classes=4, feedback=algo,
                activation="relu", output_activation=None, initializer="he_normal", seed=1,
            )
            model.compile(
                optimizer=schedules.create_optimizer(
                    algo, LEARNING_RATE, momentum=0.9, weight_decay=WEIGHT_DECAY
                ),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=False,
            )
        before = snapshot(model, suffix="0")
        with multi_worker_fit(model):
            model.fit(
                data,
                epochs=1,
                steps_per_epoch=STEPS,
                callbacks=run_callbacks.create_callbacks(model, config, strategy),
                shuffle=False,
                verbose=0,
            )
        arrays = dict(before, **snapshot(model))
        arrays["iterations"] = np.asarray(int(model.optimizer.iterations.numpy()))
        np.savez(os.path.join(out_dir, f"{algo}-{task}.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
