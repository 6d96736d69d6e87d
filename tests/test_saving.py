"""Nothing is lost: feedback kernels and optimizer state survive save/load and checkpoints."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_wt
from keras_wt import layers as wt
from keras_wt.callbacks import MirrorCallback
from keras_wt.optimizers import KolenPollack

X = np.random.RandomState(0).randn(64, 6, 6, 1).astype("float32")
Y = np.random.RandomState(1).randint(0, 3, 64)


def _model(feedback):
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            wt.Conv2D(4, 3, activation="relu", feedback=feedback),
            keras.layers.Flatten(),
            wt.Dense(3, feedback=feedback),
        ]
    )


def _compiled(feedback):
    model = _model(feedback)
    inner = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer = KolenPollack(inner, weight_decay=0.1) if feedback == "kp" else inner
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _callbacks(feedback):
    if feedback == "wm":
        return [MirrorCallback(learning_rate=0.05, noise_std=0.5, decay=0.1, batch_size=8, warmup_steps=2)]
    return []


@pytest.mark.parametrize("feedback", keras_wt.ALGORITHMS)
def test_keras_file_round_trip_keeps_b_bit_for_bit(feedback, tmp_path):
    model = _compiled(feedback)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=_callbacks(feedback))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert [l.feedback for l in wt.feedback_layers(loaded)] == [feedback] * 2
    assert len(model.weights) == len(loaded.weights)
    for a, b in zip(model.weights, loaded.weights):
        assert a.path.split("/")[-1] == b.path.split("/")[-1]
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model.predict(X, verbose=0), loaded.predict(X, verbose=0))


@pytest.mark.parametrize("feedback", ["fa", "wm", "kp"])
def test_tf_checkpoint_restores_b_and_optimizer(feedback, tmp_path):
    model = _compiled(feedback)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=_callbacks(feedback))
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    fresh = _compiled(feedback)
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path).assert_existing_objects_matched()
    for a, b in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError("preempted")


@pytest.mark.parametrize("feedback", ["wm", "kp"])
def test_backup_and_restore_resume_continues_exactly(feedback, tmp_path):
    def run(backup_dir, interrupt_at=None):
        keras.utils.set_random_seed(7)
        model = _compiled(feedback)
        callbacks = _callbacks(feedback) + [keras.callbacks.BackupAndRestore(str(backup_dir))]
        if interrupt_at is not None:
            callbacks.append(_Interrupt(interrupt_at))
        model.fit(X, Y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        return model

    straight = run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="preempted"):
        run(tmp_path / "resumed", interrupt_at=2)
    resumed = run(tmp_path / "resumed")
    assert int(resumed.optimizer.iterations.numpy()) == int(straight.optimizer.iterations.numpy()) == 12
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_trainer_models_load_after_import_keras_wt_alone(tmp_path):
    """What keras.saving needs to load a model keras_wt's trainer saved (its accuracy metric and
    learning-rate schedule) is registered by `import keras_wt`, in a fresh interpreter."""
    import subprocess
    import sys

    from keras_wt import metrics, schedules

    model = _model("kp")
    model.compile(KolenPollack(keras.optimizers.SGD(schedules.WarmupSchedule(0.1, 2, "cosine",
                                                                              total_steps=8))),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[metrics.accuracy, metrics.top5_accuracy])
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    code = ("import keras, keras_wt; m = keras.saving.load_model(%r); "
            "print(type(m.optimizer).__name__, m.compiled_metrics is not None)" % str(tmp_path / "m.keras"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "KolenPollack" in out.stdout
