"""Teacher assistants (TAKD): distillation chains, all-paths search and the
choice of assistant (Mirzadeh et al., 2020).

When the teacher is much larger than the student, distilling through one or
more mid-sized assistants helps: teacher → assistant(s) → student. Each step
is one `Distiller.fit`, the teacher of a step being the trained student of the
step before. Trained models and a manifest are written to a work folder as
they finish, so rerunning the same call skips the finished steps.
"""

import dataclasses
import itertools
import json
import os
import pathlib
import time

from absl import logging
import keras

from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _fingerprints
from kd_keras import training
from kd_keras.losses import check_distillation_weight
from kd_keras.losses import check_temperature

MANIFEST = "manifest.json"


def _check_chain(models):
    if len(models) < 2:
        raise ValueError(
            "A distillation chain needs at least a teacher and a student: "
            f"[teacher, assistant..., student]. Received {len(models)} "
            "model(s)."
        )
    for index, model in enumerate(models):
        role = "teacher" if index == 0 else f"model {index} of the chain"
        _checks.check_keras_model(model, role)
        _checks.check_emits_logits(model, role)
    classes = [_checks.num_classes(m) for m in models]
    known = {c for c in classes if c is not None}
    if len(known) > 1:
        raise ValueError(
            "Every model of a chain must output the same number of classes. "
            "Received: " + ", ".join(
                f"{m.name}: {c}" for m, c in zip(models, classes)) + "."
        )
    for bigger, smaller in zip(models, models[1:]):
        if smaller.count_params() > bigger.count_params():
            logging.warning(
                "`%s` (%s parameters) is larger than its teacher `%s` (%s). "
                "Chains usually go from larger to smaller models.",
                smaller.name, f"{smaller.count_params():,}", bigger.name,
                f"{bigger.count_params():,}")


@dataclasses.dataclass
class _Settings:
    """What a distillation step depends on, besides its teacher and student."""

    temperature: float
    distillation_weight: float
    epochs: int
    learning_rate: float
    data: str
    seed: int

    def check(self):
        check_temperature(self.temperature)
        check_distillation_weight(self.distillation_weight)
        if self.epochs < 1:
            raise ValueError(
                f"Expected `epochs` >= 1. Received: epochs={self.epochs}")


class _StepStore:
    """Trained step models and their manifest in a work folder.

    A step is stored under the fingerprint of everything it depends on: its
    teacher's fingerprint, the student's architecture and the settings. A
    step is reused only if that fingerprint matches, so changed settings
    retrain the steps they affect and every step after them.
    """

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.trained = 0
        self.reused = 0

    def _manifest(self):
        path = self.workdir / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {}

    def _record(self, fingerprint, entry):
        manifest = self._manifest()
        manifest[fingerprint] = entry
        temporary = self.workdir / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(temporary, self.workdir / MANIFEST)

    def step(self, teacher, teacher_fingerprint, student, settings, train_data,
             val_data, verbose):
        """Distils `teacher` into `student` (in place), or reloads it.

        Returns `(fingerprint, report)`.
        """
        fingerprint = _fingerprints.digest(
            teacher_fingerprint, _fingerprints.architecture(student),
            dataclasses.asdict(settings))
        entry = self._manifest().get(fingerprint)
        if entry is not None and (self.workdir / entry["path"]).is_file():
            path = self.workdir / entry["path"]
            student.load_weights(path)
            self.reused += 1
            logging.info("Reusing %s from %s.", student.name, path)
            # Scored afresh: the validation data may have changed.
            return fingerprint, dict(
                entry, reused=True,
                val_accuracy=training.test_accuracy(student, val_data))
        path = self.workdir / f"{student.name}-{fingerprint}.keras"
        keras.utils.set_random_seed(settings.seed)
        with training.Stopwatch() as watch:
            training.distill(
                teacher, student, train_data, val_data,
                temperature=settings.temperature,
                distillation_weight=settings.distillation_weight,
                epochs=settings.epochs, learning_rate=settings.learning_rate,
                backup_dir=self.workdir / f"{fingerprint}.backup",
                verbose=verbose)
        student.save(path)
        entry = {
            "teacher": teacher.name,
            "student": student.name,
            "val_accuracy": training.test_accuracy(student, val_data),
            "epochs": settings.epochs,
            "seconds": watch.seconds,
            "path": path.name,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._record(fingerprint, entry)
        self.trained += 1
        logging.info("Distilled %s into %s: validation accuracy %.4f.",
                     teacher.name, student.name, entry["val_accuracy"])
        return fingerprint, dict(entry, reused=False)


def distill_chain(
    models,
    train_data,
    val_data,
    *,
    temperature=4.0,
    distillation_weight=0.9,
    epochs=10,
    workdir,
    learning_rate=1e-3,
    seed=0,
    verbose=0,
):
    """Distils a teacher into a student through assistants, step by step.

    Step `i` distils the trained `models[i]` into `models[i + 1]` with a
    `Distiller`; the teacher's logits are cached once per step unless the
    training data has random augmentation. Each trained model is saved in
    `workdir` with a manifest as soon as its step ends, and an interrupted
    step resumes from its last finished epoch, so calling again with the same
    arguments continues the chain. A step is reused only when its teacher,
    its student's architecture, the settings and the data are unchanged;
    otherwise it and every later step are trained again.

    Args:
        models: `[teacher, assistant..., student]`. The teacher is trained;
            the others are trained here, in place.
        train_data: the transfer set, a batched dataset of `(x, y)`.
        val_data: a batched dataset of `(x, y)` for the validation accuracy.
        temperature: T of every step.
        distillation_weight: λ of every step.
        epochs: epochs of every step.
        workdir: folder for the trained models and the manifest.
        learning_rate: Adam's learning rate.
        seed: the random seed set before every step (shuffles, dropout); the
            models come already initialised.
        verbose: Keras verbosity.

    Like a `Distiller`, the chain freezes each model it uses as a teacher
    (`trainable = False`).

    Returns:
        `(student, report)`: the trained student, and one dict per step with
        `teacher`, `student`, `val_accuracy`, `epochs`, `seconds` and
        `reused`.

    Example:

    ```python
    ladder = [teacher] + [kd_keras.models.plain_cnn(d, width=0.25)
                          for d in (8, 6, 4, 2)]
    student, report = kd_keras.assistants.distill_chain(
        ladder, train, val, temperature=10.0, epochs=5, workdir="chain")
    ```
    """
    models = list(models)
    _check_chain(models)
    settings = _Settings(temperature, distillation_weight, epochs,
                         learning_rate, _datasets.fingerprint(train_data), seed)
    settings.check()
    store = _StepStore(workdir)
    fingerprint = _fingerprints.weights(models[0])
    report = []
    for index, (teacher, student) in enumerate(zip(models, models[1:]), 1):
        fingerprint, entry = store.step(teacher, fingerprint, student, settings,
                                        train_data, val_data, verbose)
        report.append(dict(entry, step=index))
    return models[-1], report


def _build(builder, name, seed):
    keras.utils.set_random_seed(seed)
    if isinstance(builder, keras.Model):
        model = keras.models.clone_model(builder)
    elif callable(builder):
        model = builder()
    else:
        raise ValueError(
            f"Expected a function that returns a new model (or a model to "
            f"clone) for {name!r}. Received: {builder!r}"
        )
    _checks.check_keras_model(model, name)
    return model


def _path_name(assistants):
    return " → ".join(("teacher", *assistants, "student"))


@dataclasses.dataclass
class PathSearchResult:
    """The outcome of `search_paths`.

    Attributes:
        table: one dict per path: `path`, `assistants`, `steps`,
            `student_val_accuracy` (and `student_test_accuracy` with test
            data), sorted from the best student down.
        trainings: distillation steps run now (not reused from the folder).
        reused: steps reloaded from the work folder.
        distinct_steps: the steps the search needs, shared prefixes once.
        naive_trainings: the steps without memoisation (every path on its
            own).
        assistant_accuracies: `{prefix: validation accuracy}` of the
            assistant at the end of each prefix, e.g. `{("8",): 0.97,
            ("8", "6"): 0.96, ...}`.
    """

    table: list
    trainings: int
    reused: int
    distinct_steps: int
    naive_trainings: int
    assistant_accuracies: dict


def search_paths(
    teacher,
    candidates,
    student,
    train_data,
    val_data,
    *,
    test_data=None,
    temperature=4.0,
    distillation_weight=0.9,
    epochs=10,
    workdir,
    learning_rate=1e-3,
    seed=0,
    verbose=0,
):
    """Trains every distillation path from the teacher to the student.

    The paths go through every ordered subset of the candidate assistants, in
    the order given (largest first), as in Figure 5 of Mirzadeh et al.
    (2020): with candidates 8, 6 and 4, the eight paths are T→S, T→8→S,
    T→6→S, T→4→S, T→8→6→S, T→8→4→S, T→6→4→S and T→8→6→4→S. Shared prefixes
    are trained once: T→8 serves four paths. Every model of the same
    architecture starts from the same initial weights (`seed`), so paths
    differ only in what they distil. Steps are stored in `workdir` as in
    `distill_chain`, so an interrupted search resumes.

    Args:
        teacher: the trained teacher.
        candidates: `{name: builder}` of assistants, largest first; a builder
            is a function returning a new model (or a model to clone).
        student: the student's builder (or a model to clone).
        train_data: the transfer set, a batched dataset of `(x, y)`.
        val_data: a batched dataset of `(x, y)`.
        test_data: optional batched dataset for a test accuracy per path.
        temperature, distillation_weight, epochs, learning_rate: as in
            `distill_chain`, for every step.
        workdir: folder for the trained models and the manifest.
        seed: seed of every model's initial weights and every step.
        verbose: Keras verbosity.

    Returns:
        A `PathSearchResult`.
    """
    names = list(candidates)
    if len(set(names)) != len(names):
        raise ValueError(f"Candidate names must be unique. Received: {names}")
    _check_chain([teacher, _build(student, "student", seed)])
    settings = _Settings(temperature, distillation_weight, epochs,
                         learning_rate, _datasets.fingerprint(train_data), seed)
    settings.check()
    store = _StepStore(workdir)
    paths = [combo for size in range(len(names) + 1)
             for combo in itertools.combinations(names, size)]
    # Assistants at the end of each distinct prefix, shortest prefixes first.
    trained = {(): (teacher, _fingerprints.weights(teacher))}
    accuracies = {}
    for prefix in sorted({p[:k] for p in paths for k in range(1, len(p) + 1)},
                         key=len):
        parent, parent_fingerprint = trained[prefix[:-1]]
        assistant = _build(candidates[prefix[-1]], prefix[-1], seed)
        _check_chain([parent, assistant])
        fingerprint, entry = store.step(parent, parent_fingerprint, assistant,
                                        settings, train_data, val_data, verbose)
        trained[prefix] = (assistant, fingerprint)
        accuracies[prefix] = entry["val_accuracy"]
    table = []
    for path in paths:
        parent, parent_fingerprint = trained[path]
        model = _build(student, "student", seed)
        _, entry = store.step(parent, parent_fingerprint, model, settings,
                              train_data, val_data, verbose)
        row = {
            "path": _path_name(path),
            "assistants": list(path),
            "steps": len(path) + 1,
            "student_val_accuracy": entry["val_accuracy"],
        }
        if test_data is not None:
            row["student_test_accuracy"] = training.test_accuracy(model, test_data)
        table.append(row)
    table.sort(key=lambda row: -row["student_val_accuracy"])
    return PathSearchResult(
        table=table,
        trainings=store.trained,
        reused=store.reused,
        distinct_steps=len(trained) - 1 + len(paths),
        naive_trainings=sum(len(p) + 1 for p in paths),
        assistant_accuracies=accuracies,
    )


def suggest_assistant(
    candidates,
    teacher_accuracy=None,
    student_accuracy=None,
    *,
    teacher=None,
    student=None,
    train_data=None,
    val_data=None,
    epochs=1,
    learning_rate=1e-3,
    seed=0,
):
    """Picks the assistant whose accuracy is nearest the teacher's and the
    student's mean.

    Mirzadeh et al. (2020) found the best single assistant is not the one of
    middle size but the one of middle accuracy. With known accuracies,
    `candidates` maps names to accuracies. Otherwise `candidates` maps names
    to builders (or models to clone): each candidate, and the student, is
    trained on the labels for `epochs` epochs and scored on `val_data`, and
    the teacher (a trained model) is scored as it is.

    Args:
        candidates: `{name: accuracy}`, or `{name: builder}` to estimate.
        teacher_accuracy: the teacher's accuracy, or None to measure `teacher`.
        student_accuracy: the student's accuracy, or None to estimate it by
            training `student` (a builder) briefly.
        teacher: the trained teacher, when `teacher_accuracy` is None.
        student: the student's builder, when `student_accuracy` is None.
        train_data: batched `(x, y)` for the short trainings.
        val_data: batched `(x, y)` to score on.
        epochs: epochs of each short training.
        learning_rate: Adam's learning rate of the short trainings.
        seed: seed of the short trainings.

    Returns:
        A dict: `assistant` (the chosen name), `target_accuracy` (the mean),
        `accuracies` (per candidate), `teacher_accuracy` and
        `student_accuracy`.

    Example:

    >>> suggest_assistant({"8": 0.78, "6": 0.76, "4": 0.74},
    ...                   teacher_accuracy=0.80, student_accuracy=0.70)["assistant"]
    '6'
    """
    if not candidates:
        raise ValueError("Expected at least one candidate assistant.")
    values = list(candidates.values())
    known = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in values)
    if not known and (train_data is None or val_data is None):
        raise ValueError(
            "To estimate the candidates' accuracies, pass `train_data` and "
            "`val_data` (or pass known accuracies as {name: accuracy})."
        )

    def estimate(builder, name):
        model = _build(builder, name, seed)
        training.train(model, train_data, epochs=epochs,
                       learning_rate=learning_rate, verbose=0)
        return training.test_accuracy(model, val_data)

    if teacher_accuracy is None:
        if teacher is None or val_data is None:
            raise ValueError("Pass `teacher_accuracy`, or `teacher` and "
                             "`val_data` to measure it.")
        teacher_accuracy = training.test_accuracy(teacher, val_data)
    if student_accuracy is None:
        if student is None or train_data is None or val_data is None:
            raise ValueError("Pass `student_accuracy`, or `student` (a "
                             "builder), `train_data` and `val_data` to "
                             "estimate it.")
        student_accuracy = estimate(student, "student")
    accuracies = dict(candidates) if known else {
        name: estimate(builder, name) for name, builder in candidates.items()}
    target = (teacher_accuracy + student_accuracy) / 2.0
    best = min(accuracies, key=lambda name: abs(accuracies[name] - target))
    return {
        "assistant": best,
        "target_accuracy": target,
        "accuracies": accuracies,
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy": student_accuracy,
    }
