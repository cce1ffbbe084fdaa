"""The Distiller: a `keras.Model` that trains a student on labels and on a
teacher's softened outputs."""

import inspect

import numpy as np
import keras
from keras import ops

from kd_keras import _checks
from kd_keras import _datasets
from kd_keras.losses import check_distillation_weight
from kd_keras.losses import check_temperature
from kd_keras.losses import per_example_distillation_loss
from kd_keras.losses import reduce_over_batch

# A cached batch carries its inputs and the teacher's logits under these keys
# (see `kd_keras.cache_teacher_logits`).
INPUTS_KEY = "inputs"
TEACHER_LOGITS_KEY = "teacher_logits"


def split_cached(x):
    """Returns `(inputs, teacher_logits)`; the logits are None if not cached."""
    if isinstance(x, dict) and set(x) == {INPUTS_KEY, TEACHER_LOGITS_KEY}:
        return x[INPUTS_KEY], x[TEACHER_LOGITS_KEY]
    return x, None


def _tf():
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "kd_keras.Distiller trains with TensorFlow, but Keras runs on the "
            f"`{keras.backend.backend()}` backend. Set the environment "
            "variable KERAS_BACKEND=tensorflow before importing keras."
        )
    import tensorflow as tf

    return tf


def _num_replicas():
    return _tf().distribute.get_strategy().num_replicas_in_sync


def _first_leaf(structure):
    return keras.tree.flatten(structure)[0]


_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _expects_probabilities(loss):
    """True for a loss object or function that takes probabilities."""
    if isinstance(loss, keras.losses.Loss):
        return getattr(loss, "from_logits", True) is False
    try:
        parameter = inspect.signature(loss).parameters.get("from_logits")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is False


def _check_student_loss(loss):
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
    reduction = getattr(resolved, "reduction", "sum_over_batch_size")
    if isinstance(resolved, keras.losses.Loss) and (
        reduction not in _MEAN_REDUCTIONS
    ):
        raise ValueError(
            "Expected `student_loss` to average over the batch, as the "
            "distillation term does. Received: reduction="
            f"{reduction!r}. Use the default reduction='sum_over_batch_size'."
        )
    return resolved


@keras.saving.register_keras_serializable(package="kd_keras")
class Distiller(keras.Model):
    """Trains a student on the labels and on a teacher's softened outputs.

    The loss is `(1 − λ)·L_student + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))`
    where `t` and `s` are the teacher's and student's logits, `T` is the
    temperature and `λ` the distillation weight. The teacher runs in inference
    mode and outside the gradient tape, and only the student's weights are
    updated. When λ is 0 the teacher is not run at all. Batches made by
    `kd_keras.cache_teacher_logits` carry the teacher's logits, and then the
    teacher is not run either.

    `temperature` and `distillation_weight` are non-trainable variables:
    callbacks may assign new values during `fit`, and the next step uses them
    without retracing.

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
        student_loss: the label loss, a Keras loss that takes logits.
            Defaults to (sparse) categorical cross-entropy from logits,
            chosen by the labels' shape, so integer and one-hot labels both
            work. It may also be given as `loss` to `compile`.

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
        distillation_weight=0.9,
        student_loss=None,
        **kwargs,
    ):
        _tf()
        super().__init__(**kwargs)
        _checks.check_keras_model(teacher, "teacher")
        _checks.check_keras_model(student, "student")
        check_temperature(temperature)
        check_distillation_weight(distillation_weight)
        _checks.check_emits_logits(teacher, "teacher")
        _checks.check_emits_logits(student, "student")
        teacher_shape = _checks.output_shape(teacher)
        student_shape = _checks.output_shape(student)
        if teacher_shape and student_shape and (
            teacher_shape[1:] != student_shape[1:]
        ):
            raise ValueError(
                "Expected the teacher and the student to output logits of the "
                f"same shape. Received: teacher `{teacher.name}` output shape "
                f"{teacher_shape}, student `{student.name}` output shape "
                f"{student_shape}. Give both the same number of classes."
            )
        self._student_loss_arg = student_loss
        self._student_loss = _check_student_loss(student_loss)

        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self._temperature = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(float(temperature)),
            dtype="float32",
            trainable=False,
            autocast=False,
            name="temperature",
        )
        self._distillation_weight = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(float(distillation_weight)),
            dtype="float32",
            trainable=False,
            autocast=False,
            name="distillation_weight",
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(
            name="distillation_loss"
        )
        self.built = True

    # The two hyperparameters are variables; assigning a number validates it.

    @property
    def temperature(self):
        """The temperature T, a non-trainable float32 variable."""
        return self._temperature

    @temperature.setter
    def temperature(self, value):
        value = float(ops.convert_to_numpy(value))
        check_temperature(value)
        self._temperature.assign(value)

    @property
    def distillation_weight(self):
        """The distillation weight λ, a non-trainable float32 variable."""
        return self._distillation_weight

    @distillation_weight.setter
    def distillation_weight(self, value):
        value = float(ops.convert_to_numpy(value))
        check_distillation_weight(value)
        self._distillation_weight.assign(value)

    def _loss_trackers(self):
        return [
            self.loss_tracker,
            self.student_loss_tracker,
            self.distillation_loss_tracker,
        ]

    @property
    def metrics(self):
        own = self._loss_trackers()
        # Keras' own "loss" tracker is replaced by ours. Compiled metrics
        # are built by the first labeled batch; without labels they stay out.
        compiled = [
            m for m in super().metrics
            if m not in own and m.name != "loss" and getattr(m, "built", True)
        ]
        return own + compiled

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Configures training; `loss`, if given, is the student's label loss.

        Args:
            optimizer: the student's optimizer.
            loss: optional label loss taking logits; the same as passing
                `student_loss` to the constructor, which it must not repeat.
            metrics: metrics computed on the student's logits, such as
                `["accuracy"]`.
            **kwargs: passed on to `keras.Model.compile` (e.g.
                `jit_compile`, `steps_per_execution`).
        """
        if loss is not None:
            if self._student_loss_arg is not None and (
                keras.saving.serialize_keras_object(loss)
                != keras.saving.serialize_keras_object(self._student_loss_arg)
            ):
                raise ValueError(
                    "The student loss was given twice: to the Distiller "
                    f"({self._student_loss_arg!r}) and to compile ({loss!r}). "
                    "Pass it once."
                )
            self._student_loss = _check_student_loss(loss)
        self._compile_loss_arg = loss
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and getattr(self, "_compile_loss_arg", None) is not None:
            config["loss"] = keras.saving.serialize_keras_object(
                self._compile_loss_arg
            )
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
        return self.student(inputs, training=training)

    # Training and evaluation.

    def _label_loss(self, y, student_logits, sample_weight):
        if y is None:
            return ops.zeros((), "float32")
        student_logits = ops.cast(student_logits, "float32")
        loss_fn = self._student_loss
        if loss_fn is None:
            loss_fn = self._default_label_loss(y, student_logits)
        if not isinstance(loss_fn, keras.losses.Loss):
            # A plain function returns one loss per example.
            return reduce_over_batch(loss_fn(y, student_logits), sample_weight)
        value = ops.cast(
            loss_fn(y, student_logits, sample_weight=sample_weight), "float32"
        )
        # Keras losses divide by the number of replicas themselves; the
        # terms here are per-replica means, divided once, in `train_step`.
        return value * _num_replicas()

    def _default_label_loss(self, y, student_logits):
        num_classes = student_logits.shape[-1]
        y_shape = tuple(y.shape)
        logits_rank = len(student_logits.shape)
        if len(y_shape) == logits_rank and y_shape[-1] not in (1, None):
            if y_shape[-1] != num_classes:
                raise ValueError(
                    f"The labels have {y_shape[-1]} classes (shape {y_shape}) "
                    f"but the models output {num_classes}. Give one-hot "
                    f"labels of width {num_classes}, or integer class ids."
                )
            if not hasattr(self, "_categorical_loss"):
                self._categorical_loss = keras.losses.CategoricalCrossentropy(
                    from_logits=True
                )
            return self._categorical_loss
        if not hasattr(self, "_sparse_loss"):
            self._sparse_loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            )
        return self._sparse_loss

    def _teacher_logits(self, x, cached, student_logits):
        """The teacher's float32 logits; the teacher runs only when λ > 0."""
        tf = _tf()
        if cached is not None:
            return tf.cast(cached, "float32")

        def run_teacher():
            return tf.cast(self.teacher(x, training=False), "float32")

        def skip_teacher():
            return tf.zeros_like(student_logits, dtype="float32")

        return tf.cond(
            self._distillation_weight > 0.0, run_teacher, skip_teacher
        )

    def _loss_terms(self, x, y, cached, student_logits, sample_weight, tape=None):
        """Returns (total, label, distillation) losses, each a float32 scalar.

        With a `tape`, the teacher runs while the tape is paused, so its
        forward pass is never recorded for differentiation.
        """
        tf = _tf()
        weight = tf.convert_to_tensor(self._distillation_weight)
        if tape is None:
            teacher_logits = self._teacher_logits(x, cached, student_logits)
        else:
            with tape.stop_recording():
                teacher_logits = self._teacher_logits(x, cached, student_logits)
        if tuple(teacher_logits.shape[1:]) != tuple(student_logits.shape[1:]):
            raise ValueError(
                "Expected teacher and student logits of the same shape. "
                f"Received: teacher logits {tuple(teacher_logits.shape)}, "
                f"student logits {tuple(student_logits.shape)}."
            )
        label_loss = self._label_loss(y, student_logits, sample_weight)
        kd_loss = reduce_over_batch(
            per_example_distillation_loss(
                teacher_logits, student_logits, self._temperature
            ),
            sample_weight,
        )
        kd_loss = tf.where(weight > 0.0, kd_loss, tf.zeros_like(kd_loss))
        total = (1.0 - weight) * label_loss + weight * kd_loss
        if self.student.losses:  # Regularisation, as Keras adds it.
            total = total + ops.cast(ops.sum(self.student.losses), "float32")
        return total, label_loss, kd_loss

    def _update_trackers(self, x, total, label_loss, kd_loss):
        batch_size = ops.shape(_first_leaf(x))[0]
        self.loss_tracker.update_state(total, sample_weight=batch_size)
        self.student_loss_tracker.update_state(
            label_loss, sample_weight=batch_size
        )
        self.distillation_loss_tracker.update_state(
            kd_loss, sample_weight=batch_size
        )

    def _metric_logs(self, x, y, student_logits, sample_weight):
        if y is None:  # Unlabeled data: label metrics cannot be computed.
            return {
                tracker.name: tracker.result()
                for tracker in self._loss_trackers()
            }
        return self.compute_metrics(x, y, student_logits, sample_weight)

    def _train_logs(self, x, y, student_logits, sample_weight):
        logs = self._metric_logs(x, y, student_logits, sample_weight)
        # Logged so that schedules and early stops show in the history.
        logs["temperature"] = ops.convert_to_tensor(self._temperature)
        logs["distillation_weight"] = ops.convert_to_tensor(
            self._distillation_weight
        )
        return logs

    def train_step(self, data):
        tf = _tf()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, cached = split_cached(x)
        with tf.GradientTape() as tape:
            student_logits = self.student(x, training=True)
            total, label_loss, kd_loss = self._loss_terms(
                x, y, cached, student_logits, sample_weight, tape=tape
            )
            # Gradients are summed over replicas, so each replica's loss is
            # divided by their number.
            loss = total / _num_replicas()
            loss = self.optimizer.scale_loss(loss)
        variables = self.student.trainable_variables
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        self._update_trackers(x, total, label_loss, kd_loss)
        return self._train_logs(x, y, student_logits, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, cached = split_cached(x)
        student_logits = self.student(x, training=False)
        total, label_loss, kd_loss = self._loss_terms(
            x, y, cached, student_logits, sample_weight
        )
        self._update_trackers(x, total, label_loss, kd_loss)
        return self._metric_logs(x, y, student_logits, sample_weight)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        x, _ = split_cached(x)
        return self.student(x, training=False)

    # Checks on the first batch, before any work is done.

    def fit(self, x=None, y=None, *args, **kwargs):
        self._check_first_batch(x, y)
        validation = kwargs.get("validation_data")
        if validation is not None:
            if isinstance(validation, tuple):
                self._check_first_batch(*validation[:2])
            else:
                self._check_first_batch(validation, None)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        # During `fit`, Keras evaluates the validation data (checked once in
        # `fit`) every epoch; only a direct call is checked here.
        if not kwargs.get("_use_cached_eval_dataset"):
            self._check_first_batch(x, y)
        return super().evaluate(x, y, *args, **kwargs)

    def _check_first_batch(self, x, y):
        batch = _peek_batch(x, y)
        if batch is None:
            return
        inputs, labels = batch
        inputs, cached = split_cached(inputs)
        if labels is None:
            if float(self._distillation_weight.numpy()) < 1.0:
                raise ValueError(
                    "The data has no labels, but the label term has weight "
                    f"1 - distillation_weight = "
                    f"{1.0 - float(self._distillation_weight.numpy()):g}. "
                    "Pass labels, or set `distillation_weight=1.0` to distil "
                    "on an unlabeled transfer set."
                )
        rows = keras.tree.map_structure(lambda a: a[:8], inputs)
        student_logits = ops.convert_to_numpy(self.student(rows))
        num_classes = student_logits.shape[-1]
        _check_not_probabilities(student_logits, "student", self.student.name)
        if cached is not None:
            teacher_logits = np.asarray(cached[:8])
        elif _checks.output_layers(self.teacher) or not float(
            self._distillation_weight.numpy()
        ):
            # Checked at construction, or not run at all.
            teacher_logits = None
        else:
            teacher_logits = ops.convert_to_numpy(self.teacher(rows))
            _check_not_probabilities(
                teacher_logits, "teacher", self.teacher.name
            )
        if teacher_logits is not None and (
            teacher_logits.shape[1:] != student_logits.shape[1:]
        ):
            raise ValueError(
                "Expected teacher and student logits of the same shape. "
                f"Received: teacher logits {teacher_logits.shape[1:]}, "
                f"student logits {student_logits.shape[1:]} per example. "
                "Give both the same number of classes."
            )
        if labels is not None and self._student_loss is None:
            _check_labels(np.asarray(labels), num_classes)

    # Serialisation.

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "teacher": _serialize_model(self.teacher),
            "student": _serialize_model(self.student),
            "temperature": float(ops.convert_to_numpy(self._temperature)),
            "distillation_weight": float(
                ops.convert_to_numpy(self._distillation_weight)
            ),
            "student_loss": None,
        }
        if self._student_loss_arg is not None:
            config["student_loss"] = keras.saving.serialize_keras_object(
                self._student_loss_arg
            )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("teacher", "student", "student_loss"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)


def _serialize_model(model):
    """Serialises a model without its compile settings.

    The teacher and student are rebuilt inside the Distiller, which has its
    own optimizer, so their own (possibly never built) optimizers are left out.
    """
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    return config


def _peek_batch(x, y):
    """Returns up to a few (inputs, labels) rows of fit's data, or None."""
    tf = _tf()
    if isinstance(x, tf.data.Dataset):
        if _datasets.has_cache(x):
            return None
        element = next(iter(x.take(1)))
        inputs, labels, _ = keras.utils.unpack_x_y_sample_weight(element)
        return inputs, labels
    if x is None or not all(
        isinstance(a, (np.ndarray, tf.Tensor))
        for a in keras.tree.flatten(x)
    ):
        return None
    if y is not None and not isinstance(y, (np.ndarray, tf.Tensor, list)):
        return None
    return x, y


def _check_not_probabilities(logits, role, name):
    logits = np.asarray(logits, dtype="float64")
    if logits.ndim < 2 or logits.shape[-1] < 2 or len(logits) == 0:
        return
    sums = logits.sum(axis=-1)
    if logits.min() >= 0.0 and np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(
            f"The {role} `{name}` outputs probabilities (non-negative, rows "
            "summing to 1), but distillation needs logits. Remove its final "
            "softmax, e.g. end it with `Dense(num_classes)` and no activation."
        )


def _check_labels(labels, num_classes):
    labels = np.asarray(labels)
    if labels.ndim >= 2 and labels.shape[-1] not in (1,):
        if labels.shape[-1] != num_classes:
            raise ValueError(
                f"The labels have {labels.shape[-1]} classes (shape "
                f"{labels.shape}) but the models output {num_classes}. Give "
                f"one-hot labels of width {num_classes}, or integer class ids."
            )
        return
    if labels.size == 0:
        return
    low, high = labels.min(), labels.max()
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Expected integer labels in [0, {num_classes}), since the models "
            f"output {num_classes} classes. Received labels from {low} to "
            f"{high}. Relabel the data, or give the models {int(high) + 1} "
            "outputs."
        )
