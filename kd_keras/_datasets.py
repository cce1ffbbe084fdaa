"""Inspection of `tf.data` pipelines by the ops in their graph."""

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
