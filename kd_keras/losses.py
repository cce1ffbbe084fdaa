"""Distillation losses in `keras.ops`, so they run on every Keras backend:
the temperature softmax and T²·KL(p ‖ q) as functions, and the losses that a
`Distiller` combines as serialisable objects: logit losses (`SoftTargets`,
`LogitStandardization`, `DecoupledKD`, `DIST`), the language-model losses
(`ReverseKL`, `GeneralizedJSD`, `SkewKL`, `SkewReverseKL`), feature losses
(`FeatureHint`, `AttentionTransfer`), and wrappers of `keras.distillation`'s
own."""

import math
import numbers
import warnings

import keras
from keras import ops

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _features
from kd_keras import _keras_internals


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
    values = _as_float32(values)
    if sample_weight is None and mask is None and reduction in _MEANS:
        # Keras' mean in fewer ops (a term is reduced at every step); an
        # empty batch, as a replica may get, gives 0.
        if len(values.shape) == 0 or tuple(values.shape) == (0,):
            return values
        mean = ops.divide_no_nan(ops.sum(values), ops.cast(ops.size(values), "float32"))
        replicas = _backend.num_replicas()
        return mean if replicas == 1 else mean * (1.0 / replicas)
    if sample_weight is not None:
        sample_weight = _weights_like(sample_weight, values)
    return _keras_internals.reduce_weighted_values(
        values, sample_weight, mask, reduction, dtype="float32"
    )


_MEANS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def default_reduction(logits):
    """The default reduction of the label and distillation terms: for
    logits per token `(batch, time, ..., classes)`, a mean over the real
    tokens (weighted by the sample weights, masks left out); else Keras'
    default, a mean over the batch."""
    if len(logits.shape) >= 3:
        return "mean_with_sample_weight"
    return "sum_over_batch_size"


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
    over batch × classes); logits of shape `(batch, time, ..., classes)`,
    such as sequences, are averaged over the real tokens (those the sample
    weights keep and no mask hides), as the Distiller averages them. A
    single logit is a binary classifier, whose
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
            `(batch, ...)`; for logits `(batch, classes)` the weighted sum
            is divided by the batch size, as Keras' own losses do, and for
            sequences by the sum of the weights. Positions that the student
            logits' Keras mask hides are left out.

    Returns:
        A float32 scalar.

    Example:

        >>> float(distillation_loss([[2.0, 1.0, 0.1]], [[0.5, 1.5, -1.0]], 4.0))
        0.4023...
    """
    _check_temperature_argument(temperature)
    mask = _keras_internals.keras_mask(student_logits)
    teacher_logits = ops.convert_to_tensor(teacher_logits)
    student_logits = ops.convert_to_tensor(student_logits)
    check_same_shape(teacher_logits.shape, student_logits.shape)
    return reduce_like_keras(
        per_position_distillation_loss(teacher_logits, student_logits, temperature),
        sample_weight,
        mask,
        default_reduction(student_logits),
    )


# Logit losses: building blocks of the distillation term.


class _Term:
    """What the Distiller asks of every distillation loss."""

    needs_labels = False
    uses_epoch = False
    min_classes = 1
    temperature = None

    def check_logits_shape(self, shape):
        """Raises unless the loss can take logits of `shape`."""
        if shape[-1] is not None and shape[-1] < self.min_classes:
            raise ValueError(
                f"{type(self).__name__} needs at least {self.min_classes} "
                f"classes, but the logits have shape {tuple(shape)}. Use "
                "`SoftTargets()` for a single (binary) logit."
            )

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}({settings})"

    def _settings(self):
        return self.get_config()


class LogitLoss(_Term):
    """A distillation loss on the teacher's and the student's logits.

    `Distiller(losses=[(loss, weight), ...])` sums `weight · loss` into its
    distillation term. A loss returns one value per position (the logits'
    shape without the class axis), which the Distiller reduces as it reduces
    the label loss (sample weights, masks, reduction); a batch-level loss
    spreads its batch term over the positions. A loss without a temperature
    of its own (`temperature=None`) uses the Distiller's, so
    `ParameterSchedule` and the tuner drive it.

    Subclasses implement `per_position(teacher_logits, student_logits,
    temperature, labels=None, epoch=None)`; `labels` are class ids of the
    logits' shape without the class axis (given when `needs_labels`), and
    `epoch` (from 0) is given when `uses_epoch`.
    """

    def __init__(self, temperature=None, name=None):
        if temperature is not None:
            check_temperature(temperature)
        self.temperature = temperature
        self.name = name or _snake_case(type(self).__name__)

    def per_position(
        self, teacher_logits, student_logits, temperature, labels=None, epoch=None
    ):
        raise NotImplementedError

    def get_config(self):
        return {"temperature": self.temperature, "name": self.name}


def _check_nonnegative(value, name):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0 <= value < math.inf
    ):
        raise ValueError(
            f"Expected `{name}` to be a finite number >= 0. Received: {name}={value!r}"
        )


def _snake_case(name):
    return "".join(
        f"_{c.lower()}"
        if c.isupper() and i and not name[i - 1].isupper()
        else c.lower()
        for i, c in enumerate(name)
    )


def _scaled(teacher_logits, student_logits, temperature):
    temperature = _as_float32(temperature)
    return (
        _as_float32(teacher_logits) / temperature,
        _as_float32(student_logits) / temperature,
        temperature,
    )


@keras.saving.register_keras_serializable(package="kd_keras")
class SoftTargets(LogitLoss):
    """Hinton et al. (2015): T²·KL(softmax(t/T) ‖ softmax(s/T)) at every
    position; for one logit, the binary KL of sigmoids. The Distiller's
    default, the same as `per_position_distillation_loss`.

    Args:
        temperature: T for this loss, or None for the Distiller's.
        name: the name of its term in the logs.
    """

    def per_position(
        self, teacher_logits, student_logits, temperature, labels=None, epoch=None
    ):
        return per_position_distillation_loss(
            teacher_logits, student_logits, temperature
        )


def standardize(logits, epsilon=1e-7):
    """Z-scores each logit vector over its classes, `(z − mean) / (std + ε)`,
    with the sample standard deviation (N − 1), as the authors' code does."""
    logits = _as_float32(logits)
    classes = logits.shape[-1]
    centred = logits - ops.mean(logits, axis=-1, keepdims=True)
    variance = ops.sum(ops.square(centred), axis=-1, keepdims=True) / (classes - 1)
    return centred / (_safe_sqrt(variance) + epsilon)


@keras.saving.register_keras_serializable(package="kd_keras")
class LogitStandardization(LogitLoss):
    """Sun et al. (CVPR 2024): soft targets on standardised logits.

    Each logit vector is z-scored over its classes, `(z − mean)/(std + ε)`
    with the sample standard deviation (N − 1, as the authors' code uses)
    and ε = 1e-7, before the temperature softmax and the T²·KL. The student
    then matches the teacher's ranking of the classes rather than the scale
    of its logits.

    Args:
        base_temperature: T for this loss, or None for the Distiller's (the
            paper's base temperature, 2 on CIFAR-100).
        name: the name of its term in the logs.
    """

    min_classes = 2

    def __init__(self, base_temperature=None, name=None):
        super().__init__(temperature=base_temperature, name=name)

    def per_position(
        self, teacher_logits, student_logits, temperature, labels=None, epoch=None
    ):
        return per_position_distillation_loss(
            standardize(teacher_logits), standardize(student_logits), temperature
        )

    def get_config(self):
        return {"base_temperature": self.temperature, "name": self.name}


@keras.saving.register_keras_serializable(package="kd_keras")
class DecoupledKD(LogitLoss):
    """Zhao et al. (CVPR 2022): KD split into its target and non-target parts.

    - TCKD: T²·KL between the binary distributions (target, rest) of the
      teacher and the student at temperature T.
    - NCKD: T²·KL between their softmax distributions over the non-target
      classes only.
    - Loss = α·TCKD + β·NCKD, times min((epoch + 1) / warmup_epochs, 1)
      while warming up (epochs counted from 0, as mdistiller's `epoch /
      warmup` counts from 1). The Distiller's `fit` sets the epoch; outside
      `fit` (a custom loop, `evaluate` before any `fit`) it keeps its last
      value, and `per_position(..., epoch=None)` applies no ramp.

    Computed in log space (log-softmax and log-sum-exp), so large logits do
    not overflow. It needs the labels: the Distiller refuses unlabeled data.

    Args:
        alpha: weight of TCKD.
        beta: weight of NCKD (8 in the paper's CIFAR-100 runs).
        warmup_epochs: epochs over which the loss ramps up linearly, or None.
        temperature: T for this loss, or None for the Distiller's.
        name: the name of its term in the logs.
    """

    needs_labels = True
    min_classes = 2

    def __init__(
        self, alpha=1.0, beta=8.0, warmup_epochs=None, temperature=None, name=None
    ):
        super().__init__(temperature=temperature, name=name)
        _check_nonnegative(alpha, "alpha")
        _check_nonnegative(beta, "beta")
        if warmup_epochs is not None and (
            isinstance(warmup_epochs, bool)
            or not isinstance(warmup_epochs, numbers.Integral)
            or warmup_epochs < 1
        ):
            raise ValueError(
                "Expected `warmup_epochs` to be an integer >= 1, or None. "
                f"Received: warmup_epochs={warmup_epochs!r}"
            )
        self.alpha, self.beta = float(alpha), float(beta)
        self.warmup_epochs = warmup_epochs
        self.uses_epoch = warmup_epochs is not None

    def per_position(
        self, teacher_logits, student_logits, temperature, labels=None, epoch=None
    ):
        t, s, temperature = _scaled(teacher_logits, student_logits, temperature)
        target = ops.one_hot(ops.cast(labels, "int32"), t.shape[-1]) > 0.5
        tckd = _binary_kl(t, s, target)
        nckd = _non_target_kl(t, s, target)
        values = ops.square(temperature) * (self.alpha * tckd + self.beta * nckd)
        if self.warmup_epochs is not None and epoch is not None:
            ramp = ops.minimum((_as_float32(epoch) + 1.0) / self.warmup_epochs, 1.0)
            values = values * ramp
        return values

    def get_config(self):
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "warmup_epochs": self.warmup_epochs,
            "temperature": self.temperature,
            "name": self.name,
        }


_NEG_LARGE = -1e9


def _log_target_and_rest(z, target):
    """log p(target) and log p(rest) of softmax(z), in log space."""
    log_all = ops.logsumexp(z, axis=-1)
    log_target = ops.sum(ops.where(target, z, 0.0), axis=-1) - log_all
    log_rest = ops.logsumexp(ops.where(target, _NEG_LARGE, z), axis=-1) - log_all
    return log_target, log_rest


def _binary_kl(t, s, target):
    t_target, t_rest = _log_target_and_rest(t, target)
    s_target, s_rest = _log_target_and_rest(s, target)
    return ops.exp(t_target) * (t_target - s_target) + ops.exp(t_rest) * (
        t_rest - s_rest
    )


def _non_target_kl(t, s, target):
    log_p = ops.log_softmax(ops.where(target, _NEG_LARGE, t), axis=-1)
    log_q = ops.log_softmax(ops.where(target, _NEG_LARGE, s), axis=-1)
    kl = ops.where(target, 0.0, ops.exp(log_p) * (log_p - log_q))
    return ops.sum(kl, axis=-1)


@keras.saving.register_keras_serializable(package="kd_keras")
class DIST(LogitLoss):
    """Huang et al. (NeurIPS 2022): distillation from a stronger teacher by
    correlation, not exact match.

    With y = softmax(z/T) at every position:
    - inter-class term: 1 − the Pearson correlation of y_s and y_t across
      classes, averaged over the positions;
    - intra-class term: 1 − the Pearson correlation across the positions of
      the batch, averaged over the classes;
    - loss = T²·(β·inter + γ·intra).

    The intra-class term is a statistic of the whole batch. Each position's
    value is its own inter-class term plus the batch's intra-class term, so
    the mean over a batch is the loss above; sample weights weigh each
    position's inter-class term, and scale the intra-class term by their
    mean. The intra-class correlation uses every position of the batch,
    masked or not.

    Args:
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        temperature: T for this loss, or None for the Distiller's (the
            paper uses 1 on ImageNet and 4 on CIFAR-100).
        name: the name of its term in the logs.
    """

    min_classes = 2

    def __init__(self, beta=1.0, gamma=1.0, temperature=None, name=None):
        super().__init__(temperature=temperature, name=name)
        _check_nonnegative(beta, "beta")
        _check_nonnegative(gamma, "gamma")
        self.beta, self.gamma = float(beta), float(gamma)

    def per_position(
        self, teacher_logits, student_logits, temperature, labels=None, epoch=None
    ):
        t, s, temperature = _scaled(teacher_logits, student_logits, temperature)
        y_t, y_s = ops.softmax(t, axis=-1), ops.softmax(s, axis=-1)
        inter = 1.0 - _pearson(y_s, y_t, axis=-1)
        classes = y_t.shape[-1]
        flat_t = ops.reshape(y_t, (-1, classes))
        flat_s = ops.reshape(y_s, (-1, classes))
        intra = 1.0 - ops.mean(_pearson(flat_s, flat_t, axis=0))
        return ops.square(temperature) * (self.beta * inter + self.gamma * intra)

    def get_config(self):
        return {
            "beta": self.beta,
            "gamma": self.gamma,
            "temperature": self.temperature,
            "name": self.name,
        }


# Language-model losses (MiniLLM, GKD, DistiLLM): divergences between the
# teacher's and the student's distributions over the vocabulary, per token.


def _log_softmaxes(teacher_logits, student_logits, temperature):
    t, s, temperature = _scaled(teacher_logits, student_logits, temperature)
    return ops.log_softmax(t, axis=-1), ops.log_softmax(s, axis=-1), temperature


def _kl(log_a, log_b):
    """KL(a ‖ b) over the last axis, from log-probabilities; classes that a
    does not give (a logit of −inf) count 0."""
    a = ops.exp(log_a)
    return ops.sum(a * ops.where(a > 0.0, log_a - log_b, 0.0), axis=-1)


def _log_mixture(log_a, log_b, share):
    """log(share·a + (1 − share)·b), for 0 < share < 1."""
    return ops.logaddexp(log_a + math.log(share), log_b + math.log1p(-share))


class _DivergenceLoss(LogitLoss):
    """A divergence of P = softmax(t/T) and Q = softmax(s/T) at every
    position, times T² as `SoftTargets` is (so that its gradient keeps its
    size as T changes; at T = 1 it is the divergence itself)."""

    min_classes = 2

    def per_position(
        self, teacher_logits, student_logits, temperature, labels=None, epoch=None
    ):
        log_p, log_q, temperature = _log_softmaxes(
            teacher_logits, student_logits, temperature
        )
        return ops.square(temperature) * self.divergence(log_p, log_q)

    def divergence(self, log_p, log_q):
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="kd_keras")
class ReverseKL(_DivergenceLoss):
    """MiniLLM (Gu et al., ICLR 2024): T²·KL(Q ‖ P), the reverse KL, at
    every position (token). Mode-seeking: the student puts its mass where
    the teacher's is high rather than covering all of it.

    Args:
        temperature: T for this loss, or None for the Distiller's.
        name: the name of its term in the logs.
    """

    def divergence(self, log_p, log_q):
        return _kl(log_q, log_p)


@keras.saving.register_keras_serializable(package="kd_keras")
class GeneralizedJSD(_DivergenceLoss):
    """GKD (Agarwal et al., ICLR 2024): the generalized Jensen–Shannon
    divergence β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M), with M = β·P + (1 − β)·Q,
    times T², at every position. As in TRL's GKD trainer, β = 0 is KL(P ‖ Q)
    (forward KL) and β = 1 is KL(Q ‖ P) (reverse KL).

    Args:
        beta: β in [0, 1].
        temperature: T for this loss, or None for the Distiller's.
        name: the name of its term in the logs.
    """

    def __init__(self, beta=0.5, temperature=None, name=None):
        super().__init__(temperature=temperature, name=name)
        self.beta = _checks.check_share(beta, "beta")

    def divergence(self, log_p, log_q):
        if self.beta == 0.0:
            return _kl(log_p, log_q)
        if self.beta == 1.0:
            return _kl(log_q, log_p)
        log_m = _log_mixture(log_p, log_q, self.beta)
        return self.beta * _kl(log_p, log_m) + (1.0 - self.beta) * _kl(log_q, log_m)

    def get_config(self):
        return {"beta": self.beta, **super().get_config()}


@keras.saving.register_keras_serializable(package="kd_keras")
class SkewKL(_DivergenceLoss):
    """DistiLLM (Ko et al., ICML 2024): the skew KL, KL(P ‖ α·P + (1 − α)·Q),
    times T², at every position. Mixing a little of P into Q bounds the
    divergence where the student gives a token almost no mass, which keeps
    the gradient stable; α = 0 is the forward KL.

    Args:
        alpha: α in [0, 1).
        temperature: T for this loss, or None for the Distiller's.
        name: the name of its term in the logs.
    """

    def __init__(self, alpha=0.1, temperature=None, name=None):
        super().__init__(temperature=temperature, name=name)
        self.alpha = _checks.check_share(alpha, "alpha", high_inclusive=False)

    def divergence(self, log_p, log_q):
        if self.alpha == 0.0:
            return _kl(log_p, log_q)
        return _kl(log_p, _log_mixture(log_p, log_q, self.alpha))

    def get_config(self):
        return {"alpha": self.alpha, **super().get_config()}


@keras.saving.register_keras_serializable(package="kd_keras")
class SkewReverseKL(SkewKL):
    """DistiLLM (Ko et al., ICML 2024): the skew reverse KL,
    KL(Q ‖ (1 − α)·P + α·Q), times T², at every position; α = 0 is the
    reverse KL.

    Args:
        alpha: α in [0, 1).
        temperature: T for this loss, or None for the Distiller's.
        name: the name of its term in the logs.
    """

    def divergence(self, log_p, log_q):
        if self.alpha == 0.0:
            return _kl(log_q, log_p)
        return _kl(log_q, _log_mixture(log_q, log_p, self.alpha))


def _safe_sqrt(x):
    """sqrt(x), with gradient 0 rather than NaN where x is 0 (a constant
    vector), as `Tensor.norm` in the authors' code."""
    positive = x > 0
    return ops.where(positive, ops.sqrt(ops.where(positive, x, 1.0)), 0.0)


def _pearson(a, b, axis, epsilon=1e-8):
    a = a - ops.mean(a, axis=axis, keepdims=True)
    b = b - ops.mean(b, axis=axis, keepdims=True)
    norms = _safe_sqrt(ops.sum(a * a, axis=axis)) * _safe_sqrt(
        ops.sum(b * b, axis=axis)
    )
    return ops.sum(a * b, axis=axis) / (norms + epsilon)


def _keras_loss(loss):
    """A `keras.distillation` loss object, also from its saved config."""
    if isinstance(loss, dict):
        return keras.saving.deserialize_keras_object(loss)
    return loss


def _keras_loss_config(self):
    """The config of a kd_keras wrapper of a `keras.distillation` loss."""
    return {"loss": keras.saving.serialize_keras_object(self.loss), "name": self.name}


@keras.saving.register_keras_serializable(package="kd_keras")
class KerasLogitsDistillation(LogitLoss):
    """A `keras.distillation.LogitsDistillation`, as a kd_keras loss.

    Keras computes it over the batch with its own temperature, as
    `keras.distillation.Distiller` would: a `keras.losses.KLDivergence()`
    instance compares the temperature softmaxes and is multiplied by T²;
    any other loss, including the default string "kl_divergence", is
    applied to the scaled logits as they are. The batch value is spread
    evenly over the positions, so with the default reduction sample weights
    scale it by their mean, and masks do not apply. `Distiller(losses=...)`
    wraps such objects itself; several get numbered names.

    Args:
        loss: the `keras.distillation.LogitsDistillation`.
        name: the name of its term in the logs.
    """

    def __init__(self, loss, name=None):
        super().__init__(temperature=None, name=name or "keras_logits_distillation")
        loaded = isinstance(loss, dict)  # Warned of when it was made.
        self.loss = _keras_loss(loss)
        if not loaded and any(
            getattr(fn, "__name__", None) == "kl_divergence"
            for fn in keras.tree.flatten(self.loss.loss)
        ):
            warnings.warn(
                "This keras.distillation.LogitsDistillation uses the loss "
                '"kl_divergence" (its default), which Keras applies to the '
                "logits divided by T, not to their softmaxes, and without "
                "the T² factor; kd_keras computes it as Keras does. For "
                "Hinton's soft targets, pass "
                "`loss=keras.losses.KLDivergence()` or use "
                "`kd_keras.losses.SoftTargets()`.",
                stacklevel=3,
            )

    def per_position(
        self, teacher_logits, student_logits, temperature, labels=None, epoch=None
    ):
        value = self.loss.compute_loss(teacher_logits, student_logits)
        return ops.ones(ops.shape(student_logits)[:-1], "float32") * ops.cast(
            value, "float32"
        )

    get_config = _keras_loss_config


# Feature losses: the teacher's intermediate features, matched by the
# student's.


class FeatureLoss(_Term):
    """A distillation loss on intermediate features of the teacher and the
    student, read in the same forward pass as their logits.

    A feature is named by a layer, given as its name, a path through nested
    models ("block2/conv"), the layer itself (e.g. an attribute of a
    subclassed model), a function `fn(model, inputs)` that returns it, or
    None for the model's output. The Distiller reads every such layer in the
    forward pass that computes the logits, on every backend, and owns any
    adapter a loss needs: adapters train with the student but are not part
    of `distiller.student`, nor of its export.

    The teacher must run for its features, so these losses take uncached
    data (`cache_teacher_logits` stores logits only). A loss returns one
    value per example, or, for features of a sequence `(batch, time, dim)`,
    one per token `(batch, time)`. Values per token of logits per token are
    reduced as the logit losses are, over the real tokens; others are first
    averaged over the example (over its real tokens, by the inputs'
    `"padding_mask"`), then spread over the positions of the logits and
    reduced with the label loss's sample weights.

    Subclasses implement `layer_pairs()`, `per_example(teacher_features,
    student_features, adapters)` (lists with one entry per pair), and may
    override `prepare(teacher_shape, student_shape)`, which checks the
    shapes of a pair and returns its adapter layer or None.
    """

    needs_adapter = False  # Whether `prepare` may make an adapter.

    def __init__(self, name=None):
        self.name = name or _snake_case(type(self).__name__)

    def layer_pairs(self):
        raise NotImplementedError

    def prepare(self, teacher_shape, student_shape):
        return None

    def per_example(self, teacher_features, student_features, adapters):
        raise NotImplementedError

    def _settings(self):
        return {"name": self.name}


def _feature_spec(spec, what):
    """A layer given as a name, a path or None serialises; a layer object or
    a function does not."""
    if spec is None or isinstance(spec, str):
        return spec
    raise ValueError(
        f"The {what} was given as {spec!r}, which cannot be saved. Give it by "
        'name or by a path through nested models ("block2/conv") to save '
        "the Distiller, or save `distiller.student` alone."
    )


def _per_example_mean(values):
    return ops.mean(ops.reshape(values, (ops.shape(values)[0], -1)), axis=-1)


def _shapes_text(teacher_shape, student_shape):
    return f"teacher {tuple(teacher_shape)}, student {tuple(student_shape)}"


@keras.saving.register_keras_serializable(package="kd_keras")
class FeatureHint(FeatureLoss):
    """FitNets (Romero et al., ICLR 2015): the student's feature, through a
    learnable adapter, regresses the teacher's, by mean squared error.

    With `adapter="auto"` the adapter is a Dense layer on the channel axis
    to the teacher's width, which for a convolutional feature is a 1×1
    convolution; other axes (the spatial size) must match. The Distiller
    builds one adapter per Distiller, trains it with the student, and keeps
    it out of `distiller.student` (see `distiller.adapters`). Hidden states
    of a sequence `(batch, time, dim)` give one value per token, so that
    padding tokens are left out (see `FeatureLoss`).

    Args:
        teacher_layer: the teacher's layer: a name, a path through nested
            models ("block2/conv"), the layer, a function
            `fn(teacher, inputs)` returning the feature, or None for the
            output.
        student_layer: the same, for the student.
        adapter: "auto" (a Dense or 1×1 convolution to the teacher's
            width), None (no adapter: the features must have the same
            shape), or a Keras layer, copied for each Distiller, that maps
            the student's feature to the teacher's shape.
        name: the name of its term in the logs.
    """

    def __init__(self, teacher_layer, student_layer, adapter="auto", name=None):
        super().__init__(name=name)
        if isinstance(adapter, dict):  # From a saved config.
            adapter = keras.layers.deserialize(adapter)
        if not (
            adapter is None
            or isinstance(adapter, keras.layers.Layer)
            or (isinstance(adapter, str) and adapter == "auto")
        ):
            raise ValueError(
                'Expected `adapter` to be "auto", None or a Keras layer. '
                f"Received: adapter={adapter!r}"
            )
        self.teacher_layer = teacher_layer
        self.student_layer = student_layer
        self.adapter = adapter
        self.needs_adapter = adapter is not None

    def layer_pairs(self):
        return [(self.teacher_layer, self.student_layer)]

    def prepare(self, teacher_shape, student_shape):
        shapes = _shapes_text(teacher_shape, student_shape)
        if isinstance(self.adapter, keras.layers.Layer):
            adapter = type(self.adapter).from_config(self.adapter.get_config())
            try:
                adapted = adapter.compute_output_shape((None, *student_shape[1:]))
            except Exception:  # Unknown until it runs: the Distiller checks it.
                return adapter
            if tuple(adapted[1:]) != tuple(teacher_shape[1:]):
                raise ValueError(
                    f"The adapter {adapter.name} maps the student's feature to "
                    f"shape {tuple(adapted)}, not to the teacher's ({shapes}). "
                    "Give an adapter whose output has the teacher's shape."
                )
            return adapter
        if self.adapter is None:
            if tuple(teacher_shape[1:]) != tuple(student_shape[1:]):
                raise ValueError(
                    "FeatureHint(adapter=None) compares the features as they "
                    f"are, but their shapes differ ({shapes}). Use "
                    'adapter="auto" to learn a map to the teacher\'s width.'
                )
            return None
        if len(teacher_shape) != len(student_shape) or _features.positions(
            teacher_shape
        ) != _features.positions(student_shape):
            raise ValueError(
                "FeatureHint's adapter maps the student's channels to the "
                "teacher's, so the features must agree on every other axis, "
                f"but they have the shapes {shapes}. Pick layers with the "
                "same spatial size, pass a Keras layer as `adapter` that maps "
                "one shape to the other, or use AttentionTransfer, which "
                "resizes its maps."
            )
        axis = _features.channel_axis(len(teacher_shape))
        return _features.Adapter(teacher_shape[axis], channel_axis=axis)

    def per_example(self, teacher_features, student_features, adapters):
        (teacher,), (student,), (adapter,) = (
            teacher_features,
            student_features,
            adapters,
        )
        student = _as_float32(student)
        if adapter is not None:
            student = _as_float32(adapter(student))
        squares = ops.square(student - _as_float32(teacher))
        if len(squares.shape) == 3:  # Per token of a sequence (batch, time, dim).
            return ops.mean(squares, axis=-1)
        return _per_example_mean(squares)

    def get_config(self):
        adapter = self.adapter
        if isinstance(adapter, keras.layers.Layer):
            adapter = keras.layers.serialize(adapter)
        return {
            "teacher_layer": _feature_spec(self.teacher_layer, "teacher layer"),
            "student_layer": _feature_spec(self.student_layer, "student layer"),
            "adapter": adapter,
            "name": self.name,
        }

    def _settings(self):
        return {
            "teacher_layer": _features.describe(self.teacher_layer),
            "student_layer": _features.describe(self.student_layer),
            "adapter": self.adapter
            if not isinstance(self.adapter, keras.layers.Layer)
            else keras.layers.serialize(self.adapter),
            "name": self.name,
        }


def attention_map(features, p=2.0, size=None):
    """Zagoruyko and Komodakis' spatial attention: the mean over channels of
    |A|^p, resized to `size` (height, width) for images, flattened and
    L2-normalised per example. |A| is first divided by its largest value in
    the example, which the normalisation cancels, so that high powers of
    large activations do not overflow float32."""
    features = _as_float32(features)
    axis = _features.channel_axis(len(features.shape))
    magnitudes = ops.abs(features)
    rows = ops.reshape(magnitudes, (ops.shape(magnitudes)[0], -1))
    largest = ops.stop_gradient(ops.max(rows, axis=-1))
    largest = ops.reshape(largest, (-1,) + (1,) * (len(features.shape) - 1))
    magnitudes = magnitudes / ops.maximum(largest, 1e-30)
    maps = ops.mean(ops.power(magnitudes, p), axis=axis)
    if size is not None and tuple(maps.shape[1:]) != tuple(size):
        maps = ops.image.resize(
            maps[..., None], size, interpolation="bilinear", data_format="channels_last"
        )[..., 0]
    maps = ops.reshape(maps, (ops.shape(maps)[0], -1))
    norms = _safe_sqrt(ops.sum(ops.square(maps), axis=-1, keepdims=True))
    return maps / ops.maximum(norms, 1e-12)


@keras.saving.register_keras_serializable(package="kd_keras")
class AttentionTransfer(FeatureLoss):
    """Zagoruyko and Komodakis (ICLR 2017): the student matches the
    teacher's spatial attention maps.

    For each pair of layers, a map is the mean over channels of |A|^p,
    L2-normalised over its positions (`attention_map`); the loss is the mean
    squared difference of the two maps, summed over the pairs, as in the
    authors' code (which weighs the sum by β/2 with β = 1000, so a weight of
    the order of 500 suits it). Images whose maps differ in size are resized
    (bilinear) to the smaller height and width; other features must have
    the same positions. Channels may differ, so no adapter is needed.

    Args:
        pairs: a list of `(teacher_layer, student_layer)`, each a name, a
            path through nested models, the layer, or a function
            `fn(model, inputs)` returning the feature, with the channel axis
            last (or first, under "channels_first").
        p: the power of |A|, 2 in the paper.
        name: the name of its term in the logs.
    """

    def __init__(self, pairs, p=2, name=None):
        super().__init__(name=name)
        if (
            isinstance(pairs, tuple)
            and len(pairs) == 2
            and not all(isinstance(pair, (tuple, list)) for pair in pairs)
        ):
            pairs = [pairs]
        pairs = list(pairs) if isinstance(pairs, (list, tuple)) else None
        if not pairs or any(
            not isinstance(pair, (tuple, list)) or len(pair) != 2 for pair in pairs
        ):
            raise ValueError(
                "Expected `pairs` as a non-empty list of (teacher_layer, "
                'student_layer), such as [("block2/conv", "conv_1")].'
            )
        if (
            isinstance(p, bool)
            or not isinstance(p, numbers.Real)
            or not 0 < p < math.inf
        ):
            raise ValueError(
                f"Expected `p` to be a finite number > 0, such as 2. Received: p={p!r}"
            )
        self.pairs = [tuple(pair) for pair in pairs]
        self.p = float(p)

    def layer_pairs(self):
        return self.pairs

    def prepare(self, teacher_shape, student_shape):
        shapes = _shapes_text(teacher_shape, student_shape)
        rank = len(teacher_shape)
        if rank < 3 or len(student_shape) != rank:
            raise ValueError(
                "AttentionTransfer compares spatial maps, so it needs features "
                "with positions and channels, such as convolution outputs "
                f"(batch, height, width, channels); received {shapes}. Use "
                "FeatureHint for flat features."
            )
        if rank != 4 and _features.positions(teacher_shape) != _features.positions(
            student_shape
        ):
            raise ValueError(
                "AttentionTransfer resizes image maps only; these features "
                f"differ in their positions ({shapes}). Pick layers with the "
                "same positions."
            )
        return None

    def per_example(self, teacher_features, student_features, adapters):
        total = 0.0
        for teacher, student in zip(teacher_features, student_features, strict=True):
            size = None
            if len(teacher.shape) == 4:  # Images: the smaller height and width.
                size = tuple(
                    min(t, s)
                    for t, s in zip(
                        _features.positions(teacher.shape),
                        _features.positions(student.shape),
                        strict=True,
                    )
                )
            difference = attention_map(student, self.p, size) - attention_map(
                teacher, self.p, size
            )
            total = total + ops.mean(ops.square(difference), axis=-1)
        return total

    def get_config(self):
        return {
            "pairs": [
                [_feature_spec(t, "teacher layer"), _feature_spec(s, "student layer")]
                for t, s in self.pairs
            ],
            "p": self.p,
            "name": self.name,
        }

    def _settings(self):
        pairs = [
            tuple(_features.describe(spec) for spec in pair) for pair in self.pairs
        ]
        return {"pairs": pairs, "p": self.p, "name": self.name}


@keras.saving.register_keras_serializable(package="kd_keras")
class KerasFeatureDistillation(FeatureLoss):
    """A `keras.distillation.FeatureDistillation`, as a kd_keras loss.

    Its layers are found as kd_keras finds them (names, and also paths
    through nested models), and its loss compares the features as they are,
    as Keras does: they must have the same shape (`FeatureHint` learns an
    adapter instead). The batch value is spread evenly over the examples.
    `Distiller(losses=...)` wraps such objects itself.

    Args:
        loss: the `keras.distillation.FeatureDistillation`.
        name: the name of its term in the logs.
    """

    def __init__(self, loss, name=None):
        super().__init__(name=name or "keras_feature_distillation")
        self.loss = _keras_loss(loss)

    def layer_pairs(self):
        return [(self.loss.teacher_layer_name, self.loss.student_layer_name)]

    def prepare(self, teacher_shape, student_shape):
        if tuple(teacher_shape[1:]) != tuple(student_shape[1:]):
            raise ValueError(
                "keras.distillation.FeatureDistillation compares features as "
                "they are, but these have different shapes "
                f"({_shapes_text(teacher_shape, student_shape)}). Use "
                "`kd_keras.losses.FeatureHint(teacher_layer, student_layer)`, "
                "which learns an adapter to the teacher's width."
            )
        return None

    def per_example(self, teacher_features, student_features, adapters):
        (teacher,), (student,) = teacher_features, student_features
        value = self.loss.compute_loss(_as_float32(teacher), _as_float32(student))
        return ops.ones((ops.shape(student)[0],), "float32") * _as_float32(value)

    get_config = _keras_loss_config


def _from_keras(loss):
    """kd_keras's form of a `keras.distillation` loss object, or the loss."""
    distillation = getattr(keras, "distillation", None)
    if distillation is None or isinstance(loss, _Term):
        return loss
    if isinstance(loss, distillation.LogitsDistillation):
        return KerasLogitsDistillation(loss)
    if isinstance(loss, distillation.FeatureDistillation):
        return KerasFeatureDistillation(loss)
    return loss


def _is_loss(item):
    """A kd_keras loss, or a `keras.distillation` one (not yet wrapped)."""
    distillation = getattr(keras, "distillation", None)
    return isinstance(item, _Term) or (
        distillation is not None and isinstance(item, distillation.DistillationLoss)
    )


def _is_pair(item):
    """True for `(loss, weight)`, not for a tuple of two losses."""
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and _is_loss(item[0])
        and isinstance(item[1], numbers.Real)
    )


def serialize_weighted(weighted):
    """`[(loss, weight), ...]` as a config."""
    return [
        [keras.saving.serialize_keras_object(loss), weight] for loss, weight in weighted
    ]


def deserialize_weighted(config, custom_objects=None):
    """`[(loss, weight), ...]` from `serialize_weighted`'s config."""
    return [
        (keras.saving.deserialize_keras_object(loss, custom_objects=custom_objects), w)
        for loss, w in config
    ]


def as_weighted_losses(losses):
    """`[(loss, weight), ...]` from None (soft targets), a loss, or a list
    of losses and `(loss, weight)` pairs; `keras.distillation` losses are
    wrapped."""
    if losses is None:
        return [(SoftTargets(), 1.0)]
    losses = _from_keras(losses)
    if isinstance(losses, _Term) or _is_pair(losses):
        losses = [losses]
    if isinstance(losses, tuple):
        losses = list(losses)
    if not isinstance(losses, list) or not losses:
        raise ValueError(
            "Expected `losses` as a loss such as `kd_keras.losses.DIST()`, or "
            "a non-empty list of losses and (loss, weight) pairs. Received: "
            f"losses={losses!r}"
        )
    pairs = []
    for item in losses:
        loss, weight = item if _is_pair(item) else (item, 1.0)
        loss = _from_keras(loss)
        if not isinstance(loss, _Term):
            raise ValueError(
                "Expected each loss to be a `kd_keras.losses.LogitLoss` (such "
                "as `SoftTargets()`, `LogitStandardization()`, `DecoupledKD()`, "
                "`DIST()` or `ReverseKL()`), a `FeatureLoss` (`FeatureHint(...)`, "
                "`AttentionTransfer(...)`) or a `keras.distillation` loss. "
                f"Received: {item!r}"
            )
        _check_nonnegative(weight, f"weight of {loss!r}")
        pairs.append((loss, float(weight)))
    for kind in (KerasLogitsDistillation, KerasFeatureDistillation):
        wrapped = [loss for loss, _ in pairs if isinstance(loss, kind)]
        if len(wrapped) > 1 and len({loss.name for loss in wrapped}) == 1:
            for index, loss in enumerate(wrapped, 1):
                loss.name = f"{loss.name}_{index}"
    names = [loss.name for loss, _ in pairs]
    taken = sorted({"student", "distillation"} & set(names))
    if taken:
        raise ValueError(
            f"A loss named {taken[0]!r} would log `{taken[0]}_loss`, which the "
            "Distiller logs itself. Pass another `name=`."
        )
    if len(set(names)) != len(names):
        raise ValueError(
            f"Each loss needs its own name, for its term in the logs. "
            f"Received the names {names}: pass `name=` to tell them apart."
        )
    return pairs
