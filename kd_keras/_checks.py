"""Validation helpers shared by the Distiller, teachers and assistants.

Each raises `ValueError` naming the value it received and the fix.
"""

import keras
from keras import ops
import numpy as np

from kd_keras import _backend
from kd_keras import _datasets


def check_keras_model(model, role):
    """Raises unless `model` is a built `keras.Model`."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected the {role} to be a `keras.Model`. Received: "
            f"{role}={model!r} of type {type(model).__name__}. Wrap a layer "
            f"with `keras.Sequential([keras.Input(shape=...), layer])`."
        )
    if not model.built:
        raise ValueError(
            f"The {role} `{model.name}` is not built, so its output shape is "
            "unknown. Start it with `keras.Input(shape=...)`, or call "
            f"`{role}.build((None, ...))` with its input shape."
        )


def output_shape(model):
    """Returns the model's output shape `(None, ..., num_classes)`, or None."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    if outputs:
        if len(outputs) != 1:
            raise ValueError(
                f"Expected a model with one output of logits. Received: model "
                f"`{model.name}` with {len(outputs)} outputs. Build a model "
                "that returns only the class logits."
            )
        return tuple(outputs[0].shape)
    spec = getattr(model, "output_spec", None)
    return tuple(spec.shape) if spec is not None else None


def num_classes(model):
    """Returns the size of the model's last output axis, or None."""
    shape = output_shape(model)
    return shape[-1] if shape else None


def _layer_activation_name(layer):
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", str(activation))


def output_layers(model):
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return []
    layers = []
    for tensor in outputs or []:
        history = getattr(tensor, "_keras_history", None)
        if history is not None:
            layers.append(history[0])
    return layers


def check_emits_logits(model, role):
    """Raises if the model's output layer applies softmax (or sigmoid)."""
    for layer in output_layers(model):
        name = _layer_activation_name(layer)
        if name in ("softmax", "log_softmax", "sigmoid"):
            raise ValueError(
                f"The {role} `{model.name}` ends in `{name}` (layer "
                f"`{layer.name}`), so it outputs probabilities, but "
                "distillation needs logits. Remove the final activation (e.g. "
                "`Dense(num_classes)` with no activation), or cut the model "
                "before it: `keras.Model(model.input, model.layers[-2].output)`."
            )


# Checks on the first batch of the data, before any work is done.


# Rows of the first batch that the checks before training run the models on.
PEEK_ROWS = 8


def peek_batch(x, y):
    """Returns the first (inputs, labels) of fit's data as NumPy, or None.

    Reads tf.data pipelines (unless they hold a `.cache()`), `PyDataset`s and
    arrays or tensors of any backend; other inputs (generators) are not
    peeked at, since reading them would consume a batch.
    """
    if _backend.is_tf_dataset(x) or isinstance(x, keras.utils.PyDataset):
        if _datasets.has_cache(x):
            return None
        batch = next(_datasets.numpy_batches(x), None)
        return None if batch is None else batch[:2]
    leaves = keras.tree.flatten(x) if x is not None else []
    if not leaves or not all(
        isinstance(a, np.ndarray) or ops.is_tensor(a) for a in leaves
    ):
        return None
    if y is not None and not (isinstance(y, (np.ndarray, list)) or ops.is_tensor(y)):
        return None
    return keras.tree.map_structure(
        lambda t: None if t is None else np.asarray(ops.convert_to_numpy(t)), (x, y)
    )


def check_not_probabilities(logits, role, name):
    logits = np.asarray(logits, dtype="float64")
    if logits.ndim < 2 or logits.shape[-1] < 2 or logits.size == 0:
        return
    sums = logits.sum(axis=-1)
    if logits.min() >= 0.0 and np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(
            f"The {role} `{name}` outputs probabilities (non-negative, rows "
            "summing to 1), but distillation needs logits. Remove its final "
            "softmax, e.g. end it with `Dense(num_classes)` and no activation."
        )


def batch_shape(shape):
    """`(batch, 5, 4)` for the per-example shape (5, 4)."""
    return "(" + ", ".join(["batch", *map(str, shape)]) + ")"


def check_labels(labels, logits_shape):
    """Checks labels against logits `(batch, ..., classes)`.

    Integer labels have the logits' shape without the class axis (a trailing
    axis of 1 is accepted); one-hot labels have the logits' shape. A single
    logit takes binary labels in [0, 1].
    """
    labels = np.asarray(labels)
    classes, rank = logits_shape[-1], len(logits_shape)
    positions = tuple(logits_shape[1:-1])
    ids_shape = batch_shape(positions)
    if labels.ndim == rank and labels.shape[-1] != 1:
        if classes == 1 or labels.shape[-1] != classes:
            raise ValueError(
                f"The labels have {labels.shape[-1]} classes (shape "
                f"{labels.shape}) but the models output {classes}. Give "
                f"one-hot labels of shape {batch_shape(logits_shape[1:])}, "
                f"or integer class ids of shape {ids_shape}."
            )
        ids = None
        label_positions = labels.shape[1:-1]
    else:
        ids = labels[..., 0] if labels.ndim == rank else labels
        label_positions = ids.shape[1:]
    if tuple(label_positions) != positions:
        raise ValueError(
            f"Expected labels of shape {ids_shape} (class ids) or "
            f"{batch_shape(logits_shape[1:])} (one-hot) for logits of shape "
            f"{batch_shape(logits_shape[1:])}. Received labels of shape "
            f"{labels.shape}."
        )
    if ids is None or ids.size == 0 or not np.issubdtype(ids.dtype, np.number):
        return
    low, high = ids.min(), ids.max()
    if classes == 1:
        if low < 0 or high > 1:
            raise ValueError(
                "A model with one logit is a binary classifier, so it takes "
                f"labels in [0, 1]. Received labels from {low} to {high}. "
                "Give 0/1 labels, or give the models one logit per class."
            )
        return
    if low < 0 or high >= classes:
        raise ValueError(
            f"Expected integer labels in [0, {classes}), since the models "
            f"output {classes} classes. Received labels from {low} to "
            f"{high}. Relabel the data, or give the models {int(high) + 1} "
            "outputs."
        )
