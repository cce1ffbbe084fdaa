"""Temperature softmax and the distillation loss T²·KL(p ‖ q), in `keras.ops`,
so they run on every Keras backend."""

import math
import numbers

from keras import ops

from kd_keras import _backend


def check_temperature(temperature):
    """Raises `ValueError` unless `temperature` is a number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(
            "Expected `temperature` to be a number > 0, such as 4.0. "
            f"Received: temperature={temperature!r}"
        )
    if not 0 < temperature < math.inf:
        raise ValueError(
            "Expected a finite `temperature` > 0; use 1.0 for the plain "
            f"softmax. Received: temperature={temperature}"
        )


def check_distillation_weight(distillation_weight):
    """Raises `ValueError` unless `distillation_weight` is in [0, 1]."""
    if isinstance(distillation_weight, bool) or not isinstance(
        distillation_weight, numbers.Real
    ):
        raise ValueError(
            "Expected `distillation_weight` to be a number in [0, 1]. "
            f"Received: distillation_weight={distillation_weight!r}"
        )
    if not 0.0 <= distillation_weight <= 1.0:
        raise ValueError(
            "Expected `distillation_weight` in [0, 1]: 0 trains on the labels "
            "only, 1 on the teacher only. "
            f"Received: distillation_weight={distillation_weight}"
        )


def check_scalar(value, check, name):
    """Checks a number, tensor or variable with `check`, and returns it as a
    float; a symbolic value (inside a compiled step) passes unchecked, as
    None."""
    if value is None or isinstance(value, (bool, str)):
        check(value)
    try:
        number = _backend.concrete_scalar(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Expected `{name}` to be a scalar. Received: {name}={value!r}"
        ) from None
    if number is not None:
        check(number)
    return number


def _check_temperature_argument(temperature):
    check_scalar(temperature, check_temperature, "temperature")


def _as_float32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def softmax_with_temperature(logits, temperature):
    """Returns softmax(logits / temperature) over the last axis.

    Higher temperatures give softer distributions that reveal which wrong
    classes the model finds similar to the right one. A single logit is a
    binary classifier: its softmax would be constant, so sigmoid(logit / T),
    the probability of the positive class, is returned instead.

    Args:
        logits: tensor of shape `(..., num_classes)`.
        temperature: a number > 0 (a scalar tensor or variable as well).

    Returns:
        A float32 tensor of the same shape; with two or more classes, its
        last axis sums to 1.

    Example:

    >>> softmax_with_temperature([[2.0, 1.0, 0.1]], 1.0)
    array([[0.659, 0.242, 0.099]], dtype=float32)  # rounded
    """
    _check_temperature_argument(temperature)
    scaled = _as_float32(logits) / _as_float32(temperature)
    if scaled.shape[-1] == 1:
        return ops.sigmoid(scaled)
    return ops.softmax(scaled, axis=-1)


def per_position_distillation_loss(teacher_logits, student_logits, temperature):
    """Returns T²·KL(p ‖ q) at every position, of shape `logits.shape[:-1]`.

    `p` and `q` are the teacher's and the student's softmax at temperature
    T over the last axis, or, for a single logit, the binary distributions
    (sigmoid(z/T), 1 − sigmoid(z/T)). Computed in float32 from log-softmax
    (log-sigmoid), so large logits do not overflow.
    """
    temperature = _as_float32(temperature)
    t = _as_float32(teacher_logits) / temperature
    s = _as_float32(student_logits) / temperature
    if t.shape[-1] == 1:
        log_p, log_not_p = ops.log_sigmoid(t), ops.log_sigmoid(-t)
        log_q, log_not_q = ops.log_sigmoid(s), ops.log_sigmoid(-s)
        kl = ops.exp(log_p) * (log_p - log_q) + ops.exp(log_not_p) * (
            log_not_p - log_not_q
        )
    else:
        log_p = ops.log_softmax(t, axis=-1)
        log_q = ops.log_softmax(s, axis=-1)
        kl = ops.exp(log_p) * (log_p - log_q)
    return ops.square(temperature) * ops.sum(kl, axis=-1)


def _per_row(shape):
    """Elements per example of a static shape, or None if unknown."""
    try:
        dims = tuple(shape)[1:]
    except (TypeError, ValueError):  # A TensorFlow shape of unknown rank.
        return None
    return None if None in dims else math.prod(dims)


def _rows(shape):
    """The batch size of a static shape, or None if unknown."""
    try:
        return tuple(shape)[0] if len(shape) else None
    except (TypeError, ValueError):  # A TensorFlow shape of unknown rank.
        return None


def _weights_like(sample_weight, values):
    """`sample_weight` as a new array of the values' shape.

    One weight per example (`(batch,)` or `(batch, 1)`) is spread over every
    position of the example; one weight per position is taken as it is.
    Keras would instead misalign `(batch,)` weights with `(batch, time)`
    losses, and divide by the weights' own sum. A new array also matters on
    PyTorch, where Keras multiplies the mask into the weights in place.
    """
    sample_weight = _as_float32(sample_weight)
    weights_per_row = _per_row(sample_weight.shape)
    positions = _per_row(values.shape)
    rows = [_rows(sample_weight.shape), _rows(values.shape)]
    if (
        None not in (weights_per_row, positions)
        and (weights_per_row not in (1, positions))
    ) or (None not in rows and rows[0] != rows[1]):
        raise ValueError(
            f"Expected `sample_weight` of shape {tuple(values.shape[:1])} "
            f"(one weight per example) or {tuple(values.shape)} (one per "
            f"position) for losses of shape {tuple(values.shape)}. Received: "
            f"sample_weight of shape {tuple(sample_weight.shape)}."
        )
    batch = ops.shape(values)[0]
    rows = ops.reshape(sample_weight, (batch, -1)) * ops.reshape(
        ops.ones_like(values), (batch, -1)
    )
    return ops.reshape(rows, ops.shape(values))


def reduce_like_keras(
    values, sample_weight=None, mask=None, reduction="sum_over_batch_size"
):
    """Reduces per-position losses as a `keras.losses.Loss` does.

    The same weights, mask and reduction as Keras' own losses, so that a term
    reduced here and a Keras loss agree; weights per example are spread over
    every position of the example (see `_weights_like`).
    """
    from keras.src.losses.loss import reduce_weighted_values

    values = _as_float32(values)
    if sample_weight is not None:
        sample_weight = _weights_like(sample_weight, values)
    return reduce_weighted_values(
        values,
        sample_weight=sample_weight,
        mask=mask,
        reduction=reduction,
        dtype="float32",
    )


def check_same_shape(teacher_shape, student_shape, where=""):
    """Raises unless two logit shapes agree wherever both are known."""
    teacher_shape, student_shape = tuple(teacher_shape), tuple(student_shape)
    if len(teacher_shape) != len(student_shape) or any(
        a is not None and b is not None and a != b
        for a, b in zip(teacher_shape, student_shape, strict=True)
    ):
        raise ValueError(
            f"Expected teacher and student logits of the same shape{where}. "
            f"Received: teacher logits {teacher_shape}, student logits "
            f"{student_shape}. Give both models the same number of classes "
            "(and, for sequences, the same length)."
        )


def distillation_loss(teacher_logits, student_logits, temperature, sample_weight=None):
    """Returns the distillation loss T²·KL(p ‖ q), averaged over the batch.

    `p = softmax(teacher_logits / T)` and `q = softmax(student_logits / T)`.
    The KL divergence is summed over classes and averaged over the batch (not
    over batch × classes); logits of shape `(batch, ..., classes)`, such as
    sequences, are averaged over every position, so a sequence's loss is the
    per-token mean. A single logit is a binary classifier, whose
    distributions are `(sigmoid(z/T), 1 − sigmoid(z/T))`. It is computed from
    log-softmax, so large logits do not overflow, and in float32 whatever
    the inputs' dtype, so a mixed-precision policy does not lose the small
    probabilities that carry the teacher's knowledge. The T² factor keeps the
    gradient's size roughly independent of T (Hinton et al., 2015): the
    gradient with respect to the student logits is `T·(q − p) / batch_size`.

    Args:
        teacher_logits: tensor `(batch, ..., num_classes)`.
        student_logits: tensor of the same shape.
        temperature: a number > 0 (a scalar tensor or variable as well).
        sample_weight: optional weights of shape `(batch,)` or
            `(batch, ...)`; the weighted sum is divided by the number of
            positions, as Keras' own losses do. Positions that the student
            logits' Keras mask hides are left out.

    Returns:
        A float32 scalar.

    Example:

    >>> float(distillation_loss([[2.0, 1.0, 0.1]], [[0.5, 1.5, -1.0]], 4.0))
    0.4023...
    """
    _check_temperature_argument(temperature)
    mask = _backend.keras_mask(student_logits)
    teacher_logits = ops.convert_to_tensor(teacher_logits)
    student_logits = ops.convert_to_tensor(student_logits)
    check_same_shape(teacher_logits.shape, student_logits.shape)
    return reduce_like_keras(
        per_position_distillation_loss(teacher_logits, student_logits, temperature),
        sample_weight,
        mask,
    )
