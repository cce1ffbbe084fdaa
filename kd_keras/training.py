"""One-call training, distillation and evaluation, as the CLI runs them."""

import os
import time

import numpy as np
import keras

from kd_keras import _datasets
from kd_keras.distiller import Distiller
from kd_keras.teachers import cache_teacher_logits


def label_loss():
    """Sparse categorical cross-entropy on logits."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _callbacks(callbacks, backup_dir):
    callbacks = list(callbacks or ())
    if backup_dir:
        # Rerunning the same command after an interruption resumes from the
        # last finished epoch.
        callbacks.append(
            keras.callbacks.BackupAndRestore(os.fspath(backup_dir))
        )
    return callbacks


def train(
    model,
    train_data,
    validation_data=None,
    *,
    epochs=10,
    learning_rate=1e-3,
    callbacks=(),
    backup_dir=None,
    verbose=1,
):
    """Trains a logits classifier on the labels with Adam.

    Args:
        model: a `keras.Model` emitting logits.
        train_data: a batched dataset of `(x, y)`.
        validation_data: optional batched dataset of `(x, y)`.
        epochs: epochs to train.
        learning_rate: Adam's learning rate.
        callbacks: extra Keras callbacks.
        backup_dir: if set, a `keras.callbacks.BackupAndRestore` folder, so an
            interrupted run resumes when called again.
        verbose: Keras verbosity.

    Returns:
        The `keras.callbacks.History`.
    """
    model.compile(
        keras.optimizers.Adam(learning_rate), label_loss(), metrics=["accuracy"]
    )
    return model.fit(
        train_data,
        validation_data=validation_data,
        epochs=epochs,
        callbacks=_callbacks(callbacks, backup_dir),
        verbose=verbose,
    )


def distill(
    teacher,
    student,
    train_data,
    validation_data=None,
    *,
    temperature=4.0,
    distillation_weight=0.9,
    epochs=10,
    learning_rate=1e-3,
    cache="auto",
    callbacks=(),
    backup_dir=None,
    verbose=1,
):
    """Distils the teacher into the student and returns `(distiller, history)`.

    Args:
        teacher: the trained teacher, emitting logits.
        student: the student, emitting logits; trained in place.
        train_data: the transfer set, a batched dataset of `(x, y)`.
        validation_data: optional batched dataset of `(x, y)`.
        temperature: the distillation temperature T.
        distillation_weight: the weight λ of the distillation term.
        epochs: epochs to train.
        learning_rate: Adam's learning rate.
        cache: True to cache the teacher's logits once, False to run the
            teacher at every step, "auto" to cache unless the transfer set has
            random augmentation.
        callbacks: extra Keras callbacks (e.g. `StudentEarlyStop`).
        backup_dir: if set, a `BackupAndRestore` folder for resuming.
        verbose: Keras verbosity.

    Returns:
        `(distiller, history)`; `distiller.student` is the trained student.
    """
    if cache == "auto":
        cache = not _datasets.augmentation_ops(train_data)
    distiller = Distiller(
        teacher,
        student,
        temperature=temperature,
        distillation_weight=distillation_weight,
    )
    distiller.compile(keras.optimizers.Adam(learning_rate), metrics=["accuracy"])
    if cache:
        train_data = cache_teacher_logits(teacher, train_data)
    history = distiller.fit(
        train_data,
        validation_data=validation_data,
        epochs=epochs,
        callbacks=_callbacks(callbacks, backup_dir),
        verbose=verbose,
    )
    return distiller, history


def predicted_classes(logits):
    """Class ids from logits `(..., classes)`; one logit is a binary
    classifier, positive where the logit is above 0."""
    logits = np.asarray(logits)
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).astype("int64")
    return np.argmax(logits, axis=-1)


def predictions(model, dataset):
    """Returns `(predicted class ids, true labels)` over a batched dataset."""
    predicted, labels = [], []
    for x, y, _ in _datasets.numpy_batches(dataset):
        logits = np.asarray(model.predict_on_batch(x))
        predicted.append(predicted_classes(logits).reshape(-1))
        labels.append(y.reshape(-1))
    return np.concatenate(predicted), np.concatenate(labels)


def test_errors(model, dataset):
    """Returns `(errors, examples)`: misclassified and total test examples."""
    predicted, labels = predictions(model, dataset)
    return int(np.sum(predicted != labels)), len(labels)


def test_accuracy(model, dataset):
    """Returns the fraction of a batched `(x, y)` dataset classified right."""
    errors, examples = test_errors(model, dataset)
    return 1.0 - errors / examples


class Stopwatch:
    """Times a block: `with Stopwatch() as watch: ...; watch.seconds`."""

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        return False
