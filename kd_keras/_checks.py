"""Validation helpers shared by the Distiller, teachers and assistants.

Each raises `ValueError` naming the value it received and the fix.
"""

import numbers

import keras
import numpy as np

from kd_keras import _keras_internals


def check_positive_int(value, name):
    """Raises unless `value` is an integer >= 1 (NumPy's too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"Expected `{name}` to be an integer >= 1. Received: {name}={value!r}"
        )


def check_share(value, name, high_inclusive=True):
    """`value` as a float; raises unless it is a number in [0, 1] (or
    [0, 1) without `high_inclusive`)."""
    high = "1]" if high_inclusive else "1)"
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (0 <= value <= 1 if high_inclusive else 0 <= value < 1)
    ):
        raise ValueError(f"Expected `{name}` in [0, {high}. Received: {name}={value!r}")
    return float(value)


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


def input_shapes(model):
    """The shapes of a model's inputs, `[(None, ...), ...]`, or None where
    unknown (a subclassed model)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return [tuple(t.shape) for t in inputs] if inputs else None


def check_same_inputs(teacher, student):
    """Raises if the teacher and the student take inputs of other shapes:
    both read the same batches."""
    shapes = input_shapes(teacher), input_shapes(student)
    if None in shapes or len(shapes[0]) != len(shapes[1]):
        return  # Unknown, or inputs that dict data may feed by name.
    if len(shapes[0]) > 1:
        names = [[t.name for t in m.inputs] for m in (teacher, student)]
        if set(names[0]) != set(names[1]):
            return
        by_name = dict(zip(names[0], shapes[0], strict=True))
        shapes = [by_name[n] for n in names[1]], shapes[1]
    if len(shapes[0]) == len(shapes[1]) and all(
        _compatible(a, b) for a, b in zip(*shapes, strict=True)
    ):
        return
    teacher_shape, student_shape = (s[0] if len(s) == 1 else s for s in shapes)
    raise ValueError(
        f"The teacher `{teacher.name}` takes inputs of shape {teacher_shape} "
        f"and the student `{student.name}` {student_shape}, but both read the "
        "same batches. Build them for the same input shape."
    )


def _layer_activation_name(layer):
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", str(activation))


def output_layers(model):
    """The layers that make a functional model's outputs ([] if unknown)."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return []
    layers = [_keras_internals.output_layer(tensor) for tensor in outputs or []]
    return [layer for layer in layers if layer is not None]


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


# Rows of the first batch that the checks before training run the models on.
PEEK_ROWS = 8


def check_finite(array, what):
    """Raises if a float array holds NaN or infinite values."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact):
        return
    flat = array.reshape(-1)
    chunk = 1 << 20  # Elements per check: no mask as large as the data.
    for start in range(0, flat.size, chunk):
        bad = ~np.isfinite(flat[start : start + chunk])
        if bad.any():
            first = np.unravel_index(start + int(np.argmax(bad)), array.shape)
            row = f"row {first[0]}" if array.ndim else "the value"
            raise ValueError(
                f"The {what} hold NaN or infinite values (the first in "
                f"{row}: {array[first]}). Training on them turns the weights "
                "into NaN. Drop those examples, or replace the values (e.g. "
                "`np.nan_to_num`), before training."
            )


def check_batched(inputs, model, role, what):
    """Raises if the inputs do not fit the model's inputs: an unbatched
    dataset, or examples of another shape. Models without known input
    shapes (subclassed) are not checked; a dict is matched to the inputs by
    name, as Keras does."""
    expected = input_shapes(model)
    if expected is None:
        return
    if isinstance(inputs, dict):
        names = [t.name for t in model.inputs]
        if set(inputs) != set(names):
            return
        leaves = [inputs[name] for name in names]
    else:
        leaves = keras.tree.flatten(inputs)
    if len(expected) != len(leaves):
        return
    for shape, leaf in zip(expected, leaves, strict=True):
        given = np.shape(leaf)
        if _keras_fits(given, shape):
            continue
        if _compatible(given, shape[1:]):
            raise ValueError(
                f"The {what} is not batched: its examples have shape {given}, "
                f"while the {role} `{model.name}` takes batches of shape "
                f"{batch_shape(shape[1:])}. Call `.batch(batch_size)` on the "
                "dataset."
            )
        raise ValueError(
            f"The {what} has inputs of shape {given}, but the {role} "
            f"`{model.name}` takes {batch_shape(shape[1:])}. Give inputs of "
            "that shape, or a model built for these."
        )


def _keras_fits(given, shape):
    """True if Keras takes a batch of shape `given` for an input `shape`: it
    adds or drops a trailing axis of size 1 (`Functional`'s rank rule)."""
    if len(given) == len(shape) - 1 and shape[-1] == 1:
        shape = shape[:-1]
    elif len(given) == len(shape) + 1 and given[-1] == 1:
        given = given[:-1]
    return bool(given) and _compatible(given[1:], shape[1:])


def _compatible(a, b):
    """True if two shapes agree wherever both are known."""
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b, strict=True)
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


def is_one_hot(labels_shape, logits_shape):
    """True for one-hot (or soft) labels of logits `(batch, ..., classes)`:
    the logits' rank, with a class axis; else the labels are class ids
    (with or without a trailing axis of 1)."""
    return len(labels_shape) == len(logits_shape) and labels_shape[-1] != 1


def check_labels(labels, logits_shape):
    """Checks labels against logits `(batch, ..., classes)`.

    Integer labels have the logits' shape without the class axis (a trailing
    axis of 1 is accepted); one-hot labels have the logits' shape. A single
    logit takes binary labels in [0, 1].
    """
    labels = np.asarray(labels)
    if labels.dtype.kind in "US" or (
        labels.dtype.kind == "O"
        and labels.size
        and isinstance(labels.flat[0], (str, bytes))
    ):
        raise ValueError(
            f"The labels are strings, such as {str(labels.flat[0])!r}, but "
            "training needs integer class ids. Map "
            "them to ids first, e.g. `ids = np.unique(labels, "
            "return_inverse=True)[1]` or `keras.layers.StringLookup`."
        )
    check_finite(labels, "labels")
    classes, rank = logits_shape[-1], len(logits_shape)
    positions = tuple(logits_shape[1:-1])
    ids_shape = batch_shape(positions)
    if is_one_hot(labels.shape, logits_shape):
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
    fractional = ids != np.round(ids)
    if classes > 1 and fractional.any():  # One logit takes soft targets.
        raise ValueError(
            "Expected class ids, which are whole numbers, but the labels hold "
            f"fractions such as {ids[fractional].flat[0]:g}, which training "
            "would truncate. Give integer class ids, or one-hot (or soft) "
            "labels with a class axis."
        )
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
