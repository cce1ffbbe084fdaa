"""Teachers: cached teacher logits and ensembles."""

from absl import logging
import keras
from keras import ops
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _datasets
from kd_keras.data import ArrayBatches
from kd_keras.distiller import INPUTS_KEY
from kd_keras.distiller import TEACHER_LOGITS_KEY
from kd_keras.distiller import split_cached


def _check_no_augmentation(dataset):
    random_ops = _datasets.augmentation_ops(dataset)
    if random_ops:
        raise ValueError(
            "The dataset applies random or opaque ops "
            f"({', '.join(random_ops)}), such as a random augmentation, or "
            "Python code that may be one (tf.numpy_function, tf.py_function, "
            "from_generator). Cached logits would freeze one draw per example "
            "for every epoch. Cache the dataset before its augmentation, or "
            "let the Distiller run the teacher on the fly on the augmented "
            "data. If its Python stages are deterministic, pass "
            "`allow_random=True` to cache it anyway."
        )


def _one_pass(teacher, dataset, keep_data=True):
    """Runs the teacher over one pass of the dataset.

    Returns the batches' inputs, labels and sample weights, each concatenated
    (as NumPy, in the dataset's structure; None unless `keep_data`), the
    teacher's float32 logits and the first batch's size. Everything comes
    from the same pass, so logits and inputs always belong together, even if
    the dataset shuffles.
    """
    parts, logits = [], []
    for index, (x, y, sample_weight) in enumerate(_datasets.numpy_batches(dataset)):
        if not index:
            _checks.check_batched(x, teacher, "teacher", "dataset")
        for leaf in keras.tree.flatten(x):
            _checks.check_finite(leaf, f"inputs of batch {index + 1}")
        logits.append(np.asarray(teacher.predict_on_batch(x), "float32"))
        _checks.check_finite(logits[-1], f"teacher's logits on batch {index + 1}")
        if keep_data:
            parts.append((x, y, sample_weight))
    if not logits:
        raise ValueError("The dataset is empty: there is nothing to cache.")
    x = y = sample_weight = None
    if keep_data:
        x, y, sample_weight = keras.tree.map_structure(
            lambda *batches: None if batches[0] is None else np.concatenate(batches),
            *parts,
        )
    return x, y, sample_weight, np.concatenate(logits), len(logits[0])


def _tf_dataset(x, y, sample_weight, logits, batch_size, shuffle, seed):
    """A `tf.data.Dataset` serving the cached arrays, reshuffled each epoch."""
    import tensorflow as tf

    inputs = {INPUTS_KEY: x, TEACHER_LOGITS_KEY: logits}
    tensors = keras.tree.map_structure(
        lambda a: None if a is None else tf.constant(a), (inputs, y, sample_weight)
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


def cache_teacher_logits(
    teacher, dataset, *, batch_size=None, shuffle=True, seed=None, allow_random=False
):
    """Runs the teacher once and returns a dataset that carries its logits.

    `Distiller.fit` recognises the batches of the returned dataset and skips
    the teacher, so an epoch costs about as much as training the student
    alone. The teacher runs once over the dataset, batch by batch, in
    inference mode. The inputs, labels and logits of that pass are kept in
    memory, together, and served from there every epoch, reshuffled.

    A `tf.data.Dataset` gives a `tf.data.Dataset`. Arrays and `PyDataset`s
    give a `kd_keras.data.ArrayBatches`, which needs no TensorFlow and runs
    on every Keras backend.

    A random augmentation in the pipeline cannot be cached: every epoch would
    see the same augmented inputs. A `tf.data` pipeline with random ops is
    refused (a `shuffle` is fine); a `PyDataset` cannot be inspected, so make
    sure it does not augment. To train on augmented data, run the teacher on
    the fly.

    Args:
        teacher: the trained teacher, a `keras.Model` emitting logits, or an
            `EnsembleTeacher`.
        dataset: a batched `tf.data.Dataset` of `(x, y)` or
            `(x, y, sample_weight)`, a `PyDataset` such as
            `kd_keras.data.ArrayBatches`, or a tuple of arrays `(x, y)`.
        batch_size: batch size of the returned dataset. Defaults to the
            input's (128 for arrays).
        shuffle: reshuffle the examples every epoch.
        seed: seed of that shuffle.
        allow_random: set True to cache a pipeline with random ops anyway;
            each example then keeps the first pass's augmentation for ever.

    Returns:
        Batches of `({"inputs": x, "teacher_logits": t}, y)` (with sample
        weights if the input had them) that `Distiller.fit` and
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
    dataset = _datasets.as_batches(dataset, batch_size, shuffle=False)
    if not allow_random:
        _check_no_augmentation(dataset)
    if isinstance(dataset, ArrayBatches):
        # The arrays are served as they are, without a copy: the teacher
        # runs over them in order.
        x, y, sample_weight = dataset.x, dataset.y, dataset.sample_weight
        in_order = dataset.with_arrays(x, y, sample_weight, shuffle=False)
        _, _, _, logits, first_batch_size = _one_pass(
            teacher, in_order, keep_data=False
        )
    else:
        x, y, sample_weight, logits, first_batch_size = _one_pass(teacher, dataset)
    batch_size = batch_size or first_batch_size
    if _backend.is_tf_dataset(dataset):
        return _tf_dataset(x, y, sample_weight, logits, batch_size, shuffle, seed)
    inputs = {INPUTS_KEY: x, TEACHER_LOGITS_KEY: logits}
    return ArrayBatches(
        inputs, y, sample_weight, batch_size=batch_size, shuffle=shuffle, seed=seed
    )


def _element_inputs(dataset):
    if _backend.is_tf_dataset(dataset):
        spec = dataset.element_spec
        return spec[0] if isinstance(spec, tuple) else spec
    if isinstance(dataset, ArrayBatches):
        return dataset.x
    return None


def is_cached(dataset):
    """True if `dataset` comes from `cache_teacher_logits`."""
    inputs = _element_inputs(dataset)
    return split_cached(inputs)[1] is not None if inputs is not None else False


def without_teacher_logits(dataset):
    """The `(x, y[, sample_weight])` batches of a cached dataset."""
    if not is_cached(dataset):
        raise ValueError(
            "Expected batches made by `cache_teacher_logits`. Received: "
            f"{type(dataset).__name__}, which carries no teacher logits."
        )
    if isinstance(dataset, ArrayBatches):
        return dataset.with_arrays(
            dataset.x[INPUTS_KEY], dataset.y, dataset.sample_weight
        )
    import tensorflow as tf

    def strip(inputs, *rest):
        return (inputs[INPUTS_KEY], *rest)

    return dataset.map(strip, num_parallel_calls=tf.data.AUTOTUNE)


ENSEMBLE_MODES = ("logits", "probs")


@keras.saving.register_keras_serializable(package="kd_keras")
class EnsembleCombine(keras.layers.Layer):
    """Combines the logits of ensemble members into one set of logits.

    In `"logits"` mode it returns the weighted mean of the members' logits. In
    `"probs"` mode it returns the log of the weighted mean of their softmax
    probabilities (computed as a log-sum-exp, so it is stable), which is again
    a valid set of logits: its softmax is the mean probability.
    """

    def __init__(self, mode="logits", weights=None, **kwargs):
        super().__init__(**kwargs)
        if mode not in ENSEMBLE_MODES:
            raise ValueError(
                f"Expected `mode` in {ENSEMBLE_MODES}. Received: mode={mode!r}"
            )
        self.mode = mode
        self.member_weights = None if weights is None else [float(w) for w in weights]

    def call(self, member_logits):
        stacked = ops.cast(ops.stack(member_logits, axis=0), "float32")
        count = len(member_logits)
        weights = np.asarray(
            self.member_weights or [1.0 / count] * count, "float32"
        ).reshape([count] + [1] * (len(stacked.shape) - 1))
        if self.mode == "logits":
            return ops.sum(ops.convert_to_tensor(weights) * stacked, axis=0)
        log_weights = ops.convert_to_tensor(np.log(weights))
        if stacked.shape[-1] == 1:
            # One logit: average the probabilities of both classes, and
            # return the logit of the averaged positive probability.
            log_p = ops.logsumexp(log_weights + ops.log_sigmoid(stacked), axis=0)
            log_not_p = ops.logsumexp(log_weights + ops.log_sigmoid(-stacked), axis=0)
            return log_p - log_not_p
        return ops.logsumexp(log_weights + ops.log_softmax(stacked, axis=-1), axis=0)

    def compute_output_shape(self, input_shapes):
        return tuple(input_shapes[0])

    def get_config(self):
        return {
            **super().get_config(),
            "mode": self.mode,
            "weights": self.member_weights,
        }


def _ensemble_weights(weights, count):
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != count or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(
            f"Expected {count} non-negative `weights` with a positive sum, one "
            f"per member. Received: weights={weights}"
        )
    return [w / sum(weights) for w in weights]


def _frozen_copy(model, index, unique):
    """A frozen copy of a member, so that the caller's model stays as it
    was (name, weights and `trainable`)."""
    try:
        copy = keras.models.clone_model(model)
    except (TypeError, ValueError, NotImplementedError) as error:
        raise ValueError(
            "EnsembleTeacher copies its members, so that yours stay as they "
            f"are, but member {index} `{model.name}` cannot be copied "
            f"({error}). Build it as a Sequential or functional model, or "
            "give it a `get_config`."
        ) from error
    copy.set_weights(model.get_weights())
    copy.name = model.name if unique else f"{model.name}_member{index}"
    copy.trainable = False
    return copy


def _input_shape(model):
    try:
        return tuple(model.inputs[0].shape[1:])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


@keras.saving.register_keras_serializable(package="kd_keras")
class EnsembleTeacher(keras.Model):
    """A frozen teacher that averages its members.

    Hinton et al. (2015) distilled an ensemble of ten speech models into one
    model that kept most of the ensemble's gain. An `EnsembleTeacher` is a
    functional model over its members, frozen, whose output is again logits,
    so it serves as a `Distiller` teacher and with `cache_teacher_logits`,
    and it saves and loads like any Keras model.

    Args:
        models: the members: built `keras.Model`s emitting logits of the same
            shape, all taking the same input.
        mode: `"logits"`: the weighted mean of the members' logits;
            `"probs"`: the log of the weighted mean of their probabilities.
        weights: optional weight per member (normalised to sum to 1);
            equal weights by default.

    The ensemble holds frozen copies of the members (renamed
    `<name>_member<i>` where names repeat); the models you pass stay as they
    were.

    Example:

    ```python
    ensemble = kd_keras.EnsembleTeacher([m1, m2, m3], mode="probs")
    distiller = kd_keras.Distiller(ensemble, student)
    ```
    """

    def __init__(self, models, mode="logits", weights=None, **kwargs):
        models = list(models)
        if not models:
            raise ValueError("Expected at least one member model. Received: []")
        if len(models) == 1:
            logging.warning(
                "EnsembleTeacher got one member, `%s`: the ensemble is that "
                "model alone. Pass two or more models to average them.",
                getattr(models[0], "name", models[0]),
            )
        for index, model in enumerate(models):
            _checks.check_keras_model(model, f"member {index}")
            _checks.check_emits_logits(model, f"member {index}")
        shapes = [_checks.output_shape(m) for m in models]
        if len({s[1:] for s in shapes if s is not None}) > 1:
            raise ValueError(
                "Every member must output logits of the same shape (the same "
                "classes). Received: "
                + ", ".join(
                    f"{m.name}: {s}" for m, s in zip(models, shapes, strict=True)
                )
                + "."
            )
        input_shapes = [_input_shape(m) for m in models]
        if len({s for s in input_shapes if s is not None}) > 1:
            raise ValueError(
                "Every member must take the same input shape. Received: "
                + ", ".join(
                    f"{m.name}: {s}" for m, s in zip(models, input_shapes, strict=True)
                )
                + "."
            )
        weights = _ensemble_weights(weights, len(models))
        names = [model.name for model in models]
        models = [
            # A functional model needs distinct names for its parts.
            _frozen_copy(model, index, unique=names.count(model.name) == 1)
            for index, model in enumerate(models)
        ]
        try:
            first_input = models[0].inputs[0]
        except (AttributeError, IndexError, TypeError, ValueError):
            raise ValueError(
                f"The member `{models[0].name}` has no symbolic input, so the "
                "ensemble cannot know its input shape. Build members with "
                "`keras.Input(shape=...)` (Sequential or functional models)."
            ) from None
        inputs = keras.Input(shape=first_input.shape[1:], dtype=first_input.dtype)
        outputs = EnsembleCombine(mode, weights, name="ensemble")(
            [model(inputs, training=False) for model in models]
        )
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.members = models
        self.mode = mode
        self.member_weights = weights
        self.trainable = False

    def get_config(self):
        return {
            "name": self.name,
            "models": [keras.saving.serialize_keras_object(m) for m in self.members],
            "mode": self.mode,
            "weights": self.member_weights,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["models"] = [
            keras.saving.deserialize_keras_object(m, custom_objects=custom_objects)
            for m in config["models"]
        ]
        return cls(**config)
