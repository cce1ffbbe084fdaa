"""The callbacks that every `Distiller.fit` runs first: the epoch logs of
the temperature and the distillation weight, and the stop on a non-finite
loss."""

import threading

import keras
import numpy as np

from kd_keras import _backend
from kd_keras import _keras_internals


class LogHyperparameters(keras.callbacks.Callback):
    """Writes the temperature and the distillation weight into each epoch's
    logs, so that schedules and early stops show in the History; sets the
    epoch variable of losses that warm up (None if none does).

    Args:
        epoch: the Distiller's epoch variable, or None.
    """

    def __init__(self, epoch=None):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if self.epoch is not None:
            self.epoch.assign(float(epoch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["temperature"] = _backend.concrete_scalar(self.model.temperature)
            logs["distillation_weight"] = _backend.concrete_scalar(
                self.model.distillation_weight
            )


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops `Distiller.fit` after the first non-finite loss, or after an
    epoch that left the student with non-finite weights, with an error that
    says where; the student gets back the weights it had at the start of
    that epoch, the last ones known finite. Keras' `TerminateOnNaN`, with
    the weights kept. The batch hook only takes note (it is safe to run
    asynchronously, so it never makes a step wait, and out of order, so it
    keeps the earliest batch); the epoch's end, which Keras reaches right
    after `stop_training`, restores and raises."""

    def __init__(self):
        super().__init__()
        self.async_safe = True
        self._noting = threading.Lock()

    def on_epoch_begin(self, epoch, logs=None):
        self._bad = None  # (batch, loss) of the first non-finite loss.
        self._weights = self.model.student.get_weights()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or np.isfinite(loss):
            return
        with self._noting:
            if self._bad is None or batch < self._bad[0]:
                self._bad = (batch, loss)
        # Not `self.model`, which on JAX would sync the training state.
        _keras_internals.callback_model(self).stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        student = self.model.student
        if self._bad is None and all(
            np.isfinite(w).all() for w in student.get_weights()
        ):
            return
        what = "the student's weights turned non-finite during"
        if self._bad is not None:
            what = f"the loss is {self._bad[1]} at batch {self._bad[0] + 1}"
        student.set_weights(self._weights)
        raise FloatingPointError(
            f"Training stopped: {what} of epoch {epoch + 1} (counted from 1, "
            "as Keras prints them). The student has the weights it had at "
            "the start of that epoch, the last ones known finite; the "
            "optimizer's state may not be, so compile again before training "
            "on. Look for NaN or infinite inputs, labels or teacher logits, "
            "or lower the learning rate."
        )


_OURS = (LogHyperparameters, StopOnNonFinite)


def with_fit_callbacks(callbacks, model, epoch=None):
    """`fit`'s callbacks with the Distiller's own first, so that they log
    the values each epoch trained with and stop on a non-finite loss before
    another callback saves. A `CallbackList` is copied with them in front,
    keeping its parameters; callbacks given twice are not added again."""
    ours = [LogHyperparameters(epoch), StopOnNonFinite()]
    if not isinstance(callbacks, keras.callbacks.CallbackList):
        return [*ours, *(callbacks or ())]
    given = list(callbacks.callbacks)
    if any(isinstance(c, _OURS) for c in given):
        return callbacks
    return keras.callbacks.CallbackList(
        [*ours, *given], model=model, **(callbacks.params or {})
    )


def given(callbacks):
    """The callbacks of a list or a `CallbackList`."""
    return list(getattr(callbacks, "callbacks", callbacks) or ())
