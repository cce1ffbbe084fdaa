"""One-call training, distillation and evaluation.

`train` fits a model on the labels and `distill` fits a student on a
teacher, each resumable from a backup folder; `test_accuracy` and friends
score a model on a batched dataset.
"""

import dataclasses
import os
import time

from absl import logging
import keras
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _fingerprints
from kd_keras import _io
from kd_keras import data
from kd_keras import teachers
from kd_keras.callbacks import StudentEarlyStop
from kd_keras.distiller import Distiller


def label_loss():
    """Sparse categorical cross-entropy on logits."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def new_optimizer(optimizer=None, learning_rate=1e-3):
    """A new optimizer for one training: a copy of `optimizer` (an instance
    or its config), or the one it names (e.g. "sgd", Adam when None) with
    `learning_rate`.

    An optimizer holds per-model state, so each training gets its own copy.
    """
    if optimizer is None or isinstance(optimizer, str):
        return keras.optimizers.get(
            {
                "class_name": optimizer or "adam",
                "config": {"learning_rate": learning_rate},
            }
        )
    if isinstance(optimizer, keras.optimizers.Optimizer):
        optimizer = keras.optimizers.serialize(optimizer)
    return keras.optimizers.get(optimizer)


def optimizer_config(optimizer=None, learning_rate=1e-3):
    """What an optimizer argument means, as JSON (for fingerprints), without
    the name Keras numbers anew for every optimizer ("adam_1", ...)."""
    config = keras.optimizers.serialize(new_optimizer(optimizer, learning_rate))
    config["config"].pop("name", None)
    return config


as_batches = data.as_batches


def train(
    model,
    train_data,
    validation_data=None,
    *,
    epochs=10,
    optimizer=None,
    learning_rate=1e-3,
    batch_size=None,
    callbacks=(),
    backup_dir=None,
    verbose=1,
):
    """Trains a logits classifier on the labels.

    Args:
        model: a `keras.Model` emitting logits.
        train_data: a batched `tf.data.Dataset` or `PyDataset` of `(x, y)`,
            or arrays `(x, y)` (batched by `batch_size`).
        validation_data: optional data of the same kinds.
        epochs: epochs to train.
        optimizer: a Keras optimizer (copied) or its config, or the name of
            one (Adam by default) to use with `learning_rate`.
        learning_rate: the learning rate of an optimizer given by name.
        batch_size: batch size for arrays.
        callbacks: extra Keras callbacks.
        backup_dir: if set, a `keras.callbacks.BackupAndRestore` folder, so
            that an interrupted run resumes when called again with the same
            model, data and settings (other settings start afresh).
        verbose: Keras verbosity.

    Returns:
        The `keras.callbacks.History`.
    """
    train_data = as_batches(train_data, batch_size)
    validation_data = _optional_batches(validation_data, batch_size)
    model.compile(
        new_optimizer(optimizer, learning_rate), label_loss(), metrics=["accuracy"]
    )
    run = {}
    if backup_dir:  # What else a resumed run must share.
        run = {
            # The architecture, not the initial weights, which the backup
            # replaces: a model rebuilt unseeded in a new process resumes.
            "train": _fingerprints.architecture(model),
            "data": _datasets.fingerprint(train_data),
        }
    return _fit(model, train_data, validation_data, run, _FitOptions.of(locals()))


@dataclasses.dataclass
class _FitOptions:
    """The arguments of `train` and `distill` that their fit shares."""

    epochs: int
    optimizer: object
    learning_rate: float
    callbacks: tuple
    backup_dir: object
    verbose: int

    @classmethod
    def of(cls, arguments):
        """The options among a function's arguments (its `locals()`)."""
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})


def _fit(model, train_data, validation_data, run, options):
    """`model.fit`, resumable from `options.backup_dir` when the run
    (`run`, the epochs and the optimizer) is the one that left it."""
    callbacks = list(options.callbacks or ())
    if options.backup_dir:
        # Rerunning the same call after an interruption resumes from the
        # last finished epoch; other settings start afresh.
        optimizer = optimizer_config(options.optimizer, options.learning_rate)
        stamp = {**run, "epochs": options.epochs, "optimizer": optimizer}
        _io.start_or_resume(options.backup_dir, stamp)
        backup = keras.callbacks.BackupAndRestore(os.fspath(options.backup_dir))
        callbacks.append(backup)
    return model.fit(
        train_data,
        validation_data=validation_data,
        epochs=options.epochs,
        callbacks=callbacks,
        # Keras would only warn that it cannot shuffle a tf.data pipeline;
        # it does shuffle the batch order of a PyDataset.
        shuffle=not _backend.is_tf_dataset(train_data),
        verbose=options.verbose,
    )


def _optional_batches(data, batch_size):
    """Validation data: batches in a fixed order."""
    return None if data is None else as_batches(data, batch_size, shuffle=False)


def should_cache(train_data):
    """Whether `distill(cache="auto")` caches the teacher's logits: unless
    the pipeline has random or opaque stages, whose outputs may change from
    one epoch to the next. Logs why when it does not."""
    random_ops = _datasets.augmentation_ops(train_data)
    if random_ops:
        logging.info(
            "Not caching the teacher's logits: the data pipeline "
            "has random or opaque stages (%s), so the teacher runs "
            "at every step.",
            ", ".join(random_ops),
        )
    return not random_ops


def distill(
    teacher,
    student,
    train_data,
    validation_data=None,
    *,
    temperature=4.0,
    distillation_weight=0.9,
    epochs=10,
    optimizer=None,
    learning_rate=1e-3,
    batch_size=None,
    cache="auto",
    seed=None,
    callbacks=(),
    backup_dir=None,
    verbose=1,
):
    """Distils the teacher into the student and returns `(distiller, history)`.

    Args:
        teacher: the trained teacher, emitting logits.
        student: the student, emitting logits; trained in place.
        train_data: the transfer set: a batched `tf.data.Dataset` or
            `PyDataset` of `(x, y)`, or arrays `(x, y)`.
        validation_data: optional data of the same kinds.
        temperature: the distillation temperature T.
        distillation_weight: the weight λ of the distillation term.
        epochs: epochs to train.
        optimizer: a Keras optimizer (copied) or its config, or the name of
            one (Adam by default) to use with `learning_rate`.
        learning_rate: the learning rate of an optimizer given by name.
        batch_size: batch size for arrays.
        cache: True to cache the teacher's logits once, False to run the
            teacher at every step, "auto" to cache unless the transfer set has
            random or opaque stages (see `should_cache`).
        seed: seed of the cached logits' shuffle.
        callbacks: extra Keras callbacks (e.g. `StudentEarlyStop`, which then
            records its switch in `backup_dir` too).
        backup_dir: if set, a `BackupAndRestore` folder, so that an
            interrupted run resumes when called again with the same teacher,
            student, data and settings (other settings start afresh).
        verbose: Keras verbosity.

    Returns:
        `(distiller, history)`; `distiller.student` is the trained student.
    """
    train_data = as_batches(train_data, batch_size)
    validation_data = _optional_batches(validation_data, batch_size)
    if cache == "auto":
        cache = should_cache(train_data)
    distiller = Distiller(
        teacher,
        student,
        temperature=temperature,
        distillation_weight=distillation_weight,
    )
    distiller.compile(new_optimizer(optimizer, learning_rate), metrics=["accuracy"])
    fingerprint = None
    if cache and backup_dir:  # The data's fingerprint from the caching pass.
        train_data, fingerprint = teachers.cache_and_fingerprint(
            teacher, train_data, seed=seed
        )
    elif cache:
        train_data = teachers.cache_teacher_logits(teacher, train_data, seed=seed)
    elif backup_dir:
        fingerprint = _datasets.fingerprint(train_data)
    run = {}
    if backup_dir:  # What else a resumed run must share.
        run = {
            "teacher": _fingerprints.weights(teacher),
            "student": _fingerprints.architecture(student),
            "temperature": temperature,
            "distillation_weight": distillation_weight,
            "cache": bool(cache),
            "seed": seed,
            "data": fingerprint,  # Of the data, before the logits.
            "early stops": [
                callback.settings()
                for callback in callbacks or ()
                if isinstance(callback, StudentEarlyStop)
            ],
        }
    # A StudentEarlyStop records its switch beside the backup, for this call.
    recorders = [
        callback
        for callback in callbacks or ()
        if getattr(callback, "state_dir", "") is None and backup_dir
    ]
    for callback in recorders:
        callback.state_dir = backup_dir
    try:
        options = _FitOptions.of(locals())
        history = _fit(distiller, train_data, validation_data, run, options)
    finally:
        for callback in recorders:
            callback.state_dir = None
    return distiller, history


def predicted_classes(logits):
    """Class ids from logits `(..., classes)`; one logit is a binary
    classifier, positive where the logit is above 0."""
    logits = np.asarray(logits)
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).astype("int64")
    return np.argmax(logits, axis=-1)


def class_ids(labels, logits):
    """Labels as class ids: one-hot labels (the logits' shape, more than one
    class) become their arg max."""
    labels = np.asarray(labels)
    if _checks.is_one_hot(labels.shape, np.shape(logits)):
        return np.argmax(labels, axis=-1)
    return labels


def logits_and_labels(model, dataset):
    """The model's logits over a batched dataset (or arrays `(x, y)`), and
    its labels as class ids (one-hot labels become their arg max), in the
    dataset's order."""
    outputs, labels = [], []
    for x, y, _ in _datasets.numpy_batches(as_batches(dataset, shuffle=False)):
        logits = np.asarray(model.predict_on_batch(x))
        outputs.append(logits)
        labels.append(class_ids(y, logits))
    return np.concatenate(outputs), np.concatenate(labels)


def predictions(model, dataset):
    """Returns `(predicted class ids, true class ids)` over a batched
    dataset, flattened; labels may be class ids or one-hot."""
    logits, labels = logits_and_labels(model, dataset)
    return predicted_classes(logits).reshape(-1), labels.reshape(-1)


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
