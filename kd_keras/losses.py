"""Temperature softmax and the distillation loss T²·KL(p ‖ q)."""

import math
import numbers

import keras
from keras import ops


def check_temperature(temperature):
    """Raises `ValueError` unless `temperature` is a number > 0."""
    if isinstance(temperature, bool) or not isinstance(
        temperature, numbers.Real
    ):
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


def _check_temperature_argument(temperature):
    # Tensors and variables are checked where they are assigned.
    if not (ops.is_tensor(temperature) or isinstance(temperature, keras.Variable)):
        check_temperature(temperature)


def _as_float32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def softmax_with_temperature(logits, temperature):
    """Returns softmax(logits / temperature) over the last axis.

    Higher temperatures give softer distributions that reveal which wrong
    classes the model finds similar to the right one.

    Args:
        logits: tensor of shape `(..., num_classes)`.
        temperature: a number > 0 (a scalar tensor is accepted as well).

    Returns:
        A float32 tensor of the same shape whose last axis sums to 1.

    Example:

    >>> softmax_with_temperature([[2.0, 1.0, 0.1]], 1.0).numpy().round(3)
    array([[0.659, 0.242, 0.099]], dtype=float32)
    """
    _check_temperature_argument(temperature)
    return ops.softmax(_as_float32(logits) / _as_float32(temperature), axis=-1)


def per_example_distillation_loss(teacher_logits, student_logits, temperature):
    """Returns T²·KL(softmax(t/T) ‖ softmax(s/T)) per example, in float32."""
    temperature = _as_float32(temperature)
    log_p = ops.log_softmax(_as_float32(teacher_logits) / temperature, axis=-1)
    log_q = ops.log_softmax(_as_float32(student_logits) / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
    return ops.square(temperature) * kl


def reduce_over_batch(values, sample_weight=None):
    """Sums `values * sample_weight` and divides by the batch size.

    This is Keras' `"sum_over_batch_size"` reduction, so that the label loss
    and the distillation loss weight examples the same way.
    """
    values = _as_float32(values)
    if sample_weight is not None:
        sample_weight = ops.reshape(_as_float32(sample_weight), ops.shape(values))
        values = values * sample_weight
    batch_size = ops.cast(ops.shape(values)[0], "float32")
    return ops.sum(values) / ops.maximum(batch_size, 1.0)


def distillation_loss(
    teacher_logits, student_logits, temperature, sample_weight=None
):
    """Returns the distillation loss T²·KL(p ‖ q), averaged over the batch.

    `p = softmax(teacher_logits / T)` and `q = softmax(student_logits / T)`.
    The KL divergence is summed over classes and averaged over the batch (not
    over batch × classes). It is computed from log-softmax, so large logits do
    not overflow, and in float32 whatever the inputs' dtype, so a
    mixed-precision policy does not lose the small probabilities that carry
    the teacher's knowledge. The T² factor keeps the gradient's size roughly
    independent of T (Hinton et al., 2015): the gradient with respect to the
    student logits is `T·(q − p) / batch_size`.

    Args:
        teacher_logits: tensor `(batch, num_classes)`, the teacher's logits.
        student_logits: tensor of the same shape, the student's logits.
        temperature: a number > 0 (a scalar tensor is accepted as well).
        sample_weight: optional `(batch,)` weights; the weighted sum is
            divided by the batch size, as Keras' own losses do.

    Returns:
        A float32 scalar.

    Example:

    >>> float(distillation_loss([[2.0, 1.0, 0.1]], [[0.5, 1.5, -1.0]], 4.0))
    0.4023...
    """
    _check_temperature_argument(temperature)
    teacher_logits = ops.convert_to_tensor(teacher_logits)
    student_logits = ops.convert_to_tensor(student_logits)
    teacher_shape = tuple(teacher_logits.shape)
    student_shape = tuple(student_logits.shape)
    if len(teacher_shape) != len(student_shape) or any(
        a is not None and b is not None and a != b
        for a, b in zip(teacher_shape, student_shape)
    ):
        raise ValueError(
            "Expected teacher and student logits of the same shape. Received: "
            f"teacher_logits.shape={teacher_shape}, "
            f"student_logits.shape={student_shape}"
        )
    return reduce_over_batch(
        per_example_distillation_loss(
            teacher_logits, student_logits, temperature
        ),
        sample_weight,
    )

