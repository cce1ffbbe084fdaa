"""Keras callbacks for the heuristics that make distillation work:
early stop of the student's distillation term, early-stopped teachers, and
schedules of temperature and distillation weight."""

import inspect
import numbers
import os
import pathlib

from absl import logging
import keras

from kd_keras import _backend
from kd_keras import _io
from kd_keras import losses
from kd_keras.distiller import Distiller

_CHECKS = {
    "temperature": losses.check_temperature,
    "distillation_weight": losses.check_distillation_weight,
}
PARAMETERS = tuple(_CHECKS)


def _check_distiller(model, callback):
    if not isinstance(model, Distiller):
        raise ValueError(
            f"{callback} changes a `kd_keras.Distiller` during `fit`, but was "
            f"passed to the `fit` of {type(model).__name__} "
            f"`{getattr(model, 'name', model)}`. Pass it to "
            "`distiller.fit(..., callbacks=[...])`."
        )


class StudentEarlyStop(keras.callbacks.EarlyStopping):
    """Turns the distillation term off, from an epoch or on a plateau.

    At the end of training a small student may lack the capacity to minimise
    both the label loss and the distillation loss; Cho & Hariharan (2019)
    found that training on distillation plus labels first, then on the labels
    alone, teaches better. This callback sets the Distiller's
    `distillation_weight` to 0, after which only the labels train the student
    and the teacher is no longer run.

    The switch happens at the start of epoch `epoch`, or when `monitor` has
    not improved for `patience` epochs (Keras' `EarlyStopping` logic, which
    here switches the term off instead of stopping), whichever comes first.
    Each epoch's logs (and so the History) get `distillation_active`, 1 or 0;
    `switch_epoch` holds the first epoch without the term, and the switch is
    logged through `absl.logging`. When `fit` ends, the distillation weight
    is set back to its value before `fit`.

    A callback's state is not in Keras' `BackupAndRestore` checkpoints: give
    `state_dir` (the same folder) so that a resumed run still knows when the
    switch happened and which weight to restore. `training.distill` does
    that with its `backup_dir`.

    Args:
        epoch: index (from 0, as Keras counts) of the first epoch trained on
            the labels only: `epoch=5` distils during the first 5 epochs.
        monitor: a logged quantity, e.g. `"val_accuracy"`, whose plateau
            triggers the switch.
        patience: epochs without improvement of `monitor` before the switch.
        mode: `"auto"`, `"min"` or `"max"`, as for `EarlyStopping`.
        min_delta: the smallest change of `monitor` that counts as improvement.
        start_from_epoch: epochs to wait before watching `monitor`.
        state_dir: optional folder where the switch is recorded while `fit`
            runs, such as the `BackupAndRestore` folder.

    Example:

        ```python
        distiller.fit(train, validation_data=val, epochs=30, callbacks=[
            kd_keras.callbacks.StudentEarlyStop(monitor="val_accuracy", patience=3)])
        ```
    """

    STATE = "student_early_stop.json"

    def __init__(
        self,
        epoch=None,
        monitor=None,
        patience=0,
        mode="auto",
        min_delta=0.0,
        start_from_epoch=0,
        state_dir=None,
    ):
        if epoch is None and monitor is None:
            raise ValueError(
                "StudentEarlyStop needs `epoch` (e.g. epoch=10) or `monitor` "
                "(e.g. monitor='val_accuracy'), or both. Received neither."
            )
        if epoch is not None and (
            isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0
        ):
            raise ValueError(
                f"Expected `epoch` to be an integer >= 0. Received: epoch={epoch!r}"
            )
        super().__init__(
            monitor=monitor or "val_loss",
            min_delta=min_delta,
            patience=patience,
            mode=mode,
            start_from_epoch=start_from_epoch,
        )
        self.epoch = epoch
        self._watch = monitor is not None
        self.switch_epoch = None
        self.state_dir = state_dir

    def settings(self):
        """What decides the switch, as JSON: a resumed run must share it."""
        return {
            "epoch": self.epoch,
            "monitor": self.monitor if self._watch else None,
            "patience": self.patience,
            "mode": self.mode,
            "min_delta": abs(float(self.min_delta)),
            "start_from_epoch": self.start_from_epoch,
        }

    def _state_path(self):
        return (
            None
            if self.state_dir is None
            else (pathlib.Path(self.state_dir) / self.STATE)
        )

    def set_model(self, model):
        _check_distiller(model, "StudentEarlyStop")
        super().set_model(model)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        state = {}
        if self._state_path() is not None:
            state = _io.read_json(self._state_path(), {})
        # A resumed run restores λ = 0 after a switch: the state says more.
        self.switch_epoch = state.get("switch_epoch")
        self._weight_before = state.get(
            "weight_before", _backend.concrete_scalar(self.model.distillation_weight)
        )
        self.wait = state.get("wait", self.wait)
        self.best = state.get("best", self.best)

    def _save_state(self):
        if self._state_path() is None:
            return
        state = {
            "switch_epoch": self.switch_epoch,
            "weight_before": self._weight_before,
        }
        if self._watch:
            state.update(
                wait=int(self.wait),
                best=None if self.best is None else float(self.best),
            )
        _io.write_json(self._state_path(), state)

    def _switch(self, epoch):
        self.model.distillation_weight = 0.0
        self.switch_epoch = epoch
        self._save_state()
        logging.info(
            "StudentEarlyStop: the student trains on the labels only from epoch %d.",
            epoch + 1,
        )

    def on_epoch_begin(self, epoch, logs=None):
        if self.switch_epoch is None:
            if self.epoch is not None and epoch >= self.epoch:
                self._switch(epoch)
        elif epoch >= self.switch_epoch:
            # Resumed from a backup saved before the switch.
            self.model.distillation_weight = 0.0

    def on_epoch_end(self, epoch, logs=None):
        # Read from the variable: a resumed run may have restored λ = 0.
        active = _backend.concrete_scalar(self.model.distillation_weight) > 0.0
        if logs is not None:
            logs["distillation_active"] = float(active)
        if not (active and self._watch):
            return
        validated = any(key.startswith("val_") for key in logs or {})
        if self.monitor.startswith("val_") and not validated:
            return  # No validation this epoch (`validation_freq`).
        if logs is not None and self.monitor not in logs:
            raise ValueError(
                f"StudentEarlyStop watches monitor={self.monitor!r}, which is "
                "not logged, so the switch would never happen. Logged: "
                f"{sorted(logs)}. Pass one of those (validation metrics need "
                "`validation_data`)."
            )
        already_stopping = self.model.stop_training
        super().on_epoch_end(epoch, logs)
        if self.model.stop_training and not already_stopping:
            # EarlyStopping asked to stop: switch the term off instead.
            self.model.stop_training = False
            self.stopped_epoch = 0
            self._switch(epoch + 1)
        else:
            self._save_state()  # The plateau's progress, for a resume.

    def on_train_end(self, logs=None):
        # The switch lasts for this `fit` only; a later `fit` distils again.
        self.model.distillation_weight = self._weight_before
        if self._state_path() is not None:
            self._state_path().unlink(missing_ok=True)


class TeacherSnapshots(keras.callbacks.ModelCheckpoint):
    """Saves snapshots of a model at chosen epochs while it trains.

    Cho & Hariharan (2019) found that an early-stopped teacher, whose solution
    a small student can still reach, often teaches better than the fully
    trained one. With this callback one training run of the teacher yields the
    final teacher and the early ones: each chosen epoch is saved as
    `directory/epoch_005.keras`, and `directory/manifest.json` records each
    snapshot's epoch, file and logged metrics. Epochs count from 1, as Keras
    prints them: epoch 5 is the model after five epochs. A new run into the
    same folder first drops the snapshots of epochs it has not reached yet (a
    run resumed at epoch 8 keeps epochs 1 to 8).

    Args:
        directory: folder for the snapshots and the manifest.
        epochs: epochs to save, e.g. `[5, 10, 20]`.
        every: also save every `every` epochs.
        verbose: 1 prints each save.

    Example:

        ```python
        teacher.fit(train, epochs=30, callbacks=[
            kd_keras.callbacks.TeacherSnapshots("teacher.snapshots", epochs=[5, 10])])
        early_teacher = kd_keras.callbacks.TeacherSnapshots.load(
            "teacher.snapshots", 5)
        ```
    """

    MANIFEST = "manifest.json"

    def __init__(self, directory, epochs=None, every=None, verbose=0):
        if isinstance(epochs, numbers.Real):
            raise ValueError(
                "Expected `epochs` as a list of epochs to save. Received: "
                f"epochs={epochs!r}. Pass epochs=[{epochs}] to save that epoch "
                f"only, or every={epochs} to save every {epochs} epochs."
            )
        epochs = sorted(set(epochs or ()))
        if not epochs and not every:
            raise ValueError(
                "TeacherSnapshots needs `epochs` (e.g. [5, 10, 20]) or `every` "
                "(e.g. every=5). Received neither."
            )
        for value in epochs + ([every] if every else []):
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1):
                raise ValueError(
                    "Expected snapshot epochs counted from 1, as Keras prints "
                    f"them. Received: epochs={epochs}, every={every!r}"
                )
        self.directory = pathlib.Path(directory)
        super().__init__(
            os.fspath(self.directory / "epoch_{epoch:03d}.keras"), verbose=verbose
        )
        self.epochs = epochs
        self.every = every

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._fresh = True
        planned = (self.params or {}).get("epochs")
        late = [e for e in self.epochs if planned is not None and e > planned]
        if late:
            raise ValueError(
                f"TeacherSnapshots would save epochs {late}, but `fit` runs "
                f"{planned} epochs, so they would never be saved. Pass "
                f"epochs up to {planned}, or fit for {max(late)} epochs."
            )

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        if self._fresh:
            # Snapshots after this epoch belong to an earlier run.
            self._fresh = False
            manifest = self.read_manifest(self.directory)
            for key in [k for k in manifest if int(k) > epoch]:
                (self.directory / manifest.pop(key)["path"]).unlink(missing_ok=True)
            self._write_manifest(manifest)

    def _write_manifest(self, manifest):
        if not manifest and not self.directory.is_dir():
            return
        ordered = dict(sorted(manifest.items(), key=lambda kv: int(kv[0])))
        _io.write_json(self.directory / self.MANIFEST, ordered)

    def _wanted(self, epoch):
        return epoch in self.epochs or bool(self.every and epoch % self.every == 0)

    def on_epoch_end(self, epoch, logs=None):
        if not self._wanted(epoch + 1):
            return
        super().on_epoch_end(epoch, logs)
        manifest = self.read_manifest(self.directory)
        manifest[str(epoch + 1)] = {
            "epoch": epoch + 1,
            "path": f"epoch_{epoch + 1:03d}.keras",
            "metrics": {
                k: float(v)
                for k, v in (logs or {}).items()
                if isinstance(v, numbers.Real)
            },
        }
        self._write_manifest(manifest)

    @classmethod
    def read_manifest(cls, directory):
        """Returns `{epoch: {"epoch", "path", "metrics"}}` with str keys."""
        return _io.read_json(pathlib.Path(directory) / cls.MANIFEST, {})

    @classmethod
    def load(cls, directory, epoch):
        """Loads the snapshot taken after `epoch` epochs."""
        manifest = cls.read_manifest(directory)
        entry = manifest.get(str(epoch))
        if entry is None:
            available = ", ".join(manifest) or "none"
            raise ValueError(
                f"No snapshot of epoch {epoch} in {directory}. Available "
                f"epochs: {available}."
            )
        return keras.saving.load_model(pathlib.Path(directory) / entry["path"])


class ParameterSchedule(keras.callbacks.Callback):
    """Sets the Distiller's temperature or distillation weight every epoch.

    Like Keras' `LearningRateScheduler`: at the start of each epoch,
    `schedule(epoch, current_value)` (or `schedule(epoch)`) returns the new
    value, which is validated, assigned and written to the epoch's logs. A
    schedule of the epoch alone is also called for every epoch when `fit`
    begins, so that a value out of range stops it before any training.

    Args:
        schedule: a function of the epoch index (from 0) and, optionally, of
            the current value, returning the new value.
        parameter: `"temperature"` or `"distillation_weight"`.

    Example:

        ```python
        # Anneal the temperature from 10 down to 2.
        anneal = kd_keras.callbacks.ParameterSchedule(
            lambda epoch: max(2.0, 10.0 - epoch), parameter="temperature")
        distiller.fit(train, epochs=10, callbacks=[anneal])
        ```
    """

    def __init__(self, schedule, parameter="temperature"):
        super().__init__()
        if parameter not in PARAMETERS:
            raise ValueError(
                f"Expected `parameter` in {PARAMETERS}. Received: "
                f"parameter={parameter!r}"
            )
        if not callable(schedule):
            raise ValueError(
                "Expected `schedule` to be a function of the epoch. Received: "
                f"schedule={schedule!r}"
            )
        self.schedule = schedule
        self.parameter = parameter
        try:
            parameters = inspect.signature(schedule).parameters.values()
            self._takes_current = sum(
                p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                for p in parameters
            ) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)
        except (TypeError, ValueError):
            self._takes_current = False

    def set_model(self, model):
        _check_distiller(model, "ParameterSchedule")
        super().set_model(model)

    def _current(self):
        return _backend.concrete_scalar(getattr(self.model, self.parameter))

    def on_train_begin(self, logs=None):
        # A schedule of the epoch alone is checked for every epoch now,
        # before any training.
        planned = (self.params or {}).get("epochs")
        if not self._takes_current and planned:
            for epoch in range(planned):
                self._check(epoch, self.schedule(epoch))

    def _check(self, epoch, value):
        try:
            losses.check_scalar(value, _CHECKS[self.parameter], self.parameter)
        except ValueError as error:
            raise ValueError(
                f"ParameterSchedule: the schedule returned {value!r} for "
                f"epoch {epoch}, which is not a valid {self.parameter}. "
                f"{error}"
            ) from None

    def on_epoch_begin(self, epoch, logs=None):
        if self._takes_current:
            value = self.schedule(epoch, self._current())
        else:
            value = self.schedule(epoch)
        self._check(epoch, value)
        setattr(self.model, self.parameter, value)
        logging.info(
            "ParameterSchedule: %s = %g at epoch %d.",
            self.parameter,
            self._current(),
            epoch + 1,
        )

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[self.parameter] = self._current()
