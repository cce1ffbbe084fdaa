"""Metrics read on logits."""

import keras


@keras.saving.register_keras_serializable(package="kd_keras")
def logit_accuracy(y_true, y_pred):
    """Accuracy of logits, per example: one logit is positive above 0;
    otherwise the arg max is compared with class ids or one-hot labels."""
    if y_pred.shape[-1] == 1:
        return keras.metrics.binary_accuracy(y_true, y_pred, threshold=0.0)
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] != 1:
        return keras.metrics.categorical_accuracy(y_true, y_pred)
    return keras.metrics.sparse_categorical_accuracy(y_true, y_pred)


def with_logit_accuracy(metrics):
    """ "accuracy" (or "acc") as `logit_accuracy`, in lists and dicts.

    Keras would resolve it by the output's shape, and for one output to
    `BinaryAccuracy(threshold=0.5)`, which expects a probability.
    """
    if isinstance(metrics, dict):
        return {key: with_logit_accuracy(value) for key, value in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return [with_logit_accuracy(m) for m in metrics]
    if isinstance(metrics, str) and metrics.lower() in ("accuracy", "acc"):
        return keras.metrics.MeanMetricWrapper(logit_accuracy, name=metrics)
    return metrics
