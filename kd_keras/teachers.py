"""Teachers: cached teacher logits and ensembles."""

from absl import logging
import keras
from keras import ops
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _logit_files
from kd_keras import _logit_writer
from kd_keras._datasets import INPUTS_KEY
from kd_keras._datasets import TEACHER_LOGITS_KEY
from kd_keras._datasets import split_cached
from kd_keras.data import ArrayBatches
from kd_keras.data import as_batches


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


def _one_pass(teacher, dataset, keep_data=True, content=None):
    """Runs the teacher over one pass of the dataset.

    Returns the batches' inputs, labels and sample weights, each concatenated
    (as NumPy, in the dataset's structure; None unless `keep_data`), the
    teacher's float32 logits and the first batch's size. Everything comes
    from the same pass, so logits and inputs always belong together, even if
    the dataset shuffles. Each batch is also added to `content`, a
    `ContentHash`, if given.
    """
    parts, logits = [], []
    for index, (x, y, sample_weight) in enumerate(_datasets.numpy_batches(dataset)):
        if not index:
            _checks.check_batched(x, teacher, "teacher", "dataset")
        logits.append(_logit_writer.teacher_batch(teacher, x, index))
        if keep_data:
            parts.append((x, y, sample_weight))
        if content is not None:
            content.add(x, y, sample_weight)
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
    teacher,
    dataset,
    *,
    batch_size=None,
    shuffle=True,
    seed=None,
    allow_random=False,
    directory=None,
    dtype="float32",
    top_k=None,
    shuffle_buffer=None,
):
    """Runs the teacher once and returns a dataset that carries its logits.

    `Distiller.fit` recognises the batches of the returned dataset and skips
    the teacher, so an epoch costs about as much as training the student
    alone. The teacher runs once over the dataset, batch by batch, in
    inference mode.

    In memory (the default, for data that fit): the inputs, labels and
    logits of that pass are kept together and served from there every
    epoch, reshuffled.

    On disk (`directory`, for data that do not fit): only the teacher's
    logits are stored, written to files as they are computed. Every epoch
    re-reads the input pipeline, pairs each example with its stored logits
    and then shuffles the pairs with a buffer of `shuffle_buffer` examples,
    so memory holds that buffer, not the data. Where the input's batches
    have one size (all but the last), the shuffle goes by blocks: the
    batches' order in the buffer, then the examples within each block of
    `shuffle_buffer` examples; otherwise example by example. Pairing needs a
    pipeline that yields the same examples in the same order on every pass: one that
    shuffles (or runs with `deterministic=False`) is refused, and so is one
    whose first two batches differ between two reads (unless it holds a
    `.cache()`, which a partial read could truncate). Each dataset and
    setting gets a folder of its own in `directory`, named by digests of the
    first batch and of the teacher, dtype and top_k. A later call, in any
    process, reuses the files for every batch whose data are unchanged and
    runs the teacher on the others; so an interrupted write resumes where it
    stopped. A returned pipeline whose input has grown since fails rather
    than pairs examples with the logits of others.

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
        seed: seed of that shuffle. On disk, None takes a seed from the
            data, so that every process (every worker of a cluster)
            shuffles alike; `keras.utils.set_random_seed` does not change
            it, so pass `seed` to vary it.
        allow_random: set True to cache a pipeline with random ops anyway;
            in memory, each example then keeps the first pass's
            augmentation for ever; on disk, new draws are paired with the
            logits of the first.
        directory: a folder for the logits on disk; None keeps everything
            in memory.
        dtype: `"float32"` or `"float16"` (half the files) for the logits
            on disk.
        top_k: keep, on disk, only the k largest logits of each example,
            their classes, and one shared value for the other classes,
            chosen so that the other classes keep their total probability
            at T = 1 (each gets an equal share). The k classes and the rest
            as a whole keep their exact probabilities at T = 1, but the KD
            term is approximate, the more so at higher T, because the other
            classes' logits were not all equal. None keeps every logit.
        shuffle_buffer: examples in the shuffle buffer of a `tf.data`
            pipeline paired with logits on disk; by default as many as 32 MB
            of inputs hold (10,000 MNIST digits), at least one batch. Memory
            holds several times that (about 250 MB for the default buffer).
            Arrays are reshuffled in full.

    Returns:
        Batches of `({"inputs": x, "teacher_logits": t}, y)` (with sample
        weights if the input had them; `t` in float32 whatever `dtype`) that
        `Distiller.fit` and `Distiller.evaluate` accept.

    Example:

        ```python
        train = kd_keras.data.load("mnist", "train", batch_size=128)
        cached = kd_keras.cache_teacher_logits(teacher, train)
        distiller.fit(cached, epochs=10)

        # Larger data: streamed, unshuffled input, re-read every epoch; the
        # logits in float16 files.
        stream = kd_keras.data.load("mnist", "train", batch_size=128, in_memory=False)
        cached = kd_keras.cache_teacher_logits(
            teacher, stream, directory="logits", dtype="float16"
        )
        ```
    """
    _check_teacher(teacher)
    _logit_files.check_arguments(dtype, top_k)
    if directory is None:
        given = {"dtype": dtype != "float32", "top_k": top_k is not None}
        given["shuffle_buffer"] = shuffle_buffer is not None
        if any(given.values()):
            names = ", ".join(f"`{name}`" for name, on in given.items() if on)
            verb = "applies" if sum(given.values()) == 1 else "apply"
            raise ValueError(
                f"{names} {verb} to logits stored on disk only. Pass "
                "`directory=` to store them there, or leave them out to keep "
                "the cache in memory (every logit in float32, reshuffled in "
                "full every epoch)."
            )
    elif shuffle_buffer is not None:
        _checks.check_positive_int(shuffle_buffer, "shuffle_buffer")
        if not shuffle:
            raise ValueError(
                "`shuffle_buffer` sizes the shuffle, but `shuffle=False`. "
                "Leave out one of them."
            )
    dataset = _checked(dataset, batch_size, allow_random)
    if directory is None:
        cached = _in_memory(teacher, dataset, batch_size, shuffle, seed)
    else:
        cached = _on_disk(
            teacher,
            dataset,
            directory,
            dtype,
            top_k,
            batch_size,
            shuffle,
            seed,
            shuffle_buffer,
        )
    if directory is None or not allow_random:
        # The teacher's pass checked every input finite (re-read on disk:
        # the same inputs, unless random stages draw new ones).
        _datasets.mark_inputs_checked(cached)
    return cached


def cache_and_fingerprint(teacher, dataset, *, seed=None):
    """`cache_teacher_logits(teacher, dataset, seed=seed)` in memory, and
    `dataset`'s fingerprint (see `_datasets.fingerprint`), from the same
    pass.

    Returns:
        `(cached dataset, fingerprint)`.
    """
    _check_teacher(teacher)
    dataset = _checked(dataset, None, allow_random=False)
    content = _datasets.ContentHash(dataset)
    cached = _in_memory(teacher, dataset, None, True, seed, content)
    return _datasets.mark_inputs_checked(cached), content.fingerprint()


def _check_teacher(teacher):
    _checks.check_keras_model(teacher, "teacher")
    _checks.check_emits_logits(teacher, "teacher")


def _checked(dataset, batch_size, allow_random):
    """The batches to cache, checked: one pass over data without random
    stages (unless `allow_random`)."""
    if batch_size is not None:
        _checks.check_positive_int(batch_size, "batch_size")
    dataset = as_batches(dataset, batch_size, shuffle=False)
    _datasets.check_not_endless(dataset)
    if not allow_random:
        _check_no_augmentation(dataset)
    return dataset


def _in_memory(teacher, dataset, batch_size, shuffle, seed, content=None):
    if isinstance(dataset, ArrayBatches):
        # The arrays are served as they are, without a copy: the teacher
        # runs over them in order.
        x, y, sample_weight = dataset.x, dataset.y, dataset.sample_weight
        in_order = dataset.with_arrays(x, y, sample_weight, shuffle=False)
        _, _, _, logits, first_batch_size = _one_pass(
            teacher, in_order, keep_data=False, content=content
        )
    else:
        x, y, sample_weight, logits, first_batch_size = _one_pass(
            teacher, dataset, content=content
        )
    batch_size = batch_size or first_batch_size
    if _backend.is_tf_dataset(dataset):
        return _tf_dataset(x, y, sample_weight, logits, batch_size, shuffle, seed)
    inputs = {INPUTS_KEY: x, TEACHER_LOGITS_KEY: logits}
    return ArrayBatches(
        inputs, y, sample_weight, batch_size=batch_size, shuffle=shuffle, seed=seed
    )


def _on_disk(
    teacher, dataset, directory, dtype, top_k, batch_size, shuffle, seed, buffer
):
    if isinstance(dataset, ArrayBatches):
        dataset = dataset.with_arrays(
            dataset.x, dataset.y, dataset.sample_weight, shuffle=False
        )
    elif not _backend.is_tf_dataset(dataset):
        raise ValueError(
            "Logits on disk are paired with the input pipeline every epoch, "
            f"which needs a `tf.data.Dataset` or arrays. Received a "
            f"{type(dataset).__name__}, which cannot be inspected for "
            "shuffling. Pass a `tf.data.Dataset`, arrays `(x, y)`, or leave "
            "out `directory` to cache in memory."
        )
    _logit_files.check_deterministic(dataset)
    folder, index, ran = _logit_writer.write(teacher, dataset, directory, dtype, top_k)
    logging.info(
        "Teacher logits of %d examples in %s: the teacher ran on %d of %d "
        "batches, the others were reused.",
        index.examples,
        folder,
        ran,
        len(index.batches),
    )
    batch_size = batch_size or index.batches[0].rows
    if seed is None:
        # Every process (every worker) shuffles alike.
        seed = int(folder.name.split("-")[1], 16) % (1 << 31)
    if isinstance(dataset, ArrayBatches):
        return _StoredBatches(
            {
                INPUTS_KEY: dataset.x,
                TEACHER_LOGITS_KEY: _logit_files.numpy_records(folder, index),
            },
            dataset.y,
            dataset.sample_weight,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            layout=index.layout,
        )
    buffer = buffer or _logit_files.default_buffer(index)
    return _paired(dataset, folder, index, batch_size, shuffle, seed, buffer)


def _paired(dataset, folder, index, batch_size, shuffle, seed, buffer):
    """The `tf.data` pipeline that pairs each input batch with its stored
    logits, read and verified batch by batch.

    Shuffled in blocks: the batches' order in a buffer of `buffer`
    examples, then the examples within each block of that many, so that no
    stage handles examples one by one.
    """
    import tensorflow as tf

    rows = [batch.rows for batch in index.batches]
    # Asserted, so that an input that grew since the caching fails rather
    # than pairs its examples with the logits of others.
    inputs = dataset.apply(tf.data.experimental.assert_cardinality(len(rows)))

    records, verified = _logit_files.tf_batches(folder, index)
    rebatched = shuffle or rows[-1] > batch_size
    rebatched = rebatched or any(count != batch_size for count in rows[:-1])

    def join(element, record):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(element)
        records = verified(*record)
        same = tf.debugging.assert_equal(
            tf.shape(tf.nest.flatten(x)[0])[0],
            tf.shape(records)[0],
            message="The input's batches changed size since their teacher "
            "logits were cached: call `cache_teacher_logits` again.",
        )
        with tf.control_dependencies([same]):
            records = tf.identity(records)
        # Records move through the shuffle as bytes, decoded after it.
        logits = records if rebatched else decode(records)
        inputs = {INPUTS_KEY: x, TEACHER_LOGITS_KEY: logits}
        return keras.utils.pack_x_y_sample_weight(inputs, y, sample_weight)

    def decode(records):
        return _logit_files.decode_rows_tf(records, index.layout)

    def decoded(*element):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(element)
        x = {**x, TEACHER_LOGITS_KEY: decode(x[TEACHER_LOGITS_KEY])}
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    paired = tf.data.Dataset.zip((inputs, records)).map(
        join, num_parallel_calls=tf.data.AUTOTUNE
    )
    if shuffle:
        blocks = max(1, buffer // max(rows))
        paired = paired.shuffle(
            blocks, seed=seed, reshuffle_each_iteration=True, name=SHUFFLE_STAGE
        )
        # Named, so that kd_keras' own inspection of pipelines knows these
        # random stages for a shuffle, not an augmentation.
        draws = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True, name=SHUFFLE_STAGE
        )
        paired = tf.data.Dataset.zip((paired.rebatch(blocks * max(rows)), draws)).map(
            _permuted, name=SHUFFLE_STAGE
        )
    if rebatched:
        paired = paired.rebatch(batch_size).map(
            decoded, num_parallel_calls=tf.data.AUTOTUNE
        )
    options = tf.data.Options()
    # Under several workers, shard the paired batches, never the files.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    batches = -(-index.examples // batch_size) if rebatched else len(rows)
    return (
        paired.apply(tf.data.experimental.assert_cardinality(batches))
        # A fixed prefetch: an autotuned one grows with the epoch.
        .prefetch(2)
        .with_options(options)
    )


SHUFFLE_STAGE = _datasets.SHUFFLE_STAGE


def _permuted(block, draw):
    """The examples of a block in a random order drawn from `draw`."""
    import tensorflow as tf

    count = tf.shape(tf.nest.flatten(block)[0])[0]
    seed = tf.stack([draw, tf.constant(0, tf.int64)])
    order = tf.argsort(tf.random.stateless_uniform([count], seed=seed))
    return tf.nest.map_structure(lambda t: tf.gather(t, order), block)


class _StoredBatches(ArrayBatches):
    """`ArrayBatches` whose teacher logits are records read from disk,
    decoded (to float32, and rebuilt from the top k) batch by batch."""

    def __init__(self, x, y, sample_weight, *, layout, **kwargs):
        super().__init__(x, y, sample_weight, **kwargs)
        self.layout = layout

    def __getitem__(self, index):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
            super().__getitem__(index)
        )
        logits = _logit_files.decode(x[TEACHER_LOGITS_KEY], self.layout)
        x = {**x, TEACHER_LOGITS_KEY: logits}
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def with_arrays(self, x, y=None, sample_weight=None, shuffle=None):
        if isinstance(x, dict) and TEACHER_LOGITS_KEY in x:
            return _StoredBatches(
                x,
                y,
                sample_weight,
                batch_size=self.batch_size,
                shuffle=self.shuffle if shuffle is None else shuffle,
                seed=self.seed,
                layout=self.layout,
            )
        return super().with_arrays(x, y, sample_weight, shuffle)


def _element_inputs(dataset):
    if _backend.is_tf_dataset(dataset):
        return _datasets.describe(dataset).inputs_spec
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


def _first_input_shape(model):
    shapes = _checks.input_shapes(model)
    return shapes[0][1:] if shapes else None


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
        input_shapes = [_first_input_shape(m) for m in models]
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
