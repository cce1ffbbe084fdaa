"""Every private tf.data (and tensorflow-datasets) API that kd_keras uses,
fenced here.

A `tf.data` pipeline is inspected through its Python stages rather than
serialised, so that in-memory data captured by `from_tensor_slices` is
never copied; that needs the stages' private attributes. Each hook below is
the only place that touches one of them, and `tests/test_internals.py` has
one test per hook, named after it, so that an upgrade that changes one
breaks one clearly named test. Keras' and TensorFlow's other internals are
in `_keras_internals`.
"""

import contextlib

# The stages kd_keras tells apart, by the class tf.data gives them.
_KINDS = (
    ("Shuffle", "shuffle"),
    ("Cache", "cache"),
    ("Repeat", "repeat"),
    ("Take", "take"),
)


def stage_inputs(stage):
    """The datasets a pipeline stage reads from ([] for a source)."""
    try:
        return list(stage._inputs())
    except (AttributeError, NotImplementedError):
        return []


def stage_kind(stage):
    """ "shuffle", "cache", "repeat", "take", or "other"."""
    name = type(stage).__name__
    return next((kind for marker, kind in _KINDS if marker in name), "other")


def stage_name(stage):
    """The `name=` a stage was built with, or None."""
    return getattr(stage, "_name", None)


def repeat_count(stage):
    """The count of a `.repeat()` stage: -1 repeats for ever."""
    return int(getattr(stage, "_count", 0))


def runs_nondeterministically(stage):
    """True for a stage built with `deterministic=False`."""
    return getattr(stage, "_deterministic", None) == "false"


def stage_graphs(stage):
    """The graphs of the functions a stage applies (map, filter, ...)."""
    for value in vars(stage).values():
        graph = getattr(getattr(value, "function", None), "graph", None)
        if graph is not None:
            yield graph


@contextlib.contextmanager
def few_download_retries(retries=2):
    """tensorflow-datasets retries a failed download 10 times with growing
    pauses, over 3 minutes without a network; this fails within seconds."""
    from tensorflow_datasets.core.download import downloader

    default = downloader.MAX_RETRIES
    downloader.MAX_RETRIES = retries
    try:
        yield
    finally:
        downloader.MAX_RETRIES = default
