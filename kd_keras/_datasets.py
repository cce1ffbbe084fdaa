"""Input data, inspected once.

Data are `tf.data.Dataset`s, `keras.utils.PyDataset`s (such as
`ArrayBatches`), arrays, or anything else `fit` takes (generators).
`describe(data)` walks a `tf.data` pipeline once, through its Python
stages rather than serialised, so that in-memory data captured by
`from_tensor_slices` is never copied, and returns a small immutable
`Description` that every check reads; a pipeline is immutable, so its
description is kept as long as the pipeline lives and never computed twice.
Batches are read as NumPy by `numpy_batches` and `first_batch`, and
`fingerprint` identifies a dataset's content. TensorFlow is only touched
when the data are a `tf.data.Dataset`, which means it is already imported.
"""

import dataclasses
import functools
import hashlib
import weakref

import keras
from keras import ops
import numpy as np

from kd_keras import _backend
from kd_keras import _tfdata_internals as internals

# A cached batch carries its inputs and the teacher's logits under these
# keys (see `kd_keras.cache_teacher_logits`).
INPUTS_KEY = "inputs"
TEACHER_LOGITS_KEY = "teacher_logits"


def split_cached(x):
    """Returns `(inputs, teacher_logits)`; the logits are None if not cached."""
    if isinstance(x, dict) and set(x) == {INPUTS_KEY, TEACHER_LOGITS_KEY}:
        return x[INPUTS_KEY], x[TEACHER_LOGITS_KEY]
    return x, None


# Ops whose output differs from one run to the next.
_RANDOM_OP_MARKERS = ("Random", "RngReadAndSkip", "RngSkip")
# Opaque ops that run Python (`tf.numpy_function`, `tf.py_function`,
# `from_generator`), whose output may.
_OPAQUE_OP_MARKERS = ("PyFunc", "GeneratorDataset")
# The name of the random stages that `cache_teacher_logits` shuffles with:
# they only reorder examples, like a `shuffle`.
SHUFFLE_STAGE = "kd_keras_shuffle"


@dataclasses.dataclass(frozen=True)
class Description:
    """What kd_keras needs to know of a dataset, from one walk.

    Attributes:
        kind: "tf.data", "PyDataset", "arrays" (arrays or tensors of any
            backend, or a structure of them) or "other" (a generator).
        element_spec: a `tf.data` pipeline's element spec.
        cardinality: batches: a pipeline's cardinality (-1 endless, -2
            unknown), a `PyDataset`'s length; None otherwise.
        endless: True for a pipeline that never ends (a `.repeat()` without
            a count).
        cache: True if the pipeline holds a `.cache()`, which a partial
            read (a peek at its first batch) could leave truncated.
        shuffle: True if a stage shuffles.
        nondeterministic: the stages (and options) that run with
            `deterministic=False`.

    The ops of the pipeline's functions (`random_ops`, `opaque_ops`,
    `function_digest`) are read from their graphs the first time they are
    asked for, since serialising a graph costs what its constants weigh.
    The description holds weak references only: it never keeps a pipeline
    or its data alive.
    """

    kind: str
    element_spec: object = None
    cardinality: int = None
    endless: bool = False
    cache: bool = False
    shuffle: bool = False
    nondeterministic: tuple = ()
    # Weak references: to `(graph, ours)` of every function of a stage, and
    # to the source stages.
    graphs: tuple = dataclasses.field(default=(), repr=False, compare=False)
    source_refs: tuple = dataclasses.field(default=(), repr=False, compare=False)
    stage_names: tuple = dataclasses.field(default=(), repr=False, compare=False)

    @functools.cached_property
    def _function_ops(self):
        """`(random ops, opaque ops, digest)` of the pipeline's functions."""
        random_ops, opaque_ops = set(), set()
        digest = [name.encode() for name in self.stage_names]
        for graph_ref, ours in self.graphs:
            for node in _nodes(graph_ref().as_graph_def()):
                constant = b""
                if node.op == "Const":
                    constant = node.attr["value"].tensor.SerializeToString()
                digest.append(node.op.encode() + constant)
                if ours:
                    continue
                if any(marker in node.op for marker in _RANDOM_OP_MARKERS):
                    random_ops.add(node.op)
                if any(marker in node.op for marker in _OPAQUE_OP_MARKERS):
                    opaque_ops.add(node.op)
        return tuple(sorted(random_ops)), tuple(sorted(opaque_ops)), digest

    @property
    def random_ops(self):
        """Random ops of the pipeline's functions (augmentation)."""
        return self._function_ops[0]

    @property
    def opaque_ops(self):
        """Ops that run Python, whose output may be random."""
        return self._function_ops[1]

    @property
    def function_digest(self):
        """Identifies what the pipeline computes: its stages, and its
        functions' ops and constants (such as the largest shift)."""
        return hashlib.sha256(b"|".join(sorted(self._function_ops[2]))).hexdigest()

    @property
    def sources(self):
        """The pipeline's source datasets (while the pipeline lives)."""
        return tuple(ref() for ref in self.source_refs if ref() is not None)

    @property
    def augmentation_ops(self):
        """The random and opaque ops: a shuffle only reorders examples and
        is not counted."""
        return sorted({*self.random_ops, *self.opaque_ops})

    @property
    def batches(self):
        """True for batched data of a kind kd_keras reads itself."""
        return self.kind in ("tf.data", "PyDataset")

    @property
    def peekable(self):
        """True if the first batch may be read ahead of training: a
        `tf.data` pipeline without a `.cache()`, a `PyDataset` or arrays
        (a generator would lose the batch)."""
        return self.kind in ("PyDataset", "arrays") or (
            self.kind == "tf.data" and not self.cache
        )

    @property
    def inputs_spec(self):
        """The element spec of a pipeline's inputs (x), or None."""
        spec = self.element_spec
        return spec[0] if isinstance(spec, tuple) else spec


# A pipeline's description lives as long as the pipeline: {id: Description}.
_DESCRIPTIONS = {}
# Data whose every input was checked finite when they were made (by
# `cache_teacher_logits`), as long as they live: {id: True}.
_CHECKED = {}


def describe(data):
    """The `Description` of `data`; a `tf.data` pipeline is walked once in
    its life."""
    if _backend.is_tf_dataset(data):
        return _kept(_DESCRIPTIONS, data, _walk)
    if isinstance(data, keras.utils.PyDataset):
        try:
            cardinality = len(data)
        except (TypeError, NotImplementedError):
            cardinality = None
        return Description("PyDataset", cardinality=cardinality)
    leaves = keras.tree.flatten(data) if data is not None else []
    if leaves and all(isinstance(a, np.ndarray) or ops.is_tensor(a) for a in leaves):
        return Description("arrays")
    return Description("other")


def mark_inputs_checked(data):
    """Records that every input of `data` was checked finite; returns it."""
    _kept(_CHECKED, data, lambda _: True)
    return data


def inputs_checked(data):
    """True if every input of `data` was checked finite when it was made."""
    return id(data) in _CHECKED


def _kept(memo, dataset, compute):
    """`compute(dataset)`, kept in `memo` until the pipeline is collected
    (a pipeline is immutable, its description too)."""
    key = id(dataset)
    if key not in memo:
        memo[key] = compute(dataset)
        weakref.finalize(dataset, memo.pop, key, None)
    return memo[key]


def _walk(dataset):
    """Every stage of the pipeline, from `dataset` back to its sources, in
    one walk."""
    stack, seen = [dataset], set()
    kinds, names, nondeterministic, sources, graphs = [], [], [], [], []
    endless_repeat = False
    while stack:
        stage = stack.pop()
        if id(stage) in seen:
            continue
        seen.add(id(stage))
        kind = internals.stage_kind(stage)
        kinds.append(kind)
        names.append(type(stage).__name__)
        inputs = internals.stage_inputs(stage)
        stack.extend(inputs)
        ours = internals.stage_name(stage) == SHUFFLE_STAGE
        endless_repeat |= kind == "repeat" and internals.repeat_count(stage) == -1
        if internals.runs_nondeterministically(stage):
            nondeterministic.append(type(stage).__name__)
        if not inputs and not ours and not _endless(stage):
            sources.append(weakref.ref(stage))
        graphs.extend(
            (weakref.ref(graph), ours) for graph in internals.stage_graphs(stage)
        )
    if dataset.options().deterministic is False:
        nondeterministic.append("Options")
    cardinality = int(dataset.cardinality())  # -1 infinite, -2 unknown.
    # An endless repeat under a filter has an unknown cardinality, not -1.
    endless = cardinality == -1 or (
        cardinality == -2 and endless_repeat and "take" not in kinds
    )
    return Description(
        "tf.data",
        element_spec=dataset.element_spec,
        cardinality=cardinality,
        endless=endless,
        cache="cache" in kinds,
        shuffle="shuffle" in kinds,
        nondeterministic=tuple(nondeterministic),
        graphs=tuple(graphs),
        source_refs=tuple(sources),
        stage_names=tuple(names),
    )


def _nodes(graph_def):
    yield from graph_def.node
    for function in graph_def.library.function:
        yield from function.node_def


def _endless(stage):
    try:
        return int(stage.cardinality()) == -1  # tf.data.INFINITE_CARDINALITY
    except (AttributeError, TypeError, ValueError):
        return False


def augmentation_ops(data):
    """Names the random and opaque ops of a `tf.data` pipeline's functions.

    Random ops (crops, shifts, noise) give an example different inputs on
    every pass; opaque ones run Python (`tf.numpy_function`,
    `tf.py_function`, `from_generator`) and may. A shuffle only reorders
    examples and is not counted. Other data (a `PyDataset`) cannot be
    inspected and yield none.
    """
    return describe(data).augmentation_ops


def check_not_endless(data):
    """Raises if the `tf.data` pipeline never ends (a `.repeat()` without a
    count), since one pass over it would not either."""
    if describe(data).endless:
        raise ValueError(
            "The dataset is endless (a `.repeat()` without a count), so a "
            "pass over it would never end. Pass one pass: drop the "
            "`.repeat()` (Keras starts the data again every epoch), or bound "
            "it with `.take(n)`."
        )


# Batches.


def check_batches(data):
    """Raises unless `data` is a batched `tf.data.Dataset` or `PyDataset`."""
    if not describe(data).batches:
        raise ValueError(
            "Expected a batched `tf.data.Dataset` or a `keras.utils.PyDataset` "
            "(such as `kd_keras.data.ArrayBatches(x, y, batch_size=128)`), or "
            f"a tuple of arrays `(x, y)`. Received: {type(data).__name__}."
        )


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


def first_batch(x, y=None, what="training data"):
    """The first `(inputs, labels)` of `fit`'s data as NumPy, or None.

    Reads the first batch of a `tf.data` pipeline (unless it holds a
    `.cache()`) or a `PyDataset`, and takes arrays or tensors of any backend
    whole; other data (generators) are not read, since reading them would
    consume a batch. Raises if the data hold no examples.
    """
    description = describe(x)
    if not description.peekable:
        return None
    if description.batches:
        batch = next(numpy_batches(x), None)
        if batch is None:
            raise ValueError(
                f"The {what} is empty: it yields no batches. Check the split, "
                "the class filter or the `take`/`filter` that made it."
            )
        check_not_empty(batch[0], what)
        return batch[:2]
    if y is not None and not (isinstance(y, (np.ndarray, list)) or ops.is_tensor(y)):
        return None
    batch = keras.tree.map_structure(
        lambda t: None if t is None else np.asarray(ops.convert_to_numpy(t)), (x, y)
    )
    check_not_empty(batch[0], what)
    return batch


def check_not_empty(inputs, what):
    """Raises if the inputs hold no examples."""
    leaves = keras.tree.flatten(inputs)
    if leaves and any(np.ndim(a) and len(a) == 0 for a in leaves):
        shapes = [np.shape(a) for a in leaves]
        raise ValueError(
            f"The {what} holds no examples (inputs of shape "
            f"{shapes[0] if len(shapes) == 1 else shapes}). Check the split, "
            "the class filter or the slicing that made it."
        )


# Content.


def spec(data, first=None):
    """The structure, dtypes and per-example shapes of the data, as text:
    a pipeline's element spec, or those of the first batch (`first`, read
    here if not given)."""
    if _backend.is_tf_dataset(data):
        return str(describe(data).element_spec)
    if first is None:
        first = next(numpy_batches(data), None)
    if first is None:
        return "empty"
    return str(
        keras.tree.map_structure(
            lambda a: None if a is None else (a.dtype.str, a.shape[1:]), first
        )
    )


def _row_hashes(leaves):
    """A 64-bit hash of each example (row) of a batch's arrays (strings by
    their text, not by where they sit in memory)."""
    rows = len(leaves[0])
    flat = [np.ascontiguousarray(leaf).reshape(rows, -1) for leaf in leaves]
    return [
        int.from_bytes(
            hashlib.blake2b(
                b"".join(_row_bytes(part[i]) for part in flat), digest_size=8
            ).digest(),
            "little",
        )
        for i in range(rows)
    ]


def _row_bytes(row):
    if row.dtype != object:
        return row.tobytes()
    items = (item if isinstance(item, bytes) else str(item).encode() for item in row)
    return b"".join(len(item).to_bytes(8, "little") + item for item in items)


class ContentHash:
    """Adds up a hash of every example of a pass over batched data, in any
    order: the sum behind `fingerprint`, which a pass made for another
    purpose (caching the teacher's logits) can compute on the way."""

    def __init__(self, data):
        self.data = data
        self.description = describe(data)
        self.count, self.total, self.first = 0, 0, None

    def add(self, x, y, sample_weight):
        """Adds a batch `(x, y, sample_weight)` of NumPy arrays."""
        if self.first is None:
            self.first = (x, y, sample_weight)
        leaves = [
            leaf
            for leaf in keras.tree.flatten((x, y, sample_weight))
            if leaf is not None
        ]
        if self.description.random_ops:
            leaves = leaves[len(keras.tree.flatten(x)) :]  # Random inputs.
        if leaves:
            self.count += len(leaves[0])
            self.total = (self.total + sum(_row_hashes(leaves))) % (1 << 64)

    def fingerprint(self):
        """The fingerprint of the pass (see `fingerprint`)."""
        batch_size = None
        if self.first is not None:
            batch_size = len(keras.tree.flatten(self.first[0])[0])
        summary = [spec(self.data, self.first), self.count, self.total, batch_size]
        if self.description.random_ops:
            sources = [_source_content(s) for s in self.description.sources]
            summary += [self.description.function_digest, sorted(sources)]
        return hashlib.sha256(repr(summary).encode()).hexdigest()[:16]


def _source_content(source):
    """`(count, sum of element hashes)` of a source dataset, in any order."""
    count, total = 0, 0
    for batch in source.batch(4096).as_numpy_iterator():
        leaves = keras.tree.flatten(batch)
        count += len(leaves[0])
        total = (total + sum(_row_hashes(leaves))) % (1 << 64)
    return count, total


def fingerprint(data):
    """Identifies a dataset's content and batching, whatever order it yields
    it in.

    One full pass hashes every example (its inputs, label and weight
    together) and adds the hashes up, so a reshuffled dataset keeps its
    fingerprint while any changed value, or a label paired with another
    input, changes it; the size of the first batch is part of it too. With
    random augmentation the inputs differ on every pass, so they are left
    out of that pass's hashes; the content of the pipeline's sources and
    what the pipeline computes (its ops and constants, such as the largest
    shift) are hashed instead. It is computed afresh by every call: files
    and Python stages may yield other content on the next pass.
    """
    content = ContentHash(data)
    for batch in numpy_batches(data):
        content.add(*batch)
    return content.fingerprint()
