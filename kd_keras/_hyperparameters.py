"""The Distiller's temperature and distillation weight: range-checked
variables that tell their owner when they change."""

import contextlib
import weakref

import keras

from kd_keras import _backend
from kd_keras import _keras_internals
from kd_keras.losses import check_scalar


class Owner:
    """The Distiller's side of its temperature and distillation weight.

    A step is traced with the teacher on (λ > 0) or off, so an assignment
    that switches it traces the Distiller's steps again. On JAX, Keras
    keeps the training state outside the variables during an epoch: reading
    or assigning a hyperparameter there first writes that state back, so a
    change between two batches takes effect at the next step on every
    backend.

    Args:
        model: the Distiller (held by a weak reference).
        teacher_on: whether steps are traced with the teacher (λ > 0).
    """

    def __init__(self, model, teacher_on):
        self._model = weakref.ref(model)
        self.teacher_on = teacher_on
        self.writing_back = False

    @contextlib.contextmanager
    def write_back(self):
        """While Keras writes its training state back to the variables:
        values they had, not checked."""
        self.writing_back = True
        try:
            yield
        finally:
            self.writing_back = False

    def sync(self):
        """Brings back the training state, before a read or an assignment
        outside a compiled step."""
        model = self._model()
        if (
            model is None
            or self.writing_back
            or _keras_internals.in_stateless_scope()
            or _keras_internals.jax_state_synced(model)
        ):
            return
        model.jax_state_sync()

    def assigned(self, variable, number):
        """After a concrete assignment: traces the steps again if λ switched
        the teacher on or off."""
        model = self._model()
        if model is None or variable is not model.distillation_weight:
            return
        if (number > 0.0) == self.teacher_on:
            return
        self.teacher_on = number > 0.0
        if getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)
        if getattr(model, "test_function", None) is not None:
            model.make_test_function(force=True)


class Hyperparameter(keras.Variable):
    """A float32 scalar variable that refuses values out of its range.

    Assigning a number or a concrete tensor validates it first, so
    `distiller.temperature.assign(0.0)` raises instead of turning the loss
    into NaN. A value computed inside a compiled step cannot be read there,
    and is not checked.

    Args:
        value: the initial value.
        name: the variable's name.
        check: a function that raises on a value out of range.
        owner: the Distiller's `Owner`, or None.
    """

    def __init__(self, value, name, check, owner=None):
        self._check = check
        self._owner = owner
        check(value)
        super().__init__(
            keras.initializers.Constant(float(value)),
            shape=(),
            dtype="float32",
            trainable=False,
            autocast=False,
            name=name,
        )

    def assign(self, value):
        owner = self._owner
        if owner is not None and owner.writing_back:
            return super().assign(value)
        number = check_scalar(value, self._check, self.name)
        if owner is not None:
            owner.sync()
        result = super().assign(value)
        if owner is not None and number is not None:
            owner.assigned(self, number)
        return result

    if _backend.name() == "jax":

        @property
        def value(self):
            if self._owner is not None and _keras_internals.held_by_training_state(
                self
            ):
                self._owner.sync()
            return super().value
