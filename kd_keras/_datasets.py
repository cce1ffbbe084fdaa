"""Inspection of `tf.data` pipelines: the ops in their graph, and a
fingerprint of their content."""

import hashlib

import numpy as np
import tensorflow as tf

# Ops whose output differs from one run to the next.
_RANDOM_OP_MARKERS = ("Random", "RngReadAndSkip", "RngSkip")


def _graph_ops(dataset):
    graph_def = tf.compat.v1.GraphDef.FromString(
        dataset._as_serialized_graph().numpy()
    )
    for node in graph_def.node:
        yield node
    for function in graph_def.library.function:
        yield from function.node_def


def augmentation_ops(dataset):
    """Names the random ops of `dataset` other than shuffles.

    Such ops (random crops, shifts, noise) give an example different inputs
    on every pass; a shuffle only reorders examples.
    """
    return sorted({
        node.op
        for node in _graph_ops(dataset)
        if any(marker in node.op for marker in _RANDOM_OP_MARKERS)
    })


def has_cache(dataset):
    """True if the pipeline holds a `.cache()`.

    Reading such a dataset partly (a peek at its first batch) before its cache
    is complete can leave the cache truncated, so callers must not peek.
    """
    return any(node.op.startswith("CacheDataset") for node in _graph_ops(dataset))


def fingerprint(dataset):
    """Identifies a dataset's content, whatever order it yields it in.

    One full pass sums the labels and (for data without random augmentation)
    the inputs and their squares, so a reshuffled dataset keeps its
    fingerprint and changed data changes it.
    """
    augmented = bool(augmentation_ops(dataset))
    count, sums = 0, []
    for element in dataset:
        leaves = [np.asarray(leaf, dtype="float64")
                  for leaf in tf.nest.flatten(element)]
        count += len(leaves[0])
        stats = []
        for index, leaf in enumerate(leaves):
            if augmented and index == 0:
                continue  # Random inputs differ on every pass.
            stats += [leaf.sum(), np.square(leaf).sum()]
        sums = stats if not sums else [a + b for a, b in zip(sums, stats)]
    summary = [str(dataset.element_spec), count] + [f"{s:.6e}" for s in sums]
    return hashlib.sha256(repr(summary).encode()).hexdigest()[:16]
