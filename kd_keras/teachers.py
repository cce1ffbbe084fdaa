"""Teachers: cached teacher logits."""

import numpy as np
import keras
import tensorflow as tf

from kd_keras import _checks
from kd_keras import _datasets
from kd_keras.distiller import INPUTS_KEY
from kd_keras.distiller import TEACHER_LOGITS_KEY


def _as_dataset(data, batch_size):
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, tuple) and 1 <= len(data) <= 3:
        if batch_size is None:
            raise ValueError(
                "`batch_size` is needed when the data are arrays. Received: "
                "batch_size=None. Pass e.g. batch_size=128."
            )
        return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)
    raise ValueError(
        "Expected a batched `tf.data.Dataset` of (x, y) or (x, y, "
        "sample_weight), or a tuple of arrays (x, y) with `batch_size`. "
        f"Received: {type(data).__name__}"
    )


def _check_no_augmentation(dataset):
    random_ops = _datasets.augmentation_ops(dataset)
    if random_ops:
        raise ValueError(
            "The dataset applies random ops "
            f"({', '.join(random_ops)}), such as a random augmentation. Cached "
            "logits would freeze one random draw per example for every epoch. "
            "Cache the dataset before its augmentation, or let the Distiller "
            "run the teacher on the fly on the augmented data. Pass "
            "`allow_random=True` to cache one augmented pass anyway."
        )


def _one_pass(teacher, dataset):
    """Runs the teacher over one pass of the dataset.

    Returns the batches' inputs, labels and sample weights, each concatenated
    (as NumPy, in the dataset's structure), the teacher's float32 logits and
    the first batch's size. Everything comes from the same pass, so logits and
    inputs always belong together, even if the dataset shuffles.
    """
    infer = tf.function(
        lambda x: tf.cast(teacher(x, training=False), tf.float32),
        reduce_retracing=True,
    )
    parts, logits = [], []
    for element in dataset:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(element)
        logits.append(infer(x).numpy())
        parts.append(keras.tree.map_structure(
            lambda t: None if t is None else np.asarray(t),
            (x, y, sample_weight),
        ))
    if not logits:
        raise ValueError("The dataset is empty: there is nothing to cache.")
    x, y, sample_weight = keras.tree.map_structure(
        lambda *batches: None if batches[0] is None else np.concatenate(batches),
        *parts,
    )
    return x, y, sample_weight, np.concatenate(logits), len(logits[0])


def cache_teacher_logits(
    teacher,
    dataset,
    *,
    batch_size=None,
    shuffle=True,
    seed=None,
    allow_random=False,
):
    """Runs the teacher once and returns a dataset that carries its logits.

    `Distiller.fit` recognises the batches of the returned dataset and skips
    the teacher, so an epoch costs about as much as training the student
    alone. The teacher runs once over the dataset, batch by batch, in
    inference mode. The inputs, labels and logits of that pass are kept in
    memory, together, and served from there every epoch, reshuffled.

    A random augmentation in the pipeline cannot be cached: every epoch would
    see the same augmented inputs. Such a dataset is refused (a `shuffle` is
    fine). To train on augmented data, run the teacher on the fly.

    Args:
        teacher: the trained teacher, a `keras.Model` emitting logits, or an
            `EnsembleTeacher`.
        dataset: a batched `tf.data.Dataset` of `(x, y)` or
            `(x, y, sample_weight)`, or a tuple of arrays `(x, y)` with
            `batch_size`.
        batch_size: batch size of the returned dataset. Defaults to the
            input's.
        shuffle: reshuffle the examples every epoch.
        seed: seed of that shuffle.
        allow_random: set True to cache a pipeline with random ops anyway;
            each example then keeps the first pass's augmentation for ever.

    Returns:
        A `tf.data.Dataset` of `({"inputs": x, "teacher_logits": t}, y)` (with
        sample weights if the input had them) that `Distiller.fit` and
        `Distiller.evaluate` accept.

    Example:

    ```python
    train = kd_keras.data.load("mnist", "train", batch_size=128)
    cached = kd_keras.cache_teacher_logits(teacher, train)
    distiller.fit(cached, epochs=10)
    ```
    """
    _checks.check_keras_model(teacher, "teacher")
    _checks.check_emits_logits(teacher, "teacher")
    dataset = _as_dataset(dataset, batch_size)
    if not allow_random:
        _check_no_augmentation(dataset)
    x, y, sample_weight, logits, first_batch_size = _one_pass(teacher, dataset)
    batch_size = batch_size or first_batch_size
    inputs = {INPUTS_KEY: x, TEACHER_LOGITS_KEY: logits}
    tensors = keras.tree.map_structure(
        lambda a: None if a is None else tf.constant(a),
        (inputs, y, sample_weight),
    )

    def gather(indices):
        x, y, sample_weight = keras.tree.map_structure(
            lambda t: None if t is None else tf.gather(t, indices), tensors
        )
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    indices = tf.data.Dataset.range(len(logits))
    if shuffle:
        indices = indices.shuffle(len(logits), seed=seed)
    return (
        indices.batch(batch_size)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
