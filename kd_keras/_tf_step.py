"""The Distiller's training step on TensorFlow, and its workarounds for
several workers.

Keras' TensorFlow step runs the whole forward pass under the gradient
tape; this one runs the teacher outside it, so that the tape never holds
the teacher's activations. The teacher's outputs then reach
`compute_loss` as cached logits, so the loss (and any override of
`compute_loss`) is the one other backends use.

Keras 3 on TensorFlow fails under several workers
(`MultiWorkerMirroredStrategy`) in two places: it builds the model from the
mean of a distributed batch, which an eager collective cannot take (see
`_keras_internals.SymbolicBuildFromFirstReplica`), and it reduces scalar
logs along axis 0. `per_worker` gives each log a leading axis of one, whose
mean over workers is the value Keras expects.
"""

import warnings

import keras
from keras import ops

from kd_keras import _backend
from kd_keras import _datasets
from kd_keras import _keras_internals


def train_step(model, data, teacher_outputs, step):
    """One training step of `model` on `data`.

    Args:
        model: the Distiller.
        data: the batch, `(x, y, sample_weight)` packed as Keras packs it.
        teacher_outputs: `(inputs, cached logits, cached features, student
            logits) -> (logits, features)`, the teacher's outputs, run
            outside the tape.
        step: the step's record, which takes the teacher's features.

    Returns:
        The logs of `model.compute_metrics`.
    """
    import tensorflow as tf

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        with tape.stop_recording():
            x = _with_teacher_outputs(x, y_pred, teacher_outputs, step)
        loss = _keras_internals.compute_loss(
            model, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        _keras_internals.loss_tracker(model).update_state(
            loss * _backend.num_replicas(), sample_weight=tf.shape(y_pred)[0]
        )
        loss = model.optimizer.scale_loss(loss)
    variables = model.trainable_weights
    if variables:
        gradients = tape.gradient(loss, variables)
        model.optimizer.apply_gradients(zip(gradients, variables, strict=True))
    else:
        warnings.warn("The student has no trainable weights.", stacklevel=2)
    return model.compute_metrics(x, y, y_pred, sample_weight)


def _with_teacher_outputs(x, y_pred, teacher_outputs, step):
    """`x` in the cached form, with the teacher's logits; its features go to
    the step's record."""
    inputs, cached = _datasets.split_cached(x)
    logits, step.teacher_features = teacher_outputs(inputs, cached, None, y_pred)
    return {_datasets.INPUTS_KEY: inputs, _datasets.TEACHER_LOGITS_KEY: logits}


def per_worker(strategy, logs):
    """The logs, each with a leading axis of one under several workers."""
    if not _keras_internals.in_multi_worker_mode(strategy):
        return logs
    return keras.tree.map_structure(lambda v: ops.expand_dims(v, 0), logs)
