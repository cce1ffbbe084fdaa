"""The Distiller's loss: `(1 − λ)·L_student + λ·Σ wᵢ·Lᵢ`, written once in
`keras.ops` for every backend.

Every term is computed at every position of the logits and reduced by one
function, with the label loss's reduction, the sample weights and one mask,
so that the label term and the distillation terms agree.
"""

import collections
import inspect
import numbers

import keras
from keras import ops

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _keras_internals
from kd_keras import _vocabulary
from kd_keras.losses import default_reduction
from kd_keras.losses import reduce_like_keras

MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")
_BINARY_LOSSES = (keras.losses.BinaryCrossentropy, keras.losses.BinaryFocalCrossentropy)
_DEFAULT_LABEL_LOSSES = {
    "binary": keras.losses.BinaryCrossentropy,
    "categorical": keras.losses.CategoricalCrossentropy,
    "sparse": keras.losses.SparseCategoricalCrossentropy,
}

# The loss of a step and its parts, each a float32 scalar; `terms` has one
# per distillation loss.
Loss = collections.namedtuple("Loss", ["total", "label", "distillation", "terms"])
# The metrics that log them: `student_loss`, `distillation_loss` and, with
# several losses, one per loss.
Trackers = collections.namedtuple("Trackers", ["label", "distillation", "terms"])


class BatchMean(keras.metrics.Metric):
    """The mean of a value per batch, weighted by the batch's size: what
    `keras.metrics.Mean().update_state(value, sample_weight=batch)` gives,
    in the fewest ops, for the terms logged at every step.

    Args:
        name: the name in the logs.
    """

    def __init__(self, name):
        super().__init__(name=name, dtype="float32")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, value, batch, replicas=1):
        """Adds a batch's `value` (a per-replica share of it, whole once
        multiplied by `replicas`)."""
        batch = ops.cast(batch, "float32")
        scale = batch if replicas == 1 else batch * replicas
        self.total.assign_add(ops.cast(value, "float32") * scale)
        self.count.assign_add(batch)

    def result(self):
        return ops.divide_no_nan(self.total, self.count)


def _expects_probabilities(loss):
    """True for a loss object or function that takes probabilities."""
    if isinstance(loss, keras.losses.Loss):
        return getattr(loss, "from_logits", True) is False
    try:
        parameter = inspect.signature(loss).parameters.get("from_logits")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is False


class _PerExampleFunction(keras.losses.Loss):
    """A plain function `fn(y, logits)` returning one loss per example (or
    position), reduced as Keras' own losses are."""

    def __init__(self, fn):
        super().__init__(name=getattr(fn, "__name__", "student_loss"), dtype="float32")
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def check_student_loss(loss):
    """The label loss as a `keras.losses.Loss`, or None for the default."""
    if loss is None:
        return None
    resolved = keras.losses.get(loss)
    if resolved is None:
        raise ValueError(
            "Expected `student_loss` to be a Keras loss. Received: "
            f"student_loss={loss!r}"
        )
    if _expects_probabilities(resolved):
        raise ValueError(
            "The student outputs logits, but `student_loss` expects "
            f"probabilities (from_logits=False). Received: student_loss="
            f"{loss!r}. Pass e.g. "
            "`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`."
        )
    if not isinstance(resolved, keras.losses.Loss):
        resolved = _PerExampleFunction(resolved)
    elif type(resolved).call is keras.losses.Loss.call:
        raise ValueError(
            f"The student loss {type(resolved).__name__} does not implement "
            "`call(y_true, y_pred)`. The Distiller reduces the label term and "
            "the distillation term together, from the losses per example "
            "that `call` returns: implement `call`, as Keras' own losses do, "
            "rather than `__call__`."
        )
    if resolved.reduction not in MEAN_REDUCTIONS:
        raise ValueError(
            "Expected `student_loss` to average over the batch, as the "
            "distillation term does. Received: reduction="
            f"{resolved.reduction!r}. Use reduction='sum_over_batch_size' "
            "(the default) or 'mean_with_sample_weight'."
        )
    return resolved


def keras_arguments(kwargs, losses, distillation_weight, default_weight):
    """`keras.distillation.Distiller`'s arguments, read as kd_keras's: its
    `distillation_losses` (with `distillation_loss_weights`) are `losses`,
    and its `student_loss_weight` (0.5 by default, as in Keras) is
    1 − `distillation_weight`."""
    keras_losses = kwargs.pop("distillation_losses", None)
    keras_weights = kwargs.pop("distillation_loss_weights", None)
    student_weight = kwargs.pop("student_loss_weight", None)
    if keras_losses is None:
        if keras_weights is not None or student_weight is not None:
            raise ValueError(
                "`distillation_loss_weights` and `student_loss_weight` go with "
                "Keras' `distillation_losses`; with `losses`, pass "
                "`(loss, weight)` pairs and `distillation_weight`."
            )
        return losses, distillation_weight
    if losses is not None or distillation_weight != default_weight:
        raise ValueError(
            "Pass Keras' `distillation_losses` and `student_loss_weight`, or "
            "kd_keras' `losses` and `distillation_weight`, not a mix."
        )
    listed = (
        list(keras_losses)
        if isinstance(keras_losses, (list, tuple))
        else [keras_losses]
    )
    if keras_weights is not None:
        if not isinstance(keras_weights, (list, tuple)) or len(keras_weights) != len(
            listed
        ):
            raise ValueError(
                "Expected `distillation_loss_weights` as a list with one weight "
                f"per loss ({len(listed)}). Received: {keras_weights!r}"
            )
        listed = list(zip(listed, keras_weights, strict=True))
    student_weight = 0.5 if student_weight is None else student_weight
    if (
        isinstance(student_weight, bool)
        or not isinstance(student_weight, numbers.Real)
        or not 0 <= student_weight <= 1
    ):
        raise ValueError(
            "Expected `student_loss_weight` (Keras' 1 − distillation_weight) "
            f"in [0, 1]. Received: student_loss_weight={student_weight!r}"
        )
    return listed, 1.0 - float(student_weight)


def needs_labels_error(names, what="data"):
    return ValueError(
        f"{', '.join(names)} needs the labels, but the {what} has none. Pass "
        "labeled data, or a loss that needs no labels such as "
        "`kd_keras.losses.SoftTargets()`."
    )


def class_ids(y, logits):
    """Class ids of the logits' shape without the class axis, from integer
    or one-hot labels."""
    y = ops.convert_to_tensor(y)
    if _checks.is_one_hot(y.shape, logits.shape):
        return ops.argmax(y, axis=-1)
    if len(y.shape) == len(logits.shape):
        y = ops.squeeze(y, axis=-1)
    return ops.cast(y, "int32")


class LossTerms:
    """The label loss and the distillation losses of a Distiller.

    Args:
        weighted_losses: `[(loss, weight), ...]`, the distillation term.
        student_loss: the label loss as given (None for cross-entropy
            chosen by the labels' shape).
        shared_vocabulary: the number of leading classes (token ids) to
            distil over, or None (see `_vocabulary.shared_size`).
    """

    def __init__(self, weighted_losses, student_loss=None, shared_vocabulary=None):
        self.weighted = weighted_losses
        self.student_loss = check_student_loss(student_loss)
        self.shared_vocabulary = _vocabulary.check_argument(shared_vocabulary)
        self._cut_told = False  # Whether the padding rule's cut was logged.
        self._defaults = {}
        self.trackers = Trackers(
            BatchMean(name="student_loss"),
            BatchMean(name="distillation_loss"),
            # With several losses, each term is logged too.
            [BatchMean(name=f"{loss.name}_loss") for loss, _ in weighted_losses]
            if len(weighted_losses) > 1
            else [],
        )

    def set_student_loss(self, given, compiled):
        """The label loss of `compile(loss=compiled)`, for a Distiller made
        with `student_loss=given`: either, not two different ones."""
        if (
            compiled is not None
            and given is not None
            and keras.saving.serialize_keras_object(compiled)
            != keras.saving.serialize_keras_object(given)
        ):
            raise ValueError(
                f"The student loss was given twice: to the Distiller ({given!r}) "
                f"and to compile ({compiled!r}). Pass it once."
            )
        self.student_loss = check_student_loss(given if compiled is None else compiled)

    def track(self, loss, batch):
        """Updates the logged terms with a step's `Loss`; the terms are
        per-replica shares of the loss, and the logs show it whole."""
        replicas = _backend.num_replicas()
        self.trackers.label.update_state(loss.label, batch, replicas)
        self.trackers.distillation.update_state(loss.distillation, batch, replicas)
        for tracker, term in zip(self.trackers.terms, loss.terms, strict=False):
            tracker.update_state(term, batch, replicas)

    def needing_labels(self):
        """The names of the distillation losses that need the labels."""
        return [type(loss).__name__ for loss, _ in self.weighted if loss.needs_labels]

    def check_logits_shape(self, shape):
        for loss, _ in self.weighted:
            loss.check_logits_shape(shape)

    def check_shapes(self, teacher_shape, student_shape, where=""):
        """The classes to distil over (None for all): raises unless the
        teacher's and the student's logit shapes can be distilled."""
        size = _vocabulary.check_shapes(
            teacher_shape, student_shape, self.shared_vocabulary, where
        )
        if size is not None:
            self.check_logits_shape((size,))
            if self.shared_vocabulary is None and not self._cut_told:
                self._cut_told = True
                _vocabulary.tell_cut(teacher_shape[-1], student_shape[-1], size)
        return size

    def label_loss(self, y, student_logits):
        """The label loss: the user's, or cross-entropy chosen by shapes,
        for sequences a mean over the real tokens (see `default_reduction`)."""
        if self.student_loss is not None:
            return self.student_loss
        if student_logits.shape[-1] == 1:
            kind = "binary"
        elif _checks.is_one_hot(y.shape, student_logits.shape):
            kind = "categorical"
        else:
            kind = "sparse"
        reduction = default_reduction(student_logits)
        if (kind, reduction) not in self._defaults:
            self._defaults[kind, reduction] = _DEFAULT_LABEL_LOSSES[kind](
                from_logits=True, reduction=reduction
            )
        return self._defaults[kind, reduction]

    def compute(
        self,
        y,
        student_logits,
        teacher_logits,
        sample_weight,
        *,
        weight,
        temperature,
        epoch=None,
        feature_values=None,
        padding_mask=None,
    ):
        """`Loss(total, label, distillation, terms)` of a batch, without the
        regularisation; `weight` is λ, `feature_values` the feature losses'
        values per example (or per position) by their place among the
        losses, `padding_mask` the inputs' `"padding_mask"` (KerasHub's),
        if any.

        The mask is the student logits' Keras mask, together with any mask
        the label loss sets itself (such as `ignore_class`). For sequence
        logits without `sample_weight`, the padding mask weighs the values
        that have one per token.
        """
        shared = self.check_shapes(teacher_logits.shape, student_logits.shape)
        weight = ops.convert_to_tensor(weight)
        mask = _keras_internals.keras_mask(student_logits)
        tokens = _per_token(padding_mask, student_logits)

        def weights_of(values):
            if sample_weight is not None or tokens is None:
                return sample_weight
            return tokens if _same_positions(values.shape, tokens.shape) else None

        term_values = self._term_values(
            y,
            _vocabulary.cut(student_logits, shared),
            _vocabulary.cut(teacher_logits, shared),
            temperature,
            epoch,
            feature_values,
            padding_mask,
        )
        if y is None:
            reduction = getattr(
                self.student_loss, "reduction", default_reduction(student_logits)
            )
            label = ops.zeros((), "float32")
        else:
            label_loss = self.label_loss(y, student_logits)
            reduction = label_loss.reduction
            label_values = _label_values(label_loss, y, student_logits)
            label_mask = _keras_internals.keras_mask(label_values)
            if label_mask is not None and mask is not None:
                label_mask = ops.logical_and(
                    ops.cast(label_mask, "bool"), ops.cast(mask, "bool")
                )
            elif label_mask is None:
                label_mask = mask
            label = reduce_like_keras(
                label_values, weights_of(label_values), label_mask, reduction
            )
            if len(label_values.shape) == len(term_values[0].shape):
                mask = label_mask
        terms = [
            reduce_like_keras(values, weights_of(values), mask, reduction)
            for values in term_values
        ]
        kd = ops.sum(
            ops.stack([w * t for (_, w), t in zip(self.weighted, terms, strict=True)])
        )
        kd = ops.where(weight > 0.0, kd, ops.zeros_like(kd))
        return Loss((1.0 - weight) * label + weight * kd, label, kd, terms)

    def _term_values(
        self,
        y,
        student_logits,
        teacher_logits,
        temperature,
        epoch,
        feature_values,
        padding_mask=None,
    ):
        """Each distillation loss at every position, before its reduction."""
        labels = None
        needy = self.needing_labels()
        if needy:
            if y is None:
                raise needs_labels_error(needy)
            labels = class_ids(y, student_logits)
        values = []
        for index, (loss, _) in enumerate(self.weighted):
            if feature_values is not None and index in feature_values:
                values.append(
                    _spread(feature_values[index], student_logits, padding_mask)
                )
                continue
            values.append(
                loss.per_position(
                    teacher_logits,
                    student_logits,
                    temperature if loss.temperature is None else loss.temperature,
                    labels=labels,
                    epoch=epoch,
                )
            )
        return values


def padding_mask(inputs):
    """The `"padding_mask"` of dict inputs (KerasHub's models), or None."""
    if isinstance(inputs, dict):
        return inputs.get("padding_mask")
    return None


def token_weights(logits, sample_weight, inputs):
    """The weights of a batch's tokens: `sample_weight` if given, else, for
    logits per token, the inputs' `"padding_mask"` (KerasHub's) if it has
    one entry per token, else None."""
    if sample_weight is not None:
        return sample_weight
    return _per_token(padding_mask(inputs), logits)


def _per_token(mask, logits):
    """`mask` if it has one entry per position of logits per token, else
    None."""
    if mask is None or len(logits.shape) < 3:
        return None
    return mask if _same_positions(mask.shape, logits.shape[:-1]) else None


def _same_positions(shape, other, known=False):
    """Whether two static shapes agree after the batch axis: wherever both
    sizes are known, or, with `known`, known and equal everywhere."""
    shape, other = tuple(shape)[1:], tuple(other)[1:]
    if known:
        return shape == other and None not in shape
    return len(shape) == len(other) and all(
        a is None or b is None or a == b for a, b in zip(shape, other, strict=True)
    )


def _spread(values, student_logits, padding_mask=None):
    """A feature loss's values over the logits' positions: values per token
    of the logits' own known length as they are; others (per example, or
    per token of another sequence) averaged over each example, over its
    real tokens where the padding mask has their shape, and spread over the
    logits' positions."""
    values = ops.cast(values, "float32")
    if len(values.shape) > 1 and _same_positions(
        values.shape, student_logits.shape[:-1], known=True
    ):
        return values
    if len(values.shape) > 1:
        values = ops.reshape(values, (ops.shape(values)[0], -1))
        if padding_mask is not None and _same_positions(
            padding_mask.shape, values.shape
        ):
            weights = ops.cast(padding_mask, "float32")
            values = ops.divide_no_nan(
                ops.sum(values * weights, axis=-1), ops.sum(weights, axis=-1)
            )
        else:
            values = ops.mean(values, axis=-1)
    positions = ops.shape(student_logits)[:-1]
    rank = len(student_logits.shape)
    values = ops.reshape(values, (-1,) + (1,) * (rank - 2))
    return values * ops.ones(positions, "float32")


def _label_values(label_loss, y, student_logits):
    """The label loss at every position, before its reduction, as a
    `keras.losses.Loss` computes it (in the loss's dtype)."""
    dtype = label_loss.dtype
    y = keras.tree.map_structure(lambda t: ops.convert_to_tensor(t, dtype=dtype), y)
    logits = ops.convert_to_tensor(student_logits, dtype=dtype)
    if (
        isinstance(label_loss, _BINARY_LOSSES)
        and ops.is_tensor(y)
        and (len(y.shape) == len(logits.shape) - 1)
    ):
        # Binary labels (batch, ...) for logits (batch, ..., 1): without
        # the axis, Keras' binary losses would average over positions.
        y = ops.expand_dims(y, -1)
    return label_loss.call(y, logits)


def regularization(distiller):
    """The student's (and adapters') regularisation losses, as Keras'
    `compute_loss` adds them, divided by the replicas as the loss terms are.

    An activity regulariser of the teacher, which may have run by now, is
    left out: the teacher does not train.
    """
    teacher_losses = {id(loss) for loss in distiller.teacher.losses}
    losses = [loss for loss in distiller.losses if id(loss) not in teacher_losses]
    if not losses:
        return ops.zeros((), "float32")
    total = ops.sum([ops.cast(ops.sum(loss), "float32") for loss in losses])
    return total / _backend.num_replicas()
