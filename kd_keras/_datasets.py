"""Inspection of `tf.data` pipelines: their stages, the ops of their
functions, and a fingerprint of their content.

The pipeline is walked through its Python stages rather than serialised, so
that in-memory data captured by `from_tensor_slices` is never copied.
"""

import hashlib

import numpy as np
import tensorflow as tf

# Ops whose output differs from one run to the next.
_RANDOM_OP_MARKERS = ("Random", "RngReadAndSkip", "RngSkip")


def _stages(dataset):
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


def augmentation_ops(dataset):
    """Names the random ops of the pipeline's functions.

    Such ops (random crops, shifts, noise) give an example different inputs
    on every pass; a shuffle only reorders examples and is not counted.
    """
    return sorted({
        node.op
        for stage in _stages(dataset)
        for node in _function_nodes(stage)
        if any(marker in node.op for marker in _RANDOM_OP_MARKERS)
    })


def has_cache(dataset):
    """True if the pipeline holds a `.cache()`.

    Reading such a dataset partly (a peek at its first batch) before its cache
    is complete can leave the cache truncated, so callers must not peek.
    """
    return any("Cache" in type(stage).__name__ for stage in _stages(dataset))


def _pipeline_digest(dataset):
    """Identifies what the pipeline's functions compute, constants included."""
    parts = []
    for stage in _stages(dataset):
        parts.append(type(stage).__name__)
        for node in _function_nodes(stage):
            constant = node.attr["value"].tensor.SerializeToString() \
                if node.op == "Const" else b""
            parts.append(node.op.encode() + constant)
    return hashlib.sha256(b"|".join(sorted(
        p.encode() if isinstance(p, str) else p for p in parts))).hexdigest()


def _row_hashes(leaves):
    """A 64-bit hash of each example (row) of a batch's arrays."""
    rows = len(leaves[0])
    flat = [np.ascontiguousarray(leaf).reshape(rows, -1) for leaf in leaves]
    return [
        int.from_bytes(hashlib.blake2b(
            b"".join(part[i].tobytes() for part in flat),
            digest_size=8).digest(), "little")
        for i in range(rows)
    ]


def fingerprint(dataset):
    """Identifies a dataset's content, whatever order it yields it in.

    One full pass hashes every example (its inputs, label and weight
    together) and adds the hashes up, so a reshuffled dataset keeps its
    fingerprint while any changed value, or a label paired with another
    input, changes it. With random augmentation the inputs differ on every
    pass, so they are left out of the hashes, and what the pipeline computes
    (its ops and constants, such as the largest shift) is hashed instead.
    """
    augmented = bool(augmentation_ops(dataset))
    count, total = 0, 0
    for element in dataset:
        leaves = [np.asarray(leaf) for leaf in tf.nest.flatten(element)]
        if augmented:
            leaves = leaves[1:]  # Random inputs are left out.
        if not leaves:
            continue
        count += len(leaves[0])
        total = (total + sum(_row_hashes(leaves))) % (1 << 64)
    summary = [str(dataset.element_spec), count, total]
    if augmented:
        summary.append(_pipeline_digest(dataset))
    return hashlib.sha256(repr(summary).encode()).hexdigest()[:16]
