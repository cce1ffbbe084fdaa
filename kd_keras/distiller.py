"""The Distiller: a `keras.Model` that trains a student on labels and on a
teacher's softened outputs, on every Keras backend.

Its jobs are done by small collaborators beside it: `_loss_terms` computes
the loss, `_feature_pairs` reads the features of feature losses and owns
their adapters, `_data_checks` checks the first batch before any work,
`_tf_step` is the TensorFlow training step with its workarounds for several
workers, and `_fit_callbacks` adds the callbacks every `fit` runs.
"""

import contextlib
import functools
import inspect
import threading
import weakref

import keras
from keras import ops
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _data_checks
from kd_keras import _datasets
from kd_keras import _feature_pairs
from kd_keras import _fit_callbacks
from kd_keras import _keras_internals
from kd_keras import _loss_terms
from kd_keras import _tf_step
from kd_keras import losses as kd_losses
from kd_keras import metrics as kd_metrics
from kd_keras._hyperparameters import Hyperparameter
from kd_keras._hyperparameters import Owner
from kd_keras.losses import check_distillation_weight
from kd_keras.losses import check_temperature

# A cached batch carries its inputs and the teacher's logits under these keys
# (see `kd_keras.cache_teacher_logits`); `split_cached(x)` returns
# `(inputs, teacher_logits)`, the logits None if not cached.
INPUTS_KEY = _datasets.INPUTS_KEY
TEACHER_LOGITS_KEY = _datasets.TEACHER_LOGITS_KEY
split_cached = _datasets.split_cached

DEFAULT_DISTILLATION_WEIGHT = 0.9


class _Step:
    """What a Distiller's training or evaluation step records as it runs,
    for `compute_loss` in the same step: the student's features, read by
    `call` in the forward pass that computes the logits, and on TensorFlow
    the teacher's, read outside the gradient tape."""

    student_features = teacher_features = None


# The step each thread is tracing, as `(Distiller, _Step)`: a replica of a
# `tf.distribute` strategy traces its step in a thread of its own.
_STEPS = threading.local()


@contextlib.contextmanager
def _in_step(model):
    """The scope of one step of `model`; an inner scope (the Distiller's own
    step called from an override) shares the outer one's record."""
    outer = getattr(_STEPS, "current", None)
    if outer is not None and outer[0] is model:
        yield outer[1]
        return
    _STEPS.current = (model, _Step())
    try:
        yield _STEPS.current[1]
    finally:
        _STEPS.current = outer


def _stepping(step_function):
    """`step_function` (a `train_step` or `test_step` override) run in the
    scope of one step, so that its forward pass and its `compute_loss` share
    the features read once."""

    @functools.wraps(step_function)
    def step(self, *args, **kwargs):
        with _in_step(self):
            return step_function(self, *args, **kwargs)

    return step


def _step_of(model):
    """The step of `model` that this thread is tracing, or None."""
    current = getattr(_STEPS, "current", None)
    return current[1] if current is not None and current[0] is model else None


@keras.saving.register_keras_serializable(package="kd_keras")
class Distiller(_keras_internals.SymbolicBuildFromFirstReplica, keras.Model):
    """Trains a student on the labels and on a teacher's softened outputs.

    The loss is `(1 − λ)·L_student + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))`
    where `t` and `s` are the teacher's and student's logits, `T` is the
    temperature and `λ` the distillation weight. The teacher runs in inference
    mode, its outputs are never differentiated, and only the student's
    weights are updated. When λ is 0 the teacher is not run at all. Batches
    made by `kd_keras.cache_teacher_logits` carry the teacher's logits, and
    then the teacher is not run either.

    It runs on every Keras backend, with one loss written in `keras.ops`
    (`compute_loss`); on TensorFlow its training step runs the teacher
    outside the gradient tape.

    Logits may have any rank `(batch, ..., classes)`, e.g. one per token of
    a sequence: both terms are then means over the real tokens, weighted by
    a `sample_weight` of shape `(batch, time)` (or, without one, by the
    inputs' `"padding_mask"`, as KerasHub models take them); one of shape
    `(batch,)` weighs all positions of an example. Positions masked by Keras
    masking, or ignored by the label loss (`ignore_class`), are left out of
    both. The distillation term is reduced exactly as the label loss is (its
    `reduction`, weights and mask). A model with a single logit is a binary
    classifier: its soft targets are `sigmoid(t/T)` against `sigmoid(s/T)`,
    with KD = T²·binary KL, and the default label loss is binary
    cross-entropy from logits.

    `temperature` and `distillation_weight` are non-trainable float32
    variables: callbacks may assign them during `fit`, and the next step uses
    the new value without retracing (on every backend, between any two
    batches), except that switching the teacher off (λ = 0) or back on
    traces the step once more. Assigning a value out of range raises. Each
    epoch's logs get the values the epoch ended with.

    `call` and `predict` run the student; `distiller.student` is the model to
    deploy. Saving `distiller.student` never saves the teacher.

    Args:
        teacher: a built, trained `keras.Model` that outputs logits. It is
            frozen (`teacher.trainable = False`).
        student: a built `keras.Model` with the same output shape (but
            for a padded vocabulary, see `shared_vocabulary`), also
            emitting logits.
        temperature: T > 0, the softmax temperature of the distillation term.
        distillation_weight: λ in [0, 1], the weight of the distillation
            term. Hinton et al. (2015) found a much lower weight on the label
            term works best, hence the default 0.9.
        student_loss: the label loss, a Keras loss that takes logits, with a
            mean reduction ("sum_over_batch_size", "mean" or
            "mean_with_sample_weight"), or a function returning one loss per
            example. Defaults to cross-entropy from logits, chosen by the
            labels' shape: sparse for integer labels `(batch, ...)`,
            categorical for one-hot labels `(batch, ..., classes)`, binary
            for a single logit. It may also be given as `loss` to `compile`.
        losses: the distillation term: a `kd_keras.losses` loss (a logit
            loss such as `DecoupledKD()`, or a feature loss such as
            `FeatureHint("block2/conv", "conv2")`), a `keras.distillation`
            loss, or a list of losses and `(loss, weight)` pairs, summed as
            `Σ weight · loss`; None for `SoftTargets()`, Hinton's T²·KL.
            Losses without a temperature of their own use the Distiller's
            `temperature`. Feature losses read the named layers in the same
            forward pass, need the teacher to run (no cached logits), and
            may add adapters, `distiller.adapters`, which train with the
            student but are not part of it.
        check_finite_inputs: refuse NaN or infinite float inputs (on the
            first batch) and make the loss NaN on any batch that holds one,
            so that `fit` stops with an error (see the guide "Bad
            input"); the batches of `cache_teacher_logits`, whose inputs
            were all checked when they were cached, are not checked again.
            Pass False for inputs that hold them on purpose, such as
            additive `-inf` attention masks.
        shared_vocabulary: for logits over vocabularies that differ only
            by padding (32,000 token ids in 32,064 logits), the number of
            leading ids to distil over. By default, logits per token whose
            larger size is a multiple of 64 and at most 256 more are cut to
            the smaller; other mismatches are refused.

    Example:

        ```python
        teacher = kd_keras.models.mlp(hidden=(1200, 1200))
        teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        teacher.fit(x, y, epochs=5)
        distiller = kd_keras.Distiller(
            teacher, kd_keras.models.mlp(hidden=(800, 800)), temperature=4.0)
        distiller.compile("adam", metrics=["accuracy"])
        distiller.fit(x, y, epochs=5)
        distiller.student.save("student.keras")
        ```
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("train_step", "test_step"):  # A subclass's own steps.
            if name in vars(cls):
                setattr(cls, name, _stepping(vars(cls)[name]))

    def __init__(
        self,
        teacher,
        student,
        temperature=4.0,
        distillation_weight=DEFAULT_DISTILLATION_WEIGHT,
        student_loss=None,
        check_finite_inputs=True,
        losses=None,
        shared_vocabulary=None,
        **kwargs,
    ):
        losses, distillation_weight = _loss_terms.keras_arguments(
            kwargs, losses, distillation_weight, DEFAULT_DISTILLATION_WEIGHT
        )
        super().__init__(**kwargs)
        self.check_finite_inputs = bool(check_finite_inputs)
        # Whether the training step checks its inputs: not on data whose
        # inputs were all checked when they were cached (see `fit`).
        self._step_checks_inputs, self._other_step = True, None
        weighted = kd_losses.as_weighted_losses(losses)
        self._terms = _loss_terms.LossTerms(weighted, student_loss, shared_vocabulary)
        _check_models(teacher, student, self._terms)
        check_temperature(temperature)
        check_distillation_weight(distillation_weight)
        self._student_loss_arg = student_loss
        self._compile_loss_arg = None
        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self.adapters = []  # Made by the feature pairs: trained, never deployed.
        self._features = _feature_pairs.FeaturePairs(
            teacher, student, weighted, owner=_AdapterOwner(self)
        )
        self._first_batch = _data_checks.FirstBatchChecks(
            teacher, student, self._terms, self._features
        )
        # Whether steps are traced with the teacher (see `_teacher_outputs`).
        self._hyperparameters = Owner(self, teacher_on=distillation_weight > 0.0)
        self._temperature = Hyperparameter(
            temperature, "temperature", check_temperature, self._hyperparameters
        )
        self._distillation_weight = Hyperparameter(
            distillation_weight,
            "distillation_weight",
            check_distillation_weight,
            self._hyperparameters,
        )
        # Attributes, so that Keras finds the metrics (see `LossTerms`).
        self.student_loss_tracker = self._terms.trackers.label
        self.distillation_loss_tracker = self._terms.trackers.distillation
        self._term_trackers = self._terms.trackers.terms
        # The epoch (from 0), for losses that warm up; set by `fit`.
        self._epoch = None
        if any(loss.uses_epoch for loss, _ in weighted):
            self._epoch = keras.Variable(
                0.0, trainable=False, dtype="float32", name="epoch"
            )
        self.built = True
        if self._features:
            self._features.prepare_early()

    @property
    def temperature(self):
        """The temperature T, a non-trainable float32 variable."""
        return self._temperature

    @temperature.setter
    def temperature(self, value):
        self._temperature.assign(value)

    @property
    def distillation_weight(self):
        """The distillation weight λ, a non-trainable float32 variable."""
        return self._distillation_weight

    @distillation_weight.setter
    def distillation_weight(self, value):
        self._distillation_weight.assign(value)

    def jax_state_sync(self):
        with self._hyperparameters.write_back():
            super().jax_state_sync()

    @property
    def metrics(self):
        # Compiled metrics wait for a first labeled batch; until then, out.
        unbuilt = _keras_internals.unbuilt_compiled_metrics(self)
        return [m for m in super().metrics if m is not unbuilt]

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Configures training; `loss`, if given, is the student's label loss.

        Compiling again without `loss` goes back to the constructor's
        `student_loss` (or the default), as a recompiled Keras model would.

        Args:
            optimizer: the student's optimizer.
            loss: optional label loss taking logits; the same as passing
                `student_loss` to the constructor, which it must not repeat.
            metrics: metrics computed on the student's logits, such as
                `["accuracy"]`.
            **kwargs: passed on to `keras.Model.compile` (e.g.
                `jit_compile`, `steps_per_execution`).
        """
        self._terms.set_student_loss(self._student_loss_arg, loss)
        self._compile_loss_arg = loss
        self._other_step = None
        metrics = kd_metrics.with_logit_accuracy(metrics)
        if "weighted_metrics" in kwargs:
            kwargs["weighted_metrics"] = kd_metrics.with_logit_accuracy(
                kwargs["weighted_metrics"]
            )
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and self._compile_loss_arg is not None:
            config["loss"] = keras.saving.serialize_keras_object(self._compile_loss_arg)
        return config

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        if self._student_loss_arg is not None:
            config.pop("loss", None)  # Already restored by the constructor.
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def call(self, inputs, training=False):
        inputs, _ = split_cached(inputs)
        step = _step_of(self)
        if step is None or not self._features:
            return self.student(inputs, training=training)
        logits, step.student_features = self._features.run_student(inputs, training)
        return logits

    # The loss, written once for every backend (see `_loss_terms`).

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The combined loss; Keras' training and evaluation steps call it.

        The teacher's logits come from the batch if it was cached, else from
        the teacher (when λ > 0), and are never differentiated. `x` may come
        in the cached form `{"inputs": ..., "teacher_logits": ...}` (the
        TensorFlow training step passes it so, having run the teacher outside
        its gradient tape): an override unpacks it with
        `kd_keras.distiller.split_cached(x)`. Feature losses take the
        student's features from the forward pass of the step's `call`.
        """
        inputs, cached = split_cached(x)
        student_features = self._student_features(inputs, training)
        regularization = _loss_terms.regularization(self)
        step = _step_of(self)
        teacher_logits, teacher_features = self._teacher_outputs(
            inputs, cached, step and step.teacher_features, y_pred
        )
        loss = self._terms.compute(
            y,
            y_pred,
            ops.stop_gradient(teacher_logits),
            sample_weight,
            weight=self._distillation_weight,
            temperature=self._temperature,
            epoch=self._epoch,
            feature_values=self._feature_values(
                teacher_features, student_features, y_pred
            ),
            padding_mask=_loss_terms.padding_mask(inputs),
        )
        self._terms.track(loss, ops.shape(y_pred)[0])
        total = loss.total + regularization
        if not self.check_finite_inputs or (training and not self._step_checks_inputs):
            return total
        # A NaN input can vanish in the forward pass (ReLU maps NaN to 0)
        # while its gradient turns the weights into NaN: the loss reads NaN
        # then too, so that `fit` stops (see `_fit_callbacks`).
        return ops.where(_all_finite(inputs), total, ops.full_like(total, np.nan))

    def _student_features(self, inputs, training):
        """The student's features for the feature losses: those of the
        step's forward pass, or, without one (a direct call of
        `compute_loss`, or an override of `call` that does not run
        `super().call`), those of a new one."""
        if not self._features:
            return None
        step = _step_of(self)
        if step is not None and step.student_features is not None:
            return step.student_features
        return self._features.run_student(inputs, training)[1]

    def _teacher_outputs(self, inputs, cached, cached_features, student_logits):
        """The teacher's float32 logits and features (None without feature
        losses); the teacher runs only when λ > 0.

        A step traced with λ > 0 runs the teacher unconditionally, cheaper
        than a conditional; one traced with λ = 0 still asks λ at run time.
        Either gives the right loss for any λ, so a compiled step that
        outlives a switch (see `_hyperparameters.Owner`) only costs time.
        """
        if cached is not None:
            return ops.cast(cached, "float32"), cached_features
        if self._hyperparameters.teacher_on and self._features:
            logits, features = self._features.run_teacher(inputs)
            return ops.cast(logits, "float32"), [ops.stop_gradient(f) for f in features]

        def run_teacher():
            return ops.cast(self.teacher(inputs, training=False), "float32")

        if self._hyperparameters.teacher_on:
            return run_teacher(), None
        weight = ops.convert_to_tensor(self._distillation_weight)
        # Zeros in the teacher's shape: its vocabulary may be the student's
        # but for padding (see `_vocabulary`).
        classes = _checks.num_classes(self.teacher) or student_logits.shape[-1]
        positions = tuple(ops.shape(student_logits)[:-1])
        return ops.cond(
            weight > 0.0, run_teacher, lambda: ops.zeros((*positions, classes))
        ), None

    def _feature_values(self, teacher_features, student_features, logits):
        if not self._features:
            return None
        if teacher_features is not None:
            return self._features.values(teacher_features, student_features)
        if self._hyperparameters.teacher_on:
            raise self._features.no_teacher_features()
        return self._features.zero_values(ops.shape(logits)[0])  # The term is off.

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if y is None:  # Unlabeled data: label metrics cannot be computed.
            return self.get_metrics_result()
        inputs, _ = split_cached(x)
        weights = _loss_terms.token_weights(y_pred, sample_weight, inputs)
        return super().compute_metrics(x, y, y_pred, weights)

    # The steps: Keras' own, except on TensorFlow (see `_tf_step`).

    def train_step(self, *args, **kwargs):
        with _in_step(self) as step:
            if _backend.name() != "tensorflow":
                return super().train_step(*args, **kwargs)
            logs = _tf_step.train_step(self, *args, self._teacher_outputs, step)
        return _tf_step.per_worker(self.distribute_strategy, logs)

    def test_step(self, *args, **kwargs):
        with _in_step(self):
            logs = super().test_step(*args, **kwargs)
        if _backend.name() != "tensorflow":
            return logs
        return _tf_step.per_worker(self.distribute_strategy, logs)

    def _build_from_first_replica(self, strategy):
        return _keras_internals.in_multi_worker_mode(strategy)

    # Checks on the first batch, before any work is done.

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, with the data checked before the first step.

        Each epoch's logs also get the `temperature` and the
        `distillation_weight` it ended with, so that schedules and early
        stops show in the History; a non-finite loss stops `fit` with an
        error and the student's last finite weights. Both callbacks run
        first, also with a `keras.callbacks.CallbackList`.
        """
        arguments = _fit_arguments(self, x, y, args, kwargs)
        _use_step(self, checks=not _datasets.inputs_checked(x))
        try:
            return super().fit(**arguments)
        finally:  # `train_on_batch` and later fits check again.
            _use_step(self, checks=True)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        # During `fit`, Keras evaluates the validation data (checked once in
        # `fit`) every epoch; only a direct call is checked here.
        if not _keras_internals.validation_during_fit(kwargs):
            self._check_data(x, y, "evaluation data")
        return super().evaluate(x, y, *args, **kwargs)

    def _check_data(self, x, y, what):
        self._first_batch.check(
            x,
            y,
            weight=_backend.concrete_scalar(self._distillation_weight),
            check_finite=self.check_finite_inputs,
            what=what,
            student_loss_arg=self._compile_loss_arg or self._student_loss_arg,
        )

    # Serialisation.

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "teacher": _serialize_model(self.teacher),
            "student": _serialize_model(self.student),
            "temperature": _backend.concrete_scalar(self._temperature),
            "distillation_weight": _backend.concrete_scalar(self._distillation_weight),
            "student_loss": None,
            "check_finite_inputs": self.check_finite_inputs,
            "losses": kd_losses.serialize_weighted(self._terms.weighted),
            "shared_vocabulary": self._terms.shared_vocabulary,
        }
        if self._student_loss_arg is not None:
            config["student_loss"] = keras.saving.serialize_keras_object(
                self._student_loss_arg
            )
        if self._features.prepared:
            # So that loading builds the adapters before their weights load.
            config["feature_shapes"] = [
                [list(t), list(s)] for t, s in self._features.shapes
            ]
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        feature_shapes = config.pop("feature_shapes", None)
        for key in ("teacher", "student", "student_loss"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        if config.get("losses") is not None:
            config["losses"] = kd_losses.deserialize_weighted(
                config["losses"], custom_objects
            )
        distiller = cls(**config)
        if feature_shapes is not None and distiller._features:
            distiller._features.prepare(feature_shapes)
        return distiller


def _fit_arguments(distiller, x, y, args, kwargs):
    """`fit`'s arguments by name, once its data are checked, with the
    Distiller's callbacks added."""
    arguments = inspect.signature(keras.Model.fit).bind(
        distiller, x, y, *args, **kwargs
    )
    arguments.apply_defaults()
    arguments = dict(arguments.arguments)
    del arguments["self"]
    distiller._check_data(x, y, "training data")
    callbacks = arguments["callbacks"]
    if distiller._features and any(
        isinstance(c, keras.callbacks.ModelCheckpoint) and not c.save_weights_only
        for c in _fit_callbacks.given(callbacks)
    ):
        distiller.get_config()  # Raises now if it cannot be saved, not after an epoch.
    validation_data = arguments["validation_data"]
    if isinstance(validation_data, tuple):
        distiller._check_data(*validation_data[:2], "validation data")
    elif validation_data is not None:
        distiller._check_data(validation_data, None, "validation data")
    arguments["callbacks"] = _fit_callbacks.with_fit_callbacks(
        callbacks, distiller, distiller._epoch
    )
    return arguments


def _use_step(distiller, checks):
    """Makes the training step check its inputs, or not (for data checked
    when it was cached). Each kind is compiled once and kept, so that
    fitting on cached data again does not trace its step again."""
    if checks == distiller._step_checks_inputs:
        return
    current = getattr(distiller, "train_function", None)
    distiller.train_function, distiller._other_step = distiller._other_step, current
    distiller._step_checks_inputs = checks


def reads_features(distiller):
    """True if a feature loss of `distiller` reads the teacher's features:
    its data must then come uncached."""
    return bool(distiller._features)


def adapters_pending(distiller):
    """True while feature adapters wait for the first batch to be made (the
    models' input shapes are not fixed)."""
    return bool(distiller._features) and not distiller._features.prepared


class _AdapterOwner:
    """What the feature pairs ask of the Distiller when they make their
    adapters (see `FeaturePairs`)."""

    def __init__(self, distiller):
        self._distiller = weakref.ref(distiller)

    def scope(self):
        return _backend.strategy_scope(self._distiller())

    def optimizer_built(self):
        return getattr(getattr(self._distiller(), "optimizer", None), "built", False)

    def adopt(self, adapters):
        self._distiller().adapters = adapters


def _check_models(teacher, student, terms):
    """Raises unless teacher and student are built models emitting logits of
    the same shape (but for padded vocabularies), for the same inputs, that
    the losses can take."""
    _checks.check_keras_model(teacher, "teacher")
    _checks.check_keras_model(student, "student")
    _checks.check_emits_logits(teacher, "teacher")
    _checks.check_emits_logits(student, "student")
    _checks.check_same_inputs(teacher, student)
    teacher_shape = _checks.output_shape(teacher)
    student_shape = _checks.output_shape(student)
    if teacher_shape and student_shape:
        terms.check_shapes(
            teacher_shape,
            student_shape,
            f" (teacher `{teacher.name}`, student `{student.name}`)",
        )
    if student_shape:
        terms.check_logits_shape(student_shape)


def _all_finite(inputs):
    """A scalar tensor: True unless a dense float input holds NaN or inf.

    The sum of an input (in float32 at least) is finite when its values
    are, unless it overflows: only then are the values checked one by one.
    A sum reads the input once, where an elementwise check also writes a
    mask as large as it.
    """
    checks = [
        _finite(leaf)
        for leaf in keras.tree.flatten(inputs)
        if "float" in str(getattr(leaf, "dtype", ""))
        and not any(kind in type(leaf).__name__ for kind in ("Sparse", "Ragged"))
    ]
    if not checks:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(checks))


def _finite(leaf):
    return ops.cond(
        ops.isfinite(ops.sum(_at_least_float32(leaf))),
        lambda: ops.convert_to_tensor(True),
        lambda: ops.all(ops.isfinite(leaf)),
    )


def _at_least_float32(leaf):
    dtype = str(getattr(leaf, "dtype", ""))
    return leaf if "32" in dtype or "64" in dtype else ops.cast(leaf, "float32")


def _serialize_model(model):
    """Serialises a model without its compile settings.

    The teacher and student are rebuilt inside the Distiller, which has its
    own optimizer, so their own (possibly never built) optimizers are left out.
    """
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    return config
