"""keras-tuner sweeps over assistant size, temperature and distillation weight.

The roles follow keras-tuner's own split: `DistillationHyperModel` says what
to build and how to fit it, keras-tuner's oracles choose the values to try,
and `tune` runs the sweep.
"""

import contextlib
import numbers
import os
import pathlib

from absl import logging
import keras
import keras_tuner

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _fingerprints
from kd_keras import _io
from kd_keras import losses as kd_losses
from kd_keras import training
from kd_keras.distiller import Distiller
from kd_keras.distiller import adapters_pending
from kd_keras.distiller import reads_features
from kd_keras.teachers import cache_teacher_logits
from kd_keras.teachers import is_cached
from kd_keras.teachers import without_teacher_logits

NO_ASSISTANT = "none"
# The grid of the teacher-assistant paper's official code.
PAPER_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0)
PAPER_WEIGHTS = (0.05, 1.0, 0.05)
TUNERS = {
    "bayesian": keras_tuner.BayesianOptimization,
    "random": keras_tuner.RandomSearch,
    "hyperband": keras_tuner.Hyperband,
}
PRECISIONS = (None, "mixed_float16", "mixed_bfloat16")


def _check_ranges(
    temperatures, distillation_weights, assistant_sizes, assistant_builder
):
    temperatures = tuple(temperatures)
    if not temperatures or any(
        isinstance(t, bool) or not isinstance(t, numbers.Real) or t <= 0
        for t in temperatures
    ):
        raise ValueError(
            "Expected `temperatures` to be a non-empty list of numbers > 0, "
            f"such as {PAPER_TEMPERATURES}. Received: {temperatures!r}"
        )
    if len(tuple(distillation_weights)) != 3:
        raise ValueError(
            "Expected `distillation_weights` as (min, max, step), such as "
            f"{PAPER_WEIGHTS}. Received: {distillation_weights!r}"
        )
    low, high, step = distillation_weights
    if not (0.0 <= low <= high <= 1.0) or not step > 0:
        raise ValueError(
            "Expected `distillation_weights` = (min, max, step) with "
            "0 <= min <= max <= 1 and step > 0. Received: "
            f"{distillation_weights!r}"
        )
    if assistant_sizes and assistant_builder is None:
        raise ValueError(
            "`assistant_sizes` needs an `assistant_builder(size)` that returns "
            f"a new assistant model. Received: assistant_sizes="
            f"{list(assistant_sizes)} and no builder."
        )
    if assistant_builder is not None and not assistant_sizes:
        raise ValueError(
            "An `assistant_builder` needs `assistant_sizes` to choose from, "
            "e.g. assistant_sizes=[8, 6, 4]."
        )
    return temperatures


def _check_builder(builder, name, call):
    if isinstance(builder, keras.Model) or not callable(builder):
        received = (
            f"the model `{builder.name}`"
            if isinstance(builder, keras.Model)
            else repr(builder)
        )
        raise ValueError(
            f"Expected `{name}` to be a function returning a new model, as "
            f"each trial trains a fresh one, such as `lambda: "
            f"keras.models.clone_model(model)`. Received: {received}. The "
            f"tuner calls `{name.split('_')[0]}_builder` as `{call}`."
        )


def _check_loss_choices(losses):
    if losses is None:
        return None
    if not isinstance(losses, dict) or not losses:
        raise ValueError(
            "Expected `losses` as a non-empty dict {name: loss}, such as "
            '{"kd": SoftTargets(), "dist": DIST()}. Received: '
            f"losses={losses!r}"
        )
    checked = {}
    for name, choice in losses.items():
        if not callable(choice):
            try:  # As `Distiller(losses=...)` takes it.
                choice = kd_losses.as_weighted_losses(choice)
            except ValueError:
                raise ValueError(
                    f"Expected losses[{name!r}] to be a `kd_keras.losses` "
                    "object (or a list of them and (loss, weight) pairs, as "
                    "`Distiller(losses=...)` takes), or a function `hp -> "
                    f"loss`. Received: {choice!r}"
                ) from None
        checked[name] = choice
    return checked


def _has_feature_loss(weighted_losses):
    return any(isinstance(loss, kd_losses.FeatureLoss) for loss, _ in weighted_losses)


@contextlib.contextmanager
def _dtype_policy(name):
    if name is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class DistillationHyperModel(keras_tuner.HyperModel):
    """A keras-tuner hypermodel of teacher → (assistant) → student distillation.

    Its hyperparameters are `assistant_size` (`"none"` or one of
    `assistant_sizes`), `temperature` and `distillation_weight`; by default the
    grid of Mirzadeh et al. (2020): T in {1, 2, 5, 10, 15, 20} and λ from
    0.05 to 1 in steps of 0.05. `build` returns a compiled `Distiller` whose
    student is new; with an assistant, the Distiller's teacher is the new
    assistant, and `fit` first distils the real teacher into it. The
    objective keras-tuner reads is the student's validation metric (e.g.
    `val_accuracy`). The best model of a sweep is a Distiller:
    `tuner.get_best_models()[0].student` is the student to deploy.

    Args:
        teacher: the trained teacher.
        student_builder: a function returning a new student model.
        assistant_builder: optional function `size -> new assistant model`.
        assistant_sizes: the sizes `assistant_builder` accepts; "none" (no
            assistant) is always a choice.
        temperatures: the temperatures to choose from.
        distillation_weights: `(min, max, step)` of λ.
        assistant_epochs: epochs of the teacher → assistant step (default:
            the student's epochs).
        optimizer: a Keras optimizer (copied for every model), its name or
            config; Adam by default.
        learning_rate: the default Adam's learning rate.
        metrics: metrics compiled on the student, e.g. `("accuracy",)`.
        mixed_precision: None, "mixed_float16" or "mixed_bfloat16": the
            policy under which students and assistants are built (the KD loss
            stays float32).
        jit_compile: passed to `compile` ("auto", True or False).
        losses: optional `{name: loss}` to choose the distillation loss from
            (the hyperparameter `loss`); a loss is what
            `Distiller(losses=...)` takes (a `kd_keras.losses` object, or a
            list of them and `(loss, weight)` pairs), or a function
            `hp -> loss` whose own hyperparameters are searched only when
            that loss is chosen, e.g. `{"kd": SoftTargets(), "dkd": lambda
            hp: DecoupledKD(beta=hp.Choice("dkd_beta", [2.0, 8.0]))}`.
            None: soft targets.

    Example:

        ```python
        hypermodel = kd_keras.tuning.DistillationHyperModel(
            teacher, lambda: kd_keras.models.plain_cnn(2, width=0.25),
            assistant_builder=lambda d: kd_keras.models.plain_cnn(d, width=0.25),
            assistant_sizes=[8, 6, 4])
        tuner, best = kd_keras.tuning.tune(hypermodel, train, val, max_trials=12,
                                           directory="sweeps", project_name="mnist")
        ```
    """

    def __init__(
        self,
        teacher,
        student_builder,
        assistant_builder=None,
        *,
        assistant_sizes=(),
        temperatures=PAPER_TEMPERATURES,
        distillation_weights=PAPER_WEIGHTS,
        assistant_epochs=None,
        optimizer=None,
        learning_rate=1e-3,
        metrics=("accuracy",),
        mixed_precision=None,
        jit_compile="auto",
        losses=None,
        name="distillation",
    ):
        super().__init__(name=name)
        _checks.check_keras_model(teacher, "teacher")
        _check_builder(student_builder, "student_builder", "student")
        if assistant_builder is not None:
            _check_builder(assistant_builder, "assistant_builder", "assistant(size)")
        if mixed_precision not in PRECISIONS:
            raise ValueError(
                f"Expected `mixed_precision` in {PRECISIONS}. Received: "
                f"{mixed_precision!r}"
            )
        self.temperatures = _check_ranges(
            temperatures, distillation_weights, assistant_sizes, assistant_builder
        )
        self.teacher = teacher
        self.student_builder = student_builder
        self.assistant_builder = assistant_builder
        self.sizes = {str(size): size for size in assistant_sizes}
        self.distillation_weights = tuple(distillation_weights)
        self.assistant_epochs = assistant_epochs
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.metrics = list(metrics)
        self.mixed_precision = mixed_precision
        self.jit_compile = jit_compile
        self.losses = _check_loss_choices(losses)
        # Each loss builder's own hyperparameters, and its default loss.
        self._loss_spaces, self._loss_defaults = {}, {}
        for option, choice in (self.losses or {}).items():
            if callable(choice):
                probe = keras_tuner.HyperParameters()
                self._loss_defaults[option] = self._checked_loss(option, choice(probe))
                self._loss_spaces[option] = list(probe.space)
        # Feature losses need the teacher's features: no cached logits then.
        self.needs_features = any(
            _has_feature_loss(choice)
            for choice in (*self._loss_defaults.values(), *(self.losses or {}).values())
            if not callable(choice)
        )
        # Full passes of the teacher over a dataset, by dataset.
        self.teacher_passes = {}

    def _compiled(self, teacher, student, temperature, weight, loss=None):
        distiller = Distiller(
            teacher,
            student,
            temperature=temperature,
            distillation_weight=weight,
            losses=loss,
        )
        distiller.compile(
            training.new_optimizer(self.optimizer, self.learning_rate),
            metrics=self.metrics,
            jit_compile=self.jit_compile,
        )
        # Built now, so that keras-tuner's reload of a checkpoint (best
        # models, hyperband's later rounds) restores the optimizer's state
        # instead of skipping it with a warning; unless feature adapters
        # still wait for the first batch (models without a fixed input
        # shape), which must come first.
        if not adapters_pending(distiller):
            distiller.optimizer.build(distiller.trainable_variables)
        return distiller

    def build(self, hp):
        size = hp.Choice("assistant_size", [NO_ASSISTANT, *self.sizes])
        temperature = hp.Choice("temperature", list(self.temperatures))
        weight = self._weight(hp)
        with _dtype_policy(self.mixed_precision):
            student = self.student_builder()
            teacher = self.teacher
            if size != NO_ASSISTANT:
                teacher = self.assistant_builder(self.sizes[size])
            return self._compiled(teacher, student, temperature, weight, self._loss(hp))

    def _loss(self, hp):
        """The trial's distillation loss, or None (soft targets)."""
        if not self.losses:
            return None
        name = hp.Choice("loss", list(self.losses))
        # Every loss's own settings are declared from the first trial on
        # (keras-tuner learns the space from them), active only when that
        # loss is chosen.
        for option, space in self._loss_spaces.items():
            if option != name:
                with hp.conditional_scope("loss", [option]):
                    for setting in space:
                        config = setting.get_config()
                        config.pop("conditions", None)
                        getattr(hp, type(setting).__name__)(**config)
        choice = self.losses[name]
        if not callable(choice):
            return choice
        with hp.conditional_scope("loss", [name]):
            return self._checked_loss(name, choice(hp))

    @staticmethod
    def _checked_loss(name, loss):
        try:
            return kd_losses.as_weighted_losses(loss)
        except ValueError:
            raise ValueError(
                f"The builder of the loss {name!r} returned {loss!r}; expected "
                "a `kd_keras.losses` object such as `DecoupledKD(...)`, or a "
                "list of them and (loss, weight) pairs."
            ) from None

    def _weight(self, hp):
        """λ on the grid (min, max, step), max included, rounded."""
        low, high, step = self.distillation_weights
        steps = round((high - low) / step)
        # keras-tuner's grid floors (max - min) / step, which float error
        # can push below the last step; a tiny margin keeps `max` on it.
        value = hp.Float(
            "distillation_weight", low, low + steps * step + step * 1e-6, step=step
        )
        return min(high, round(value, 6))

    def cache(self, dataset, label):
        """Caches the teacher's logits on `dataset` once, counting the pass."""
        cached = cache_teacher_logits(self.teacher, dataset, shuffle=label == "train")
        self.teacher_passes[label] = self.teacher_passes.get(label, 0) + 1
        return cached

    def fit(
        self,
        hp,
        model,
        x=None,
        *args,
        validation_data=None,
        epochs=1,
        initial_epoch=0,
        callbacks=None,
        **kwargs,
    ):
        """Distils teacher → (assistant) → student; returns the student's
        History, whose validation metric is the trial's objective."""
        if reads_features(model):
            # Feature losses read the teacher: a trial whose loss turned out
            # to have one takes the data uncached.
            if is_cached(x):
                x = without_teacher_logits(x)
            if validation_data is not None and is_cached(validation_data):
                validation_data = without_teacher_logits(validation_data)
        assistant = model.teacher if model.teacher is not self.teacher else None
        if assistant is not None:
            # Hyperband's later rounds restore a trained assistant.
            if initial_epoch == 0:
                assistant.trainable = True
                with _dtype_policy(self.mixed_precision):
                    step = self._compiled(
                        self.teacher,
                        assistant,
                        hp.get("temperature"),
                        self._weight(hp),
                        self._loss(hp),
                    )
                step.fit(
                    x,
                    validation_data=validation_data,
                    epochs=self.assistant_epochs or epochs,
                    verbose=0,
                    shuffle=False,
                )
                assistant.trainable = False
            if is_cached(x):
                # Cached logits are the teacher's; the student now needs the
                # assistant's.
                x = cache_teacher_logits(assistant, without_teacher_logits(x))
            if validation_data is not None and is_cached(validation_data):
                validation_data = cache_teacher_logits(
                    assistant, without_teacher_logits(validation_data), shuffle=False
                )
        return model.fit(
            x,
            *args,
            validation_data=validation_data,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            **kwargs,
        )


STAMP = "kd_keras_sweep.json"


def _sweep_stamp(hypermodel, train_data, validation_data, **settings):
    """What a sweep's trials depend on; resuming requires the same."""
    stamp = {
        "teacher": _fingerprints.weights(hypermodel.teacher),
        "student": _fingerprints.architecture(hypermodel.student_builder()),
        "assistants": {
            name: _fingerprints.architecture(hypermodel.assistant_builder(size))
            for name, size in hypermodel.sizes.items()
        },
        "temperatures": list(hypermodel.temperatures),
        "distillation_weights": list(hypermodel.distillation_weights),
        "assistant_epochs": hypermodel.assistant_epochs,
        "optimizer": training.optimizer_config(
            hypermodel.optimizer, hypermodel.learning_rate
        ),
        "mixed_precision": hypermodel.mixed_precision,
        "training data": _datasets.fingerprint(train_data),
        "validation data": _datasets.fingerprint(validation_data),
        **settings,
    }
    if hypermodel.losses:  # Absent otherwise, as in sweeps before losses.
        stamp["losses"] = {
            name: _loss_stamp(hypermodel._loss_defaults.get(name, choice))
            for name, choice in hypermodel.losses.items()
        }
        stamp["loss settings"] = {
            name: [setting.get_config() for setting in space]
            for name, space in hypermodel._loss_spaces.items()
        }
    return _io.as_json(stamp)


def _loss_stamp(weighted_losses):
    """Each loss's saved config (its repr where it cannot be saved, as with
    a layer given as a function) and weight: the same in every process."""
    stamp = []
    for loss, weight in weighted_losses:
        try:
            described = keras.saving.serialize_keras_object(loss)
        except ValueError:
            described = repr(loss)
        stamp.append([described, weight])
    return stamp


def is_chief():
    """True in the chief process of a distributed sweep (keras-tuner's
    KERASTUNER_* environment variables)."""
    return "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") and (
        "KERASTUNER_ORACLE_IP" in os.environ
    )


def is_worker():
    """True in a worker process of a distributed sweep."""
    return "KERASTUNER_ORACLE_IP" in os.environ and not is_chief()


def tune(
    hypermodel,
    train_data,
    validation_data,
    *,
    tuner="bayesian",
    max_trials=12,
    epochs=5,
    directory,
    project_name,
    overwrite=False,
    objective="val_accuracy",
    seed=0,
    callbacks=(),
    verbose=0,
    **tuner_kwargs,
):
    """Runs a keras-tuner sweep of a `DistillationHyperModel`.

    The teacher's logits on the training and validation data are computed
    once per sweep (per worker, in distributed mode) and reused by every
    trial: `hypermodel.teacher_passes` counts them. A sweep with a feature
    loss (`FeatureHint`, `AttentionTransfer`) runs the teacher on the fly
    instead, since its features are not cached. keras-tuner keeps its
    state in `directory/project_name`, so calling `tune` again with the same
    arguments resumes an interrupted sweep: finished trials are not run
    again, and the trial that was running starts over.

    Distributed tuning uses keras-tuner's chief/worker mode: start one
    process with `KERASTUNER_TUNER_ID=chief`, and one per worker (e.g. one
    per GPU, with `CUDA_VISIBLE_DEVICES`) with `KERASTUNER_TUNER_ID=tuner0`,
    `tuner1`, ...; all with `KERASTUNER_ORACLE_IP` and
    `KERASTUNER_ORACLE_PORT` set, and the same arguments. The chief serves
    the oracle and writes the results; workers run trials and return `None`
    as best hyperparameters.

    Args:
        hypermodel: a `DistillationHyperModel`.
        train_data: the transfer set, a batched dataset of `(x, y)` without
            random augmentation.
        validation_data: a batched dataset of `(x, y)`.
        tuner: "bayesian", "random" or "hyperband".
        max_trials: trials to run (for "hyperband", its `max_epochs` is
            `epochs` instead and the trial count follows from it).
        epochs: epochs of each student distillation.
        directory: keras-tuner's folder.
        project_name: the sweep's name inside `directory`.
        overwrite: start the sweep afresh instead of resuming it (in a
            distributed sweep only the chief wipes the shared folder).
        objective: the student's logged metric to maximise (or, if its name
            contains "loss", minimise).
        seed: the oracle's seed.
        callbacks: Keras callbacks for every trial's student fit.
        verbose: keras-tuner and Keras verbosity.
        **tuner_kwargs: passed to the keras-tuner tuner (e.g.
            `executions_per_trial`, `distribution_strategy`).

    Returns:
        `(tuner, best_hyperparameters)`; `best_hyperparameters` is a
        `keras_tuner.HyperParameters` (None on a worker, or if no trial
        finished). The best hyperparameters and a table of trials are
        written to `directory/project_name` (`kd_keras.apps.plots.plot_sweep`
        draws the trials).
    """
    _check_tune_arguments(hypermodel, tuner, max_trials, epochs, objective, callbacks)
    train_data = training.as_batches(train_data)
    validation_data = training.as_batches(validation_data, shuffle=False)
    stamp = _sweep_stamp(
        hypermodel,
        train_data,
        validation_data,
        epochs=epochs,
        objective=objective,
        tuner=tuner,
    )
    stamp_path = pathlib.Path(directory) / project_name / STAMP
    if not overwrite:
        _check_same_sweep(stamp_path, stamp)
    limit = (
        {"max_epochs": epochs} if tuner == "hyperband" else {"max_trials": max_trials}
    )
    kt_tuner = TUNERS[tuner](
        hypermodel=hypermodel,
        objective=keras_tuner.Objective(
            objective, "min" if "loss" in objective else "max"
        ),
        directory=os.fspath(directory),
        project_name=project_name,
        # Only the chief (or a lone process) may wipe the shared project:
        # a worker doing so would delete the others' state.
        overwrite=overwrite and not is_worker(),
        seed=seed,
        **limit,
        **tuner_kwargs,
    )
    # Chief and workers all write it: atomically, so none reads half a file.
    _io.write_json(stamp_path, stamp)
    _search(
        kt_tuner, hypermodel, train_data, validation_data, epochs, callbacks, verbose
    )
    if is_worker():
        return kt_tuner, None
    _check_some_trial_completed(kt_tuner)
    write_results(kt_tuner, objective)
    best = kt_tuner.get_best_hyperparameters(1)
    return kt_tuner, (best[0] if best else None)


def _check_some_trial_completed(kt_tuner):
    trials = list(kt_tuner.oracle.trials.values())
    if trials and not any(t.status == "COMPLETED" for t in trials):
        message = next((t.message for t in trials if t.message), "no message")
        raise RuntimeError(
            f"Every trial of the sweep failed ({len(trials)} of them), so it "
            f"has no best settings. The first error: "
            f"{message.strip().splitlines()[-1]}"
        )


def _search(
    kt_tuner, hypermodel, train_data, validation_data, epochs, callbacks, verbose
):
    """Runs the trials, on the teacher's logits cached once (the chief only
    serves the oracle and caches nothing), or, when a loss reads features,
    with the teacher run on the fly."""
    if not is_chief():
        logging.info(
            "Tuning with Keras on %s, on %s.",
            keras.backend.backend(),
            ", ".join(_backend.devices()) or "its default device",
        )
        if not hypermodel.needs_features:
            train_data = hypermodel.cache(train_data, "train")
            validation_data = hypermodel.cache(validation_data, "validation")
    kt_tuner.search(
        train_data,
        validation_data=validation_data,
        epochs=epochs,
        callbacks=list(callbacks),
        verbose=verbose,
        shuffle=False,
    )  # Batches come shuffled, or in order.


def _logged_names(hypermodel):
    """What each epoch of a trial logs: the loss terms and metrics (also on
    the validation data), T and λ."""
    names = ["loss", "student_loss", "distillation_loss"]
    for metric in hypermodel.metrics:
        if isinstance(metric, str):
            names.append(metric)
        else:
            names.append(getattr(metric, "name", getattr(metric, "__name__", "")))
    return sorted(
        [*names, *(f"val_{n}" for n in names), "temperature", "distillation_weight"]
    )


def _check_tune_arguments(hypermodel, tuner, max_trials, epochs, objective, callbacks):
    if tuner not in TUNERS:
        raise ValueError(
            f"Expected `tuner` in {sorted(TUNERS)}. Received: tuner={tuner!r}"
        )
    if not isinstance(hypermodel, DistillationHyperModel):
        raise ValueError(
            "Expected a `kd_keras.tuning.DistillationHyperModel`. Received: "
            f"{type(hypermodel).__name__}"
        )
    _checks.check_positive_int(max_trials, "max_trials")
    _checks.check_positive_int(epochs, "epochs")
    logged = _logged_names(hypermodel)
    if objective not in logged:
        message = (
            f"The objective {objective!r} is not among what the trials log "
            f"({', '.join(logged)}), so no trial could be scored. Pass one of "
            "those, e.g. objective='val_accuracy'"
        )
        if not callbacks:
            raise ValueError(message + ".")
        # A callback may log it (ReduceLROnPlateau logs `learning_rate`).
        logging.warning("%s, unless one of the callbacks logs it.", message)


def _check_same_sweep(stamp_path, stamp):
    """Refuses to resume a sweep that ran with something else, whose trials
    would not compare."""
    previous = _io.read_json(stamp_path)
    if previous is not None:
        changed = sorted(k for k in stamp if previous.get(k) != stamp[k])
        if changed:
            raise ValueError(
                f"The sweep in {stamp_path.parent} ran with another "
                f"{', '.join(changed)}, so its trials would not compare with "
                "new ones. Pass overwrite=True to start it afresh, or a new "
                "project_name."
            )


def trials_table(kt_tuner):
    """One dict per trial: id, status, hyperparameters and score."""
    rows = []
    for trial_id, trial in sorted(
        kt_tuner.oracle.trials.items(), key=lambda item: int(item[0])
    ):
        values = trial.hyperparameters.values
        rows.append(
            {
                "trial": trial_id,
                "status": trial.status,
                "assistant_size": values.get("assistant_size"),
                "temperature": values.get("temperature"),
                "distillation_weight": round(values.get("distillation_weight", 0), 4),
                "loss": values.get("loss"),
                "score": trial.score,
            }
        )
    return rows


def write_results(kt_tuner, objective="val_accuracy"):
    """Writes best_hyperparameters.json and trials.json to the tuner's
    project folder, and returns the folder."""
    folder = pathlib.Path(kt_tuner.project_dir)
    rows = trials_table(kt_tuner)
    scored = [row for row in rows if row["score"] is not None]
    _io.write_json(folder / "trials.json", rows)
    if scored:
        best = kt_tuner.oracle.get_best_trials(1)[0]
        _io.write_json(
            folder / "best_hyperparameters.json",
            {
                "values": best.hyperparameters.values,
                objective: best.score,
                "trial": best.trial_id,
            },
        )
    return folder
