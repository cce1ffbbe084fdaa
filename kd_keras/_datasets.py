"""Inspection of input data: the stages of `tf.data` pipelines and the ops
of their functions, batches as NumPy, and a fingerprint of the content.

Data are `tf.data.Dataset`s or `keras.utils.PyDataset`s (such as
`kd_keras.data.ArrayBatches`). A pipeline is walked through its Python
stages rather than serialised, so that in-memory data captured by
`from_tensor_slices` is never copied. TensorFlow is only touched when the
data are a `tf.data.Dataset`, which means it is already imported.
"""

import hashlib

import keras
import numpy as np

from kd_keras import _backend

# Ops whose output differs from one run to the next.
_RANDOM_OP_MARKERS = ("Random", "RngReadAndSkip", "RngSkip")
# Opaque ops that run Python (`tf.numpy_function`, `tf.py_function`,
# `from_generator`), whose output may.
_OPAQUE_OP_MARKERS = ("PyFunc", "GeneratorDataset")


def stages(dataset):
    """Every dataset of the pipeline, from `dataset` back to its sources."""
    stack, seen = [dataset], set()
    while stack:
        stage = stack.pop()
        if id(stage) in seen:
            continue
        seen.add(id(stage))
        yield stage
        try:
            stack.extend(stage._inputs())
        except (AttributeError, NotImplementedError):
            pass


def _function_nodes(stage):
    """The nodes of the functions a stage applies (map, filter, ...)."""
    for value in vars(stage).values():
        function = getattr(value, "function", None)
        graph = getattr(function, "graph", None)
        if graph is None:
            continue
        graph_def = graph.as_graph_def()
        yield from graph_def.node
        for library_function in graph_def.library.function:
            yield from library_function.node_def


def _ours(stage):
    return getattr(stage, "_name", None) == SHUFFLE_STAGE


def _ops(dataset, markers):
    if not _backend.is_tf_dataset(dataset):
        return []
    return sorted(
        {
            node.op
            for stage in stages(dataset)
            if not _ours(stage)
            for node in _function_nodes(stage)
            if any(marker in node.op for marker in markers)
        }
    )


def augmentation_ops(dataset):
    """Names the random and opaque ops of a `tf.data` pipeline's functions.

    Random ops (crops, shifts, noise) give an example different inputs on
    every pass; opaque ones run Python (`tf.numpy_function`,
    `tf.py_function`, `from_generator`) and may. A shuffle only reorders
    examples and is not counted. Other data (a `PyDataset`) cannot be
    inspected and yield none.
    """
    return _ops(dataset, _RANDOM_OP_MARKERS + _OPAQUE_OP_MARKERS)


def has_cache(dataset):
    """True if the pipeline holds a `.cache()`.

    Reading such a dataset partly (a peek at its first batch) before its cache
    is complete can leave the cache truncated, so callers must not peek.
    """
    if not _backend.is_tf_dataset(dataset):
        return False
    return any("Cache" in type(stage).__name__ for stage in stages(dataset))


def _pipeline_digest(dataset):
    """Identifies what the pipeline's functions compute, constants included."""
    parts = []
    for stage in stages(dataset):
        parts.append(type(stage).__name__)
        for node in _function_nodes(stage):
            constant = (
                node.attr["value"].tensor.SerializeToString()
                if node.op == "Const"
                else b""
            )
            parts.append(node.op.encode() + constant)
    return hashlib.sha256(
        b"|".join(sorted(p.encode() if isinstance(p, str) else p for p in parts))
    ).hexdigest()


def _row_hashes(leaves):
    """A 64-bit hash of each example (row) of a batch's arrays."""
    rows = len(leaves[0])
    flat = [np.ascontiguousarray(leaf).reshape(rows, -1) for leaf in leaves]
    return [
        int.from_bytes(
            hashlib.blake2b(
                b"".join(part[i].tobytes() for part in flat), digest_size=8
            ).digest(),
            "little",
        )
        for i in range(rows)
    ]


# The name of the random stages that `cache_teacher_logits` shuffles with:
# they only reorder examples, like a `shuffle`.
SHUFFLE_STAGE = "kd_keras_shuffle"


def _endless(stage):
    try:
        return int(stage.cardinality()) == -1  # tf.data.INFINITE_CARDINALITY
    except (AttributeError, TypeError, ValueError):
        return False


def check_not_endless(dataset):
    """Raises if the `tf.data` pipeline never ends (a `.repeat()` without a
    count), since one pass over it would not either."""
    if not _backend.is_tf_dataset(dataset):
        return
    # An endless repeat under a filter has an unknown cardinality, not -1.
    kinds = [(type(stage).__name__, stage) for stage in stages(dataset)]
    cardinality = int(dataset.cardinality())  # -1 infinite, -2 unknown.
    repeats = any(
        kind == "_RepeatDataset" and int(getattr(stage, "_count", 0)) == -1
        for kind, stage in kinds
    )
    bounded = any("Take" in kind for kind, _ in kinds)
    if cardinality == -1 or (cardinality == -2 and repeats and not bounded):
        raise ValueError(
            "The dataset is endless (a `.repeat()` without a count), so a "
            "pass over it would never end. Pass one pass: drop the "
            "`.repeat()` (Keras starts the data again every epoch), or bound "
            "it with `.take(n)`."
        )


def check_batches(data):
    """Raises unless `data` is a batched `tf.data.Dataset` or `PyDataset`."""
    if not (_backend.is_tf_dataset(data) or isinstance(data, keras.utils.PyDataset)):
        raise ValueError(
            "Expected a batched `tf.data.Dataset` or a `keras.utils.PyDataset` "
            "(such as `kd_keras.data.ArrayBatches(x, y, batch_size=128)`), or "
            f"a tuple of arrays `(x, y)`. Received: {type(data).__name__}."
        )


def as_batches(data, batch_size=None, shuffle=True):
    """Batches of `data`: a `tf.data.Dataset` or `PyDataset` as it is, or a
    tuple of arrays `(x, y[, sample_weight])` in `ArrayBatches` of
    `batch_size` (default 128), reshuffled every epoch if `shuffle`."""
    from kd_keras.data import ArrayBatches

    if isinstance(data, tuple) and 1 <= len(data) <= 3:
        return ArrayBatches(*data, batch_size=batch_size or 128, shuffle=shuffle)
    check_batches(data)
    return data


def numpy_batches(data):
    """Yields `(x, y, sample_weight)` of every batch as NumPy (y and
    sample_weight may be None), from a `tf.data.Dataset` or a `PyDataset`."""
    check_batches(data)
    if _backend.is_tf_dataset(data):
        elements = data.as_numpy_iterator()
    else:
        elements = (data[index] for index in range(len(data)))
    for element in elements:
        yield keras.tree.map_structure(
            lambda t: None if t is None else np.asarray(t),
            keras.utils.unpack_x_y_sample_weight(element),
        )


def spec(data):
    if _backend.is_tf_dataset(data):
        return str(data.element_spec)
    first = next(numpy_batches(data), None)
    if first is None:
        return "empty"
    x, y, sample_weight = first
    return str(
        keras.tree.map_structure(
            lambda a: None if a is None else (a.dtype.str, a.shape[1:]),
            (x, y, sample_weight),
        )
    )


def _sources(dataset):
    """The pipeline's source datasets (those with no input)."""
    for stage in stages(dataset):
        try:
            inputs = stage._inputs()
        except (AttributeError, NotImplementedError):
            inputs = []
        if not inputs and not _ours(stage) and not _endless(stage):
            yield stage


def _source_content(source):
    """`(count, sum of element hashes)` of a source dataset, in any order."""
    count, total = 0, 0
    for batch in source.batch(4096).as_numpy_iterator():
        leaves = keras.tree.flatten(batch)
        count += len(leaves[0])
        total = (total + sum(_row_hashes(leaves))) % (1 << 64)
    return count, total


def fingerprint(dataset):
    """Identifies a dataset's content and batching, whatever order it yields
    it in.

    One full pass hashes every example (its inputs, label and weight
    together) and adds the hashes up, so a reshuffled dataset keeps its
    fingerprint while any changed value, or a label paired with another
    input, changes it; the size of the first batch is part of it too. With
    random augmentation the inputs differ on every pass, so they are left
    out of that pass's hashes; the content of the pipeline's sources and
    what the pipeline computes (its ops and constants, such as the largest
    shift) are hashed instead.
    """
    augmented = bool(_ops(dataset, _RANDOM_OP_MARKERS))
    count, total, batch_size = 0, 0, None
    for x, y, sample_weight in numpy_batches(dataset):
        if batch_size is None:
            batch_size = len(keras.tree.flatten(x)[0])
        leaves = [
            leaf
            for leaf in keras.tree.flatten((x, y, sample_weight))
            if leaf is not None
        ]
        if augmented:
            leaves = leaves[len(keras.tree.flatten(x)) :]  # Random inputs.
        if not leaves:
            continue
        count += len(leaves[0])
        total = (total + sum(_row_hashes(leaves))) % (1 << 64)
    summary = [spec(dataset), count, total, batch_size]
    if augmented:
        sources = [_source_content(source) for source in _sources(dataset)]
        summary += [_pipeline_digest(dataset), sorted(sources)]
    return hashlib.sha256(repr(summary).encode()).hexdigest()[:16]
