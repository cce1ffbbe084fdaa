"""The Distiller's temperature and distillation weight: range-checked
variables, and the callback that logs them each epoch."""

import keras

from kd_keras import _backend
from kd_keras.losses import check_scalar


class Hyperparameter(keras.Variable):
    """A float32 scalar variable that refuses values out of its range.

    Assigning a number or a concrete tensor validates it first, so
    `distiller.temperature.assign(0.0)` raises instead of turning the loss
    into NaN. A value computed inside a compiled step cannot be read there,
    and is not checked.
    """

    def __init__(self, value, name, check):
        self._check = check
        self._owner = None
        check(value)
        super().__init__(
            keras.initializers.Constant(float(value)),
            shape=(),
            dtype="float32",
            trainable=False,
            autocast=False,
            name=name,
        )

    def _distiller(self):
        """The Distiller that owns the variable (held by a weak reference)."""
        return self._owner() if self._owner is not None else None

    def _sync_owner(self):
        distiller = self._distiller()
        if distiller is not None and not _backend.in_stateless_scope():
            distiller._sync_training_state()

    def assign(self, value):
        distiller = self._distiller()
        if distiller is not None and distiller._state_syncing:
            # Keras writing back its training state: values it had.
            return super().assign(value)
        number = check_scalar(value, self._check, self.name)
        self._sync_owner()
        result = super().assign(value)
        if distiller is not None and number is not None:
            distiller._hyperparameter_assigned(self, number)
        return result

    if _backend.name() == "jax":

        @property
        def value(self):
            if self._value is None:  # Held by the training state mid-epoch.
                self._sync_owner()
            return super().value


class LogHyperparameters(keras.callbacks.Callback):
    """Writes the temperature and the distillation weight into each epoch's
    logs, so that schedules and early stops show in the History."""

    def on_epoch_begin(self, epoch, logs=None):
        if getattr(self.model, "_epoch", None) is not None:
            self.model._epoch.assign(float(epoch))  # For losses that warm up.

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["temperature"] = _backend.concrete_scalar(self.model.temperature)
            logs["distillation_weight"] = _backend.concrete_scalar(
                self.model.distillation_weight
            )
