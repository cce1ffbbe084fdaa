"""A folder of trained models, so that training the same thing twice loads it
instead (teacher-assistant chains, path searches, command-line teachers),
and the atomic JSON files that it and other long work keep."""

import dataclasses

from absl import logging

from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _fingerprints
from kd_keras import _io
from kd_keras import losses
from kd_keras import training

MANIFEST = "manifest.json"

# JSON that a reader never sees half written (for applications that record
# their own progress), and its reader.
write_json = _io.write_json
read_json = _io.read_json


@dataclasses.dataclass
class Settings:
    """What a training depends on, besides its models and data.

    Args:
        epochs: epochs to train.
        optimizer: a Keras optimizer or its config, or the name of one (Adam
            by default) to use with `learning_rate`.
        learning_rate: the learning rate of an optimizer given by name.
        temperature: T, for distillation.
        distillation_weight: λ, for distillation.
        seed: the run's seed: of the cached logits' shuffle, for
            distillation. Part of every fingerprint, so that runs with
            other seeds (such as seed studies) are trained apart.
    """

    epochs: int = 10
    optimizer: object = "adam"
    learning_rate: float = 1e-3
    temperature: float = 4.0
    distillation_weight: float = 0.9
    seed: int = 0

    def check(self):
        losses.check_temperature(self.temperature)
        losses.check_distillation_weight(self.distillation_weight)
        _checks.check_positive_int(self.epochs, "epochs")

    def training_arguments(self):
        """The keyword arguments of `training.train`."""
        return {
            "epochs": self.epochs,
            "optimizer": self.optimizer,
            "learning_rate": self.learning_rate,
        }

    def distillation_arguments(self):
        """The keyword arguments of `training.distill`."""
        return {
            **self.training_arguments(),
            "temperature": self.temperature,
            "distillation_weight": self.distillation_weight,
            "seed": self.seed,
        }

    def as_json(self, kind="distill"):
        """What a training of `kind` ("train" or "distill") depends on, as
        JSON: a training on the labels ignores the distillation settings."""
        values = (
            self.distillation_arguments()
            if kind == "distill"
            else dict(self.training_arguments(), seed=self.seed)
        )
        values["optimizer"] = training.optimizer_config(
            values.pop("optimizer"), values.pop("learning_rate")
        )
        return values


class ModelStore:
    """Trained models in a folder, each under a fingerprint of everything its
    training depends on.

    The fingerprint covers the model's architecture (not its layer names),
    the teacher's weights for a distillation, the settings and the training
    data's content. Asking for a training that the folder already holds
    loads the stored weights into the model instead, also in a new process;
    an interrupted training resumes from its last finished epoch. A
    manifest (`manifest.json`) lists what the folder holds.

    Args:
        directory: the folder (created if needed).

    Example:

        ```python
        store = kd_keras.store.ModelStore("runs")
        teacher, _ = store.train(kd_keras.models.mlp((1200, 1200)), train, val,
                                 kd_keras.store.Settings(epochs=10))
        ```
    """

    def __init__(self, directory):
        self.directory = _io.make_folder(directory, "directory")
        self.trained = 0
        self.reused = 0
        self._last_data = (None, None)

    def _data_fingerprint(self, data):
        # One pass over the data per dataset: a chain's steps share theirs.
        if self._last_data[0] is not data:
            self._last_data = (data, _datasets.fingerprint(data))
        return self._last_data[1]

    def manifest(self):
        """`{fingerprint: entry}` of the trained models in the folder."""
        return _io.read_json(self.directory / MANIFEST, {})

    def _load(self, fingerprint, model, validation_data):
        entry = self.manifest().get(fingerprint)
        if entry is None or not (self.directory / entry["path"]).is_file():
            return None
        path = self.directory / entry["path"]
        model.load_weights(path)
        self.reused += 1
        logging.info("Reusing %s from %s.", model.name, path)
        entry = dict(entry, reused=True)
        if validation_data is not None:
            # Scored afresh: the validation data may have changed.
            entry["val_accuracy"] = training.test_accuracy(model, validation_data)
        return entry

    def _save(self, fingerprint, model, validation_data, seconds, **fields):
        path = self.directory / f"{model.name}-{fingerprint}.keras"
        model.save(path)
        entry = {"model": model.name, "path": path.name, "seconds": seconds, **fields}
        if validation_data is not None:
            entry["val_accuracy"] = training.test_accuracy(model, validation_data)
        manifest = self.manifest()
        manifest[fingerprint] = entry
        _io.write_json(self.directory / MANIFEST, manifest)
        self.trained += 1
        return dict(entry, reused=False)

    def _once(
        self,
        kind,
        identity,
        model,
        train_data,
        validation_data,
        settings,
        fit,
        **fields,
    ):
        """Runs `fit(train_data, settings, backup_dir)` unless the folder
        holds its result; returns `(fingerprint, entry)`."""
        settings = settings or Settings()
        settings.check()
        train_data = training.as_batches(train_data)
        fingerprint = _fingerprints.digest(
            kind,
            *identity,
            _fingerprints.architecture(model),
            settings.as_json(kind),
            self._data_fingerprint(train_data),
        )
        entry = self._load(fingerprint, model, validation_data)
        if entry is not None:
            return fingerprint, entry
        with training.Stopwatch() as watch:
            fit(train_data, settings, self.directory / f"{fingerprint}.backup")
        return fingerprint, self._save(
            fingerprint,
            model,
            validation_data,
            watch.seconds,
            epochs=settings.epochs,
            **fields,
        )

    def train(
        self,
        model,
        train_data,
        validation_data=None,
        settings=None,
        *,
        callbacks=(),
        verbose=0,
    ):
        """Trains `model` (in place) on the labels, or loads it.

        Returns:
            `(fingerprint, entry)`: the training's fingerprint and its
            manifest entry (`path`, `seconds`, `reused` and, with validation
            data, `val_accuracy`).
        """

        def fit(data, settings, backup_dir):
            training.train(
                model,
                data,
                validation_data,
                callbacks=callbacks,
                backup_dir=backup_dir,
                verbose=verbose,
                **settings.training_arguments(),
            )

        return self._once(
            "train", (), model, train_data, validation_data, settings, fit
        )

    def distill(
        self,
        teacher,
        student,
        train_data,
        validation_data=None,
        settings=None,
        *,
        teacher_fingerprint=None,
        callbacks=(),
        verbose=0,
    ):
        """Distils `teacher` into `student` (in place), or loads the student.

        Args:
            teacher: the trained teacher.
            student: the student, trained here.
            train_data: the transfer set.
            validation_data: optional data to score the student on.
            settings: a `Settings`.
            teacher_fingerprint: what identifies the teacher; by default its
                weights. A chain passes the fingerprint of the step that
                trained it, so that a changed step retrains every later one.
            callbacks: extra Keras callbacks of the training.
            verbose: Keras verbosity.

        Returns:
            `(fingerprint, entry)` as for `train`.
        """

        def fit(data, settings, backup_dir):
            training.distill(
                teacher,
                student,
                data,
                validation_data,
                callbacks=callbacks,
                backup_dir=backup_dir,
                verbose=verbose,
                **settings.distillation_arguments(),
            )
            logging.info("Distilled %s into %s.", teacher.name, student.name)

        identity = (teacher_fingerprint or _fingerprints.weights(teacher),)
        return self._once(
            "distill",
            identity,
            student,
            train_data,
            validation_data,
            settings,
            fit,
            teacher=teacher.name,
            student=student.name,
        )
