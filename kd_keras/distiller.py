"""The Distiller: a `keras.Model` that trains a student on labels and on a
teacher's softened outputs, on every Keras backend."""

import inspect
import numbers
import warnings
import weakref

import keras
from keras import ops
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _features
from kd_keras import _hyperparameters
from kd_keras import losses as kd_losses
from kd_keras import metrics as metrics_lib
from kd_keras.losses import check_distillation_weight
from kd_keras.losses import check_same_shape
from kd_keras.losses import check_temperature
from kd_keras.losses import reduce_like_keras

# A cached batch carries its inputs and the teacher's logits under these keys
# (see `kd_keras.cache_teacher_logits`).
INPUTS_KEY = "inputs"
TEACHER_LOGITS_KEY = "teacher_logits"


def split_cached(x):
    """Returns `(inputs, teacher_logits)`; the logits are None if not cached."""
    if isinstance(x, dict) and set(x) == {INPUTS_KEY, TEACHER_LOGITS_KEY}:
        return x[INPUTS_KEY], x[TEACHER_LOGITS_KEY]
    return x, None


DEFAULT_DISTILLATION_WEIGHT = 0.9
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")
_BINARY_LOSSES = (keras.losses.BinaryCrossentropy, keras.losses.BinaryFocalCrossentropy)


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


def _check_student_loss(loss):
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
    if resolved.reduction not in _MEAN_REDUCTIONS:
        raise ValueError(
            "Expected `student_loss` to average over the batch, as the "
            "distillation term does. Received: reduction="
            f"{resolved.reduction!r}. Use reduction='sum_over_batch_size' "
            "(the default) or 'mean_with_sample_weight'."
        )
    return resolved


@keras.saving.register_keras_serializable(package="kd_keras")
class Distiller(keras.Model):
    """Trains a student on the labels and on a teacher's softened outputs.

    The loss is `(1 − λ)·L_student + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))`
    where `t` and `s` are the teacher's and student's logits, `T` is the
    temperature and `λ` the distillation weight. The teacher runs in inference
    mode, its outputs are never differentiated, and only the student's
    weights are updated. When λ is 0 the teacher is not run at all. Batches
    made by `kd_keras.cache_teacher_logits` carry the teacher's logits, and
    then the teacher is not run either.

    It runs on every Keras backend. On TensorFlow the Distiller has its own
    training step, which runs the teacher outside the gradient tape; on JAX
    and PyTorch Keras' own step drives it through `compute_loss`. Both use
    the same loss, written once in `keras.ops`.

    Logits may have any rank `(batch, ..., classes)`, e.g. one per token of
    a sequence: both terms are then means over every position. Positions
    masked by Keras masking, or ignored by the label loss (`ignore_class`),
    are left out of both; a `sample_weight` of shape `(batch, time)` weighs
    each position, and one of shape `(batch,)` all positions of an example.
    The distillation term is reduced exactly as the label loss is (its
    `reduction`, weights and mask). A
    model with a single logit is a binary classifier: its soft targets are
    `sigmoid(t/T)` against `sigmoid(s/T)`, with KD = T²·binary KL, and the
    default label loss is binary cross-entropy from logits.

    `temperature` and `distillation_weight` are non-trainable float32
    variables: callbacks may assign them during `fit`, and the next step uses
    the new value without retracing, except that switching the teacher off
    (λ = 0) or back on traces the step once more. Assigning a value out of
    range raises. On TensorFlow and PyTorch a change takes effect at the next
    step. On JAX, Keras keeps the training state outside the variables
    during an epoch; assigning these variables brings that state back first,
    so a change between two batches takes effect at the next step there too.
    Each epoch's logs get the values the epoch ended with.

    `call` and `predict` run the student; `distiller.student` is the model to
    deploy. Saving `distiller.student` never saves the teacher.

    Args:
        teacher: a built, trained `keras.Model` that outputs logits. It is
            frozen (`teacher.trainable = False`).
        student: a built `keras.Model` with the same output shape, also
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
            so that `fit` stops with an error (see "Bad input" in the
            README). Pass False for inputs that hold them on purpose, such
            as additive `-inf` attention masks.

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

    def __init__(
        self,
        teacher,
        student,
        temperature=4.0,
        distillation_weight=DEFAULT_DISTILLATION_WEIGHT,
        student_loss=None,
        check_finite_inputs=True,
        losses=None,
        **kwargs,
    ):
        losses, distillation_weight = _keras_arguments(
            kwargs, losses, distillation_weight
        )
        super().__init__(**kwargs)
        self.check_finite_inputs = bool(check_finite_inputs)
        self._kd_losses = kd_losses.as_weighted_losses(losses)
        _checks.check_keras_model(teacher, "teacher")
        _checks.check_keras_model(student, "student")
        check_temperature(temperature)
        check_distillation_weight(distillation_weight)
        _checks.check_emits_logits(teacher, "teacher")
        _checks.check_emits_logits(student, "student")
        _checks.check_same_inputs(teacher, student)
        teacher_shape = _checks.output_shape(teacher)
        student_shape = _checks.output_shape(student)
        if teacher_shape and student_shape:
            check_same_shape(
                teacher_shape,
                student_shape,
                f" (teacher `{teacher.name}`, student `{student.name}`)",
            )
        if student_shape:
            for loss, _ in self._kd_losses:
                loss.check_logits_shape(student_shape)
        self._student_loss_arg = student_loss
        self._student_loss = _check_student_loss(student_loss)

        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        # Feature losses: where each pair of features is read, and the
        # adapters (trained with the student, never part of it).
        self._pairs = [
            (
                index,
                _features.Tap(teacher, t, "teacher"),
                _features.Tap(student, s, "student"),
            )
            for index, (loss, _) in enumerate(self._kd_losses)
            if isinstance(loss, kd_losses.FeatureLoss)
            for t, s in loss.layer_pairs()
        ]
        self._captured = _Captured()
        self.adapters = []
        self._adapter_places = [None] * len(self._pairs)
        self._feature_shapes = None
        self._temperature = _hyperparameters.Hyperparameter(
            temperature, "temperature", check_temperature
        )
        self._distillation_weight = _hyperparameters.Hyperparameter(
            distillation_weight, "distillation_weight", check_distillation_weight
        )
        self._state_syncing = False
        for variable in (self._temperature, self._distillation_weight):
            variable._owner = weakref.ref(self)
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")
        # With several losses, each term is logged too.
        self._term_trackers = (
            [
                keras.metrics.Mean(name=f"{loss.name}_loss")
                for loss, _ in self._kd_losses
            ]
            if len(self._kd_losses) > 1
            else []
        )
        # The epoch (from 0), for losses that warm up; set by `fit`.
        self._epoch = None
        if any(loss.uses_epoch for loss, _ in self._kd_losses):
            self._epoch = keras.Variable(
                0.0, trainable=False, dtype="float32", name="epoch"
            )
        self._label_losses = {}
        # Whether steps are traced with the teacher (see `_teacher_logits`).
        self._teacher_on = distillation_weight > 0.0
        self.built = True
        if self._pairs:
            self._prepare_features_early()

    # The two hyperparameters are variables; assigning a number validates it.

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

    def _hyperparameter_assigned(self, variable, value):
        if variable is not self._distillation_weight:
            return
        teacher_on = value > 0.0
        if teacher_on == self._teacher_on:
            return
        # Steps are traced with or without the teacher: trace them again.
        self._teacher_on = teacher_on
        if getattr(self, "train_function", None) is not None:
            self.make_train_function(force=True)
        if getattr(self, "test_function", None) is not None:
            self.make_test_function(force=True)

    def _sync_training_state(self):
        """On JAX, mid-epoch, writes the training state back to the
        variables, so that they can be read and assigned."""
        if getattr(self, "_jax_state_synced", True) or self._state_syncing:
            return
        self.jax_state_sync()

    def jax_state_sync(self):
        # Keras' JAX trainer assigns every variable here; the flag keeps
        # those assignments from asking for another sync.
        self._state_syncing = True
        try:
            super().jax_state_sync()
        finally:
            self._state_syncing = False

    @property
    def metrics(self):
        # Compiled metrics are built by the first labeled batch; without
        # labels they stay out.
        compiled = getattr(self, "_compile_metrics", None)
        return [
            m
            for m in super().metrics
            if not (m is compiled and not getattr(m, "built", True))
        ]

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
        if (
            loss is not None
            and self._student_loss_arg is not None
            and (
                keras.saving.serialize_keras_object(loss)
                != keras.saving.serialize_keras_object(self._student_loss_arg)
            )
        ):
            raise ValueError(
                "The student loss was given twice: to the Distiller "
                f"({self._student_loss_arg!r}) and to compile ({loss!r}). "
                "Pass it once."
            )
        self._student_loss = _check_student_loss(
            loss if loss is not None else self._student_loss_arg
        )
        self._compile_loss_arg = loss
        metrics = metrics_lib.with_logit_accuracy(metrics)
        if "weighted_metrics" in kwargs:
            kwargs["weighted_metrics"] = metrics_lib.with_logit_accuracy(
                kwargs["weighted_metrics"]
            )
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and getattr(self, "_compile_loss_arg", None) is not None:
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
        if not self._pairs:
            return self.student(inputs, training=training)
        taps = [student for _, _, student in self._pairs]
        logits, features = _run_with_features(self.student, taps, inputs, training)
        # For `compute_loss` with these logits; the teacher's are set when
        # the teacher runs.
        self._captured.set(logits, features)
        return logits

    # Features, for feature losses.

    def _prepare_features_early(self):
        """Builds the adapters at construction when the models' input shape
        is known, so that a saved Distiller loads its adapters' weights;
        otherwise the first batch of `fit` or `evaluate` builds them."""
        shapes = _checks.input_shapes(self.student)
        if not shapes or len(shapes) != 1 or None in shapes[0][1:]:
            return
        rows = np.zeros((2, *shapes[0][1:]), "float32")
        try:
            features = self._eager_features(rows, check=False)
        except Exception:  # The first batch names what fails.
            return
        self._prepare_features([(t.shape, s.shape) for t, s in features])

    def _eager_features(self, rows, check=True):
        """`[(teacher feature, student feature)]` of every pair, on `rows`."""
        teacher = [t for _, t, _ in self._pairs]
        student = [s for _, _, s in self._pairs]
        _, teacher_features = _run_with_features(
            self.teacher, teacher, rows, False, check
        )
        _, student_features = _run_with_features(
            self.student, student, rows, False, check
        )
        return list(zip(teacher_features, student_features, strict=True))

    def _prepare_features_from_spec(self, x, what):
        """Prepares the features from a tf.data pipeline's element spec,
        for data whose first batch is not read (a `.cache()`); refuses
        cached logits, and data that gives no shapes when an adapter needs
        them."""
        spec = getattr(x, "element_spec", None) if _backend.is_tf_dataset(x) else None
        inputs = spec[0] if isinstance(spec, tuple) else spec
        inputs, cached = split_cached(inputs) if inputs is not None else (None, None)
        if cached is not None:
            raise self._no_teacher_features(what)
        needs_adapter = any(loss.needs_adapter for _, loss in self._feature_losses())
        if self._feature_shapes is not None or not needs_adapter:
            return  # Shapes are checked when the step is traced.
        leaves = keras.tree.flatten(inputs) if inputs is not None else []
        if leaves and all(
            getattr(leaf, "shape", None) is not None
            and None not in tuple(leaf.shape)[1:]
            and leaf.dtype.is_numeric
            for leaf in leaves
        ):
            rows = keras.tree.map_structure(
                lambda leaf: np.zeros([2, *leaf.shape[1:]], leaf.dtype.as_numpy_dtype),
                inputs,
            )
            self._check_features(rows, None, what)
            return
        raise ValueError(
            f"{', '.join(self._feature_loss_names())} needs the shapes of the "
            f"features before training, but the first batch of the {what} "
            "cannot be read ahead (a generator, or a `.cache()` pipeline "
            "without fixed shapes). Pass arrays, a PyDataset or a "
            "tf.data.Dataset, or build the student and the teacher with "
            "`keras.Input` of a fixed shape."
        )

    def _prepare_features(self, shapes):
        """Checks each pair's shapes and makes its adapter, once."""
        if self._feature_shapes is not None:
            return
        shapes = [(tuple(t), tuple(s)) for t, s in shapes]
        adapters = []
        for (index, teacher, student), (teacher_shape, student_shape) in zip(
            self._pairs, shapes, strict=True
        ):
            loss = self._kd_losses[index][0]
            try:
                adapter = loss.prepare(teacher_shape, student_shape)
            except ValueError as error:
                raise ValueError(
                    f"{type(loss).__name__} `{loss.name}`, teacher layer "
                    f"`{teacher.name}` and student layer `{student.name}`: {error}"
                ) from None
            adapters.append(adapter)
        if any(a is not None for a in adapters) and getattr(
            getattr(self, "optimizer", None), "built", False
        ):
            raise ValueError(
                "The feature adapters are built on the first batch (the "
                "models' input shape is not fixed), but the optimizer was "
                "already built without them. Compile the Distiller again "
                "before `fit`, without building its optimizer."
            )
        with _backend.strategy_scope(self):
            for adapter, (_, student_shape) in zip(adapters, shapes, strict=True):
                if adapter is not None:
                    adapter.build((None, *student_shape[1:]))
        self.adapters = [a for a in adapters if a is not None]
        # Each pair's adapter, by its place in `self.adapters`.
        places = iter(range(len(self.adapters)))
        self._adapter_places = [None if a is None else next(places) for a in adapters]
        self._feature_shapes = shapes

    def _check_features(self, rows, cached, what):
        """Runs both models on the first rows, checks every feature, builds
        the adapters and computes the feature losses once."""
        if cached is not None:
            raise self._no_teacher_features(what)
        features = self._eager_features(rows)
        self._prepare_features([(t.shape, s.shape) for t, s in features])
        for (_, teacher, student), place, (t, s) in zip(
            self._pairs, self._adapter_places, features, strict=True
        ):
            adapted = None if place is None else self.adapters[place](s).shape
            if adapted is not None and tuple(adapted[1:]) != tuple(t.shape[1:]):
                raise ValueError(
                    f"The adapter of student layer `{student.name}` maps its "
                    f"feature to shape {tuple(adapted)}, not to the shape of "
                    f"teacher layer `{teacher.name}`, {tuple(t.shape)}. Give "
                    "an adapter whose output has the teacher's shape."
                )
        for index, loss in self._feature_losses():
            chosen = [features[k] for k in self._pairs_of(index)]
            try:
                loss.per_example(
                    [t for t, _ in chosen],
                    [s for _, s in chosen],
                    self._adapters_of(index),
                )
            except Exception as error:  # Whatever the loss raises, with shapes.
                shapes = [(tuple(t.shape), tuple(s.shape)) for t, s in chosen]
                raise ValueError(
                    f"{type(loss).__name__} `{loss.name}` fails on the first "
                    f"batch of the {what}, with (teacher, student) features of "
                    f"shapes {shapes}: {error}"
                ) from error

    def _feature_losses(self):
        return [
            (index, loss)
            for index, (loss, _) in enumerate(self._kd_losses)
            if isinstance(loss, kd_losses.FeatureLoss)
        ]

    def _feature_loss_names(self):
        return sorted({type(loss).__name__ for _, loss in self._feature_losses()})

    def _no_teacher_features(self, what="batch"):
        return ValueError(
            f"{', '.join(self._feature_loss_names())} compares the teacher's "
            f"features, but the {what} carries cached teacher logits, which "
            "hold no features. Pass the data without `cache_teacher_logits`: "
            "the teacher then runs on the fly."
        )

    def _pairs_of(self, index):
        """The places in `self._pairs` of the loss at `index`'s pairs."""
        return [k for k, (i, _, _) in enumerate(self._pairs) if i == index]

    def _adapters_of(self, index):
        places = (self._adapter_places[k] for k in self._pairs_of(index))
        return [None if place is None else self.adapters[place] for place in places]

    # The loss, written once for every backend.

    def _label_loss_fn(self, y, student_logits):
        """The label loss: the user's, or cross-entropy chosen by shapes."""
        if self._student_loss is not None:
            return self._student_loss
        if student_logits.shape[-1] == 1:
            kind = "binary"
        elif _one_hot(y, student_logits):
            kind = "categorical"
        else:
            kind = "sparse"
        if kind not in self._label_losses:
            self._label_losses[kind] = {
                "binary": keras.losses.BinaryCrossentropy,
                "categorical": keras.losses.CategoricalCrossentropy,
                "sparse": keras.losses.SparseCategoricalCrossentropy,
            }[kind](from_logits=True)
        return self._label_losses[kind]

    def _teacher_logits(self, inputs, cached, student_logits):
        """The teacher's float32 logits; the teacher runs only when λ > 0.

        Whether λ > 0 is decided when the step is traced, and an assignment
        that switches the teacher on or off traces the step again: a step
        with λ > 0 runs the teacher unconditionally, which is cheaper than a
        conditional. A step traced with λ = 0 still asks λ at run time, so
        a λ set inside a compiled step cannot leave the teacher off. Either
        step gives the right loss for any λ (the KD term is zeroed when
        λ = 0), so a compiled step that outlives its switch, which JAX's
        trace cache could keep while something holds the old function, only
        costs time.
        """
        if cached is not None:
            return ops.cast(cached, "float32")

        def run_teacher():
            return ops.cast(self.teacher(inputs, training=False), "float32")

        if self._teacher_on and self._pairs:
            logits, features = _run_with_features(
                self.teacher, [t for _, t, _ in self._pairs], inputs, False
            )
            self._captured.teacher = [ops.stop_gradient(f) for f in features]
            return ops.cast(logits, "float32")
        if self._teacher_on:
            return run_teacher()

        def skip_teacher():
            return ops.zeros_like(student_logits, dtype="float32")

        return ops.cond(
            ops.convert_to_tensor(self._distillation_weight) > 0.0,
            run_teacher,
            skip_teacher,
        )

    def _regularization(self):
        """The student's regularisation losses, as Keras' `compute_loss`
        adds them (divided by the replicas, as the loss terms are).

        An activity regulariser of the teacher, which may have run by now,
        is left out: the teacher does not train.
        """
        teacher_losses = {id(loss) for loss in self.teacher.losses}
        losses = [loss for loss in self.losses if id(loss) not in teacher_losses]
        if not losses:
            return ops.zeros((), "float32")
        total = ops.sum([ops.cast(ops.sum(loss), "float32") for loss in losses])
        return total / _backend.num_replicas()

    def _label_values(self, label_fn, y, student_logits):
        """The label loss at every position, before its reduction, as a
        `keras.losses.Loss` computes it (in the loss's dtype)."""
        dtype = label_fn.dtype
        y = keras.tree.map_structure(lambda t: ops.convert_to_tensor(t, dtype=dtype), y)
        logits = ops.convert_to_tensor(student_logits, dtype=dtype)
        if (
            isinstance(label_fn, _BINARY_LOSSES)
            and ops.is_tensor(y)
            and (len(y.shape) == len(logits.shape) - 1)
        ):
            # Binary labels (batch, ...) for logits (batch, ..., 1): without
            # the axis, Keras' binary losses would average over positions.
            y = ops.expand_dims(y, -1)
        return label_fn.call(y, logits)

    def _total_loss(
        self, y, student_logits, teacher_logits, sample_weight, regularization
    ):
        """`(1 − λ)·label + λ·KD + regularisation`, tracked for the logs.

        Both terms are computed at every position and reduced by the same
        function, with the label loss's reduction, the sample weights and
        one mask: the student logits' Keras mask, together with any mask the
        label loss sets itself (such as `ignore_class`).
        """
        check_same_shape(teacher_logits.shape, student_logits.shape)
        weight = ops.convert_to_tensor(self._distillation_weight)
        mask = _backend.keras_mask(student_logits)
        term_values = self._term_values(y, student_logits, teacher_logits)
        kd_values = term_values[0]
        if y is None:
            reduction = getattr(self._student_loss, "reduction", "sum_over_batch_size")
            label_loss = ops.zeros((), "float32")
        else:
            label_fn = self._label_loss_fn(y, student_logits)
            reduction = label_fn.reduction
            label_values = self._label_values(label_fn, y, student_logits)
            label_mask = _backend.keras_mask(label_values)
            if label_mask is not None and mask is not None:
                label_mask = ops.logical_and(
                    ops.cast(label_mask, "bool"), ops.cast(mask, "bool")
                )
            elif label_mask is None:
                label_mask = mask
            label_loss = reduce_like_keras(
                label_values, sample_weight, label_mask, reduction
            )
            if len(label_values.shape) == len(kd_values.shape):
                mask = label_mask
        terms = [
            reduce_like_keras(values, sample_weight, mask, reduction)
            for values in term_values
        ]
        kd_loss = ops.sum(
            ops.stack(
                [w * term for (_, w), term in zip(self._kd_losses, terms, strict=True)]
            )
        )
        kd_loss = ops.where(weight > 0.0, kd_loss, ops.zeros_like(kd_loss))
        total = (1.0 - weight) * label_loss + weight * kd_loss + regularization

        # The terms are per-replica shares of the loss; the logs show it whole.
        replicas = _backend.num_replicas()
        batch_size = ops.shape(student_logits)[0]
        self.student_loss_tracker.update_state(
            label_loss * replicas, sample_weight=batch_size
        )
        self.distillation_loss_tracker.update_state(
            kd_loss * replicas, sample_weight=batch_size
        )
        for tracker, term in zip(self._term_trackers, terms, strict=False):
            tracker.update_state(term * replicas, sample_weight=batch_size)
        return total

    def _term_values(self, y, student_logits, teacher_logits):
        """Each distillation loss at every position, before its reduction."""
        labels = None
        if any(loss.needs_labels for loss, _ in self._kd_losses):
            if y is None:
                names = [
                    type(loss).__name__
                    for loss, _ in self._kd_losses
                    if loss.needs_labels
                ]
                raise ValueError(
                    f"{', '.join(names)} needs the labels, but the data has "
                    "none. Pass labeled data, or a loss that needs no labels "
                    "such as `SoftTargets()`."
                )
            labels = _class_ids(y, student_logits)
        return [
            self._feature_values(index, loss, student_logits)
            if isinstance(loss, kd_losses.FeatureLoss)
            else loss.per_position(
                teacher_logits,
                student_logits,
                self._temperature if loss.temperature is None else loss.temperature,
                labels=labels,
                epoch=self._epoch,
            )
            for index, (loss, _) in enumerate(self._kd_losses)
        ]

    def _feature_values(self, index, loss, student_logits):
        """A feature loss per example, spread over the logits' positions."""
        positions = ops.shape(student_logits)[:-1]
        if self._captured.teacher is None:
            if self._teacher_on:
                raise self._no_teacher_features()
            # λ = 0: the term is off. Its adapters get zero gradients
            # rather than none, which Keras would warn about.
            untouched = [
                ops.sum(v) for a in self.adapters for v in a.trainable_variables
            ]
            return ops.zeros(positions, "float32") + 0.0 * ops.sum(
                ops.stack(untouched or [ops.zeros(())])
            )
        chosen = self._pairs_of(index)
        values = loss.per_example(
            [self._captured.teacher[k] for k in chosen],
            [self._captured.student[k] for k in chosen],
            self._adapters_of(index),
        )
        rank = len(student_logits.shape)
        values = ops.reshape(ops.cast(values, "float32"), (-1,) + (1,) * (rank - 2))
        return values * ops.ones(positions, "float32")

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The combined loss; Keras' training and evaluation steps call it.

        The teacher's logits come from the batch if it was cached, else from
        the teacher (when λ > 0), and are never differentiated. `x` may come
        in the cached form `{"inputs": ..., "teacher_logits": ...}` (the
        TensorFlow training step passes it so, having run the teacher outside
        its gradient tape): an override unpacks it with
        `kd_keras.distiller.split_cached(x)`.
        """
        inputs, cached = split_cached(x)
        if self._pairs and self._captured.logits is not y_pred:
            # Not the logits of the last `call` (a direct call, or logits an
            # override changed): read the student's features again.
            taps = [student for _, _, student in self._pairs]
            self._captured.logits = y_pred
            self._captured.student = _run_with_features(
                self.student, taps, inputs, training
            )[1]
        regularization = self._regularization()
        teacher_logits = ops.stop_gradient(self._teacher_logits(inputs, cached, y_pred))
        total = self._total_loss(
            y, y_pred, teacher_logits, sample_weight, regularization
        )
        self._captured.set(None, None)  # Used once; keeps no tensors alive.
        if not self.check_finite_inputs:
            return total
        # A NaN input can vanish in the forward pass (ReLU maps NaN to 0)
        # while its gradient turns the weights into NaN: the loss reads NaN
        # then too, so that `fit` stops (see `_StopOnNonFinite`).
        return ops.where(_all_finite(inputs), total, ops.full_like(total, np.nan))

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if y is None:  # Unlabeled data: label metrics cannot be computed.
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def train_step(self, *args, **kwargs):
        if _backend.name() != "tensorflow":
            # Keras' own step calls `compute_loss`.
            return super().train_step(*args, **kwargs)
        return self._per_worker(self._tensorflow_train_step(*args, **kwargs))

    def test_step(self, *args, **kwargs):
        logs = super().test_step(*args, **kwargs)
        return self._per_worker(logs) if _backend.name() == "tensorflow" else logs

    # Keras 3 on TensorFlow fails under several workers
    # (`MultiWorkerMirroredStrategy`) in two places: it builds the model
    # from the mean of a distributed batch, which an eager collective cannot
    # take, and it reduces scalar logs along axis 0. The Distiller builds
    # from the first replica's batch (only shapes matter) and gives each
    # log a leading axis of one, whose mean over workers is the value Keras
    # expects.

    def _per_worker(self, logs):
        if not _backend.multi_worker(self.distribute_strategy):
            return logs
        return keras.tree.map_structure(lambda v: ops.expand_dims(v, 0), logs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and _backend.multi_worker(self.distribute_strategy):
            for _, _, batches in iterator:
                data_batch = _backend.first_replica(
                    self.distribute_strategy, next(batches)
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _tensorflow_train_step(self, data):
        """Keras' TensorFlow step, with the teacher outside the tape.

        The teacher's logits reach `compute_loss` as cached logits, so the
        loss (and any override of `compute_loss`) is the one other backends
        use.
        """
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        inputs, cached = split_cached(x)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            with tape.stop_recording():
                teacher_logits = self._teacher_logits(inputs, cached, y_pred)
            loss = self._compute_loss(
                x={INPUTS_KEY: inputs, TEACHER_LOGITS_KEY: teacher_logits},
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
            self._loss_tracker.update_state(
                loss * _backend.num_replicas(), sample_weight=tf.shape(y_pred)[0]
            )
            loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_weights
        if variables:
            gradients = tape.gradient(loss, variables)
            self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        else:
            warnings.warn("The student has no trainable weights.", stacklevel=2)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    # Checks on the first batch, before any work is done.

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        **kwargs,
    ):
        """`keras.Model.fit`, with the data checked before the first step.

        Each epoch's logs also get the `temperature` and the
        `distillation_weight` it ended with, so that schedules and early
        stops show in the History.
        """
        self._check_first_batch(x, y)
        given = getattr(callbacks, "callbacks", callbacks) or ()  # Or a CallbackList.
        if self._pairs and any(
            isinstance(c, keras.callbacks.ModelCheckpoint) and not c.save_weights_only
            for c in given
        ):
            self.get_config()  # Raises now if it cannot be saved, not after an epoch.
        if validation_data is not None:
            if isinstance(validation_data, tuple):
                self._check_first_batch(*validation_data[:2], "validation data")
            else:
                self._check_first_batch(validation_data, None, "validation data")
        if callbacks is None or isinstance(callbacks, (list, tuple)):
            # First, so that it logs the values the epoch trained with, and
            # stops on a non-finite loss before another callback saves.
            callbacks = [
                _hyperparameters.LogHyperparameters(),
                _StopOnNonFinite(),
                *(callbacks or ()),
            ]
        return super().fit(
            x,
            y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_split=validation_split,
            validation_data=validation_data,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, *args, **kwargs):
        # During `fit`, Keras evaluates the validation data (checked once in
        # `fit`) every epoch; only a direct call is checked here.
        if not kwargs.get("_use_cached_eval_dataset"):
            self._check_first_batch(x, y, "evaluation data")
        return super().evaluate(x, y, *args, **kwargs)

    def _check_first_batch(self, x, y, what="training data"):
        batch = _checks.peek_batch(x, y, what)
        if batch is None and self._pairs:
            self._prepare_features_from_spec(x, what)
        if batch is None:
            return
        inputs, labels = batch
        inputs, cached = split_cached(inputs)
        if self.check_finite_inputs:
            for leaf in keras.tree.flatten(inputs):
                _checks.check_finite(leaf, f"inputs of the {what}")
        _checks.check_batched(inputs, self.student, "student", what)
        weight = _backend.concrete_scalar(self._distillation_weight)
        if labels is None and weight < 1.0:
            raise ValueError(
                "The data has no labels, but the label term has weight "
                f"1 - distillation_weight = {1.0 - weight:g}. Pass labels, "
                "or set `distillation_weight=1.0` to distil on an unlabeled "
                "transfer set."
            )
        needy = [
            type(loss).__name__ for loss, _ in self._kd_losses if loss.needs_labels
        ]
        if labels is None and needy:
            raise ValueError(
                f"{', '.join(needy)} needs the labels, but the {what} has none. "
                "Pass labeled data, or a loss that needs no labels such as "
                "`kd_keras.losses.SoftTargets()`."
            )
        rows = keras.tree.map_structure(lambda a: a[: _checks.PEEK_ROWS], inputs)
        student_logits = _first_logits(self.student, "student", rows, what)
        for loss, _ in self._kd_losses:
            loss.check_logits_shape(student_logits.shape)
        if self._pairs:
            self._check_features(rows, cached, what)
        _checks.check_not_probabilities(student_logits, "student", self.student.name)
        if cached is not None:
            teacher_logits = np.asarray(cached[: _checks.PEEK_ROWS])
            _checks.check_finite(cached, f"cached teacher logits of the {what}")
        elif _checks.output_layers(self.teacher) or not weight:
            # Checked at construction, or not run at all.
            teacher_logits = None
        else:
            teacher_logits = _first_logits(self.teacher, "teacher", rows, what)
            _checks.check_not_probabilities(
                teacher_logits, "teacher", self.teacher.name
            )
        if teacher_logits is not None:
            check_same_shape(
                teacher_logits.shape[1:], student_logits.shape[1:], " per example"
            )
        if labels is None:
            return
        if self._student_loss is None:
            _checks.check_labels(labels, student_logits.shape)
        else:
            _checks.check_finite(labels, f"labels of the {what}")
            self._check_student_loss_on(labels[: _checks.PEEK_ROWS], student_logits)

    def _check_student_loss_on(self, labels, student_logits):
        """Runs the user's label loss on the first rows, so that labels it
        cannot take fail here, with a message, rather than in the step."""
        loss = self._student_loss
        given = self._student_loss_arg
        name = given if isinstance(given, str) else getattr(given, "__name__", None)
        name = name or type(given).__name__
        if (
            isinstance(loss, _CATEGORICAL_LOSSES)
            and student_logits.shape[-1] > 1
            and np.ndim(labels) < student_logits.ndim
        ):
            raise ValueError(
                f"`student_loss` {name} takes one-hot labels of shape "
                f"{_checks.batch_shape(student_logits.shape[1:])}, but the "
                f"labels are class ids of shape {np.shape(labels)}. Pass "
                "`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`"
                ", or one-hot labels (`keras.utils.to_categorical`)."
            )
        try:
            loss(labels, student_logits)
        except Exception as error:  # Anything the loss raises, with context.
            raise ValueError(
                f"`student_loss` {name} fails on the first batch, with labels "
                f"of shape {np.shape(labels)} and student logits of shape "
                f"{student_logits.shape}: {error}"
            ) from error

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
            "losses": [
                [keras.saving.serialize_keras_object(loss), weight]
                for loss, weight in self._kd_losses
            ],
        }
        if self._student_loss_arg is not None:
            config["student_loss"] = keras.saving.serialize_keras_object(
                self._student_loss_arg
            )
        if self._feature_shapes is not None:
            # So that loading builds the adapters before their weights load.
            config["feature_shapes"] = [
                [list(t), list(s)] for t, s in self._feature_shapes
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
            config["losses"] = [
                (
                    keras.saving.deserialize_keras_object(
                        loss, custom_objects=custom_objects
                    ),
                    weight,
                )
                for loss, weight in config["losses"]
            ]
        distiller = cls(**config)
        if feature_shapes is not None and distiller._pairs:
            distiller._prepare_features(feature_shapes)
        return distiller


def _keras_arguments(kwargs, losses, distillation_weight):
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
    if losses is not None or distillation_weight != DEFAULT_DISTILLATION_WEIGHT:
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


class _Captured:
    """The features read in the current step, with the student logits they
    go with (a plain object, which Keras does not track)."""

    logits = student = teacher = None

    def set(self, logits, student):
        self.logits, self.student, self.teacher = logits, student, None


def _run_with_features(model, taps, inputs, training, check=False):
    """Runs `model` and returns its outputs and the features of `taps`, read
    in the same forward pass."""
    layers = [tap.layer for tap in taps if tap.layer is not None]
    with _features.capture(layers) as recorded:
        outputs = model(inputs, training=training)
    return outputs, [tap.feature(recorded, inputs, check) for tap in taps]


def _one_hot(y, logits):
    """True for one-hot (or soft) labels: the logits' rank, a class axis."""
    return len(y.shape) == len(logits.shape) and y.shape[-1] != 1


def _class_ids(y, logits):
    """Class ids of the logits' shape without the class axis, from integer
    or one-hot labels."""
    y = ops.convert_to_tensor(y)
    if _one_hot(y, logits):
        return ops.argmax(y, axis=-1)
    if len(y.shape) == len(logits.shape):
        y = ops.squeeze(y, axis=-1)
    return ops.cast(y, "int32")


def _all_finite(inputs):
    """A scalar tensor: True unless a dense float input holds NaN or inf."""
    checks = [
        ops.all(ops.isfinite(leaf))
        for leaf in keras.tree.flatten(inputs)
        if "float" in str(getattr(leaf, "dtype", ""))
        and not any(kind in type(leaf).__name__ for kind in ("Sparse", "Ragged"))
    ]
    if not checks:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(checks))


class _StopOnNonFinite(keras.callbacks.Callback):
    """Stops `Distiller.fit` after the first non-finite loss, or after an
    epoch that left the student with non-finite weights, with an error that
    says where; the student gets back the weights it had at the start of
    that epoch, the last ones known finite. Keras' `TerminateOnNaN`, with
    the weights kept. The batch hook only takes note (it is safe to run
    asynchronously, so it never makes a step wait); the epoch's end, which
    Keras reaches right after `stop_training`, restores and raises."""

    def __init__(self):
        super().__init__()
        self.async_safe = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._bad = None
        self._weights = self.model.student.get_weights()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if self._bad is None and loss is not None and not np.isfinite(loss):
            self._bad = f"the loss is {loss} at batch {batch + 1}"
            # The private attribute: on JAX, `self.model` would sync state.
            self._model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        student = self.model.student
        if self._bad is None and all(
            np.isfinite(w).all() for w in student.get_weights()
        ):
            return
        what = self._bad or "the student's weights turned non-finite during"
        student.set_weights(self._weights)
        raise FloatingPointError(
            f"Training stopped: {what} of epoch {epoch + 1} (counted from 1, "
            "as Keras prints them). The student has the weights it had at "
            "the start of that epoch, the last ones known finite; the "
            "optimizer's state may not be, so compile again before training "
            "on. Look for NaN or infinite inputs, labels or teacher logits, "
            "or lower the learning rate."
        )


_CATEGORICAL_LOSSES = (
    keras.losses.CategoricalCrossentropy,
    keras.losses.CategoricalFocalCrossentropy,
    keras.losses.CategoricalHinge,
    keras.losses.KLDivergence,
)


def _first_logits(model, role, rows, what):
    """The model's logits on the first rows of the data, as NumPy; raises,
    naming the model and the data, if the model cannot take them."""
    try:
        return ops.convert_to_numpy(model(rows))
    except Exception as error:  # Whatever the model raises, with context.
        shapes = keras.tree.map_structure(np.shape, rows)
        raise ValueError(
            f"The {role} `{model.name}` fails on the first batch of the {what} "
            f"(inputs of shape {shapes}): {error}"
        ) from error


def _serialize_model(model):
    """Serialises a model without its compile settings.

    The teacher and student are rebuilt inside the Distiller, which has its
    own optimizer, so their own (possibly never built) optimizers are left out.
    """
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    return config
