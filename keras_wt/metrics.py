"""Accuracy in percent, the one unit a person reads it in: progress bar, logs, `results.json`.

Both metrics take integer class labels (`(batch,)` or `(batch, 1)`) or one-hot/soft targets of
the predictions' shape, and class scores (logits or probabilities) as predictions.
"""

import keras

ops = keras.ops


def _class_labels(y_true, y_pred):
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == y_pred.shape[-1] != 1:
        return ops.argmax(y_true, axis=-1)
    return ops.cast(ops.reshape(y_true, [-1]), "int32")


@keras.saving.register_keras_serializable(package="keras_wt")
def accuracy(y_true, y_pred):
    """Top-1 accuracy in percent (100 where the highest score is the label's, else 0)."""
    labels = ops.cast(_class_labels(y_true, y_pred), "int32")
    predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
    return 100.0 * ops.cast(ops.equal(predicted, labels), "float32")


@keras.saving.register_keras_serializable(package="keras_wt")
def top5_accuracy(y_true, y_pred):
    """Top-5 accuracy in percent."""
    labels = ops.cast(_class_labels(y_true, y_pred), "int32")
    return 100.0 * ops.cast(ops.in_top_k(labels, ops.cast(y_pred, "float32"), 5), "float32")
