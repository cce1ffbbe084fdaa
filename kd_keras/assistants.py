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
import numbers
import pathlib

from absl import logging
import keras

from kd_keras import _checks
from kd_keras import _fingerprints
from kd_keras import training
from kd_keras.store import ModelStore
from kd_keras.store import Settings


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
            "Received: "
            + ", ".join(f"{m.name}: {c}" for m, c in zip(models, classes, strict=True))
            + "."
        )
    for bigger, smaller in zip(models, models[1:], strict=False):
        _checks.check_same_inputs(bigger, smaller)
        if smaller.count_params() > bigger.count_params():
            logging.warning(
                "`%s` (%s parameters) is larger than its teacher `%s` (%s). "
                "Chains usually go from larger to smaller models.",
                smaller.name,
                f"{smaller.count_params():,}",
                bigger.name,
                f"{bigger.count_params():,}",
            )


def distill_chain(
    models, train_data, val_data, *, workdir, logdir=None, verbose=0, **settings
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
        workdir: folder for the trained models and the manifest (a
            `kd_keras.store.ModelStore`).
        logdir: if set, each step writes TensorBoard logs (both loss terms,
            T and λ) to `logdir/<student name>`.
        verbose: Keras verbosity.
        **settings: the settings of every step, fields of
            `kd_keras.store.Settings`: `temperature` (4.0),
            `distillation_weight` (0.9), `epochs` (10), `optimizer` ("adam",
            copied for every step), `learning_rate` (1e-3) and `seed` (0, of
            the shuffle of the cached logits; the models come initialised by
            the caller).

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
    ladder = _Ladder(workdir, train_data, val_data, logdir, verbose, settings)
    fingerprint = _fingerprints.weights(models[0])
    report = []
    pairs = zip(models, models[1:], strict=False)
    for index, (teacher, student) in enumerate(pairs, 1):
        fingerprint, entry = ladder.step(teacher, fingerprint, student, student.name)
        report.append(dict(entry, step=index))
    return models[-1], report


class _Ladder:
    """The distillation steps of a chain or a path search: stored in one
    folder, with the same data, settings and logging."""

    def __init__(self, workdir, train_data, val_data, logdir, verbose, settings):
        try:
            self.settings = Settings(**settings)
        except TypeError as error:
            raise ValueError(
                f"Unknown setting ({error}). The settings are the fields of "
                "`kd_keras.store.Settings`: "
                + ", ".join(f.name for f in dataclasses.fields(Settings))
            ) from None
        self.settings.check()
        self.store = ModelStore(workdir)
        self.train_data = training.as_batches(train_data)
        self.val_data = val_data
        self.logdir = logdir
        self.verbose = verbose

    def step(self, teacher, teacher_fingerprint, student, name):
        """Distils `teacher` into `student` (or reloads it); logs go to
        `logdir/name`. Returns `(fingerprint, entry)`."""
        callbacks = []
        if self.logdir is not None:
            log_dir = str(pathlib.Path(self.logdir) / name)
            callbacks.append(keras.callbacks.TensorBoard(log_dir))
        return self.store.distill(
            teacher,
            student,
            self.train_data,
            self.val_data,
            self.settings,
            teacher_fingerprint=teacher_fingerprint,
            callbacks=callbacks,
            verbose=self.verbose,
        )


def _build(builder, name):
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


class _SameStart:
    """New models from a builder, every one starting from the weights of
    the first, so that paths differ only in what they distil."""

    def __init__(self, builder, name):
        self.builder, self.name = builder, name
        self.initial_weights = None

    def __call__(self):
        model = _build(self.builder, self.name)
        if self.initial_weights is None:
            self.initial_weights = model.get_weights()
        else:
            model.set_weights(self.initial_weights)
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
    workdir,
    logdir=None,
    verbose=0,
    **settings,
):
    """Trains every distillation path from the teacher to the student.

    The paths go through every ordered subset of the candidate assistants, in
    the order given (largest first), as in Figure 5 of Mirzadeh et al.
    (2020): with candidates 8, 6 and 4, the eight paths are T→S, T→8→S,
    T→6→S, T→4→S, T→8→6→S, T→8→4→S, T→6→4→S and T→8→6→4→S. Shared prefixes
    are trained once: T→8 serves four paths. Every model built from the same
    builder starts from the same initial weights (those of its first
    build), so paths differ only in what they distil. Steps are stored in
    `workdir` as in `distill_chain`, so an interrupted search resumes.

    Args:
        teacher: the trained teacher.
        candidates: `{name: builder}` of assistants, largest first; a builder
            is a function returning a new model (or a model to clone).
        student: the student's builder (or a model to clone).
        train_data: the transfer set, a batched dataset of `(x, y)`.
        val_data: a batched dataset of `(x, y)`.
        test_data: optional batched dataset for a test accuracy per path.
        workdir: folder for the trained models and the manifest.
        logdir: as in `distill_chain` (logs go to `logdir/<path>`).
        verbose: Keras verbosity.
        **settings: the settings of every step, as in `distill_chain`.

    Returns:
        A `PathSearchResult`.
    """
    if not isinstance(candidates, dict):
        raise ValueError(
            "Expected `candidates` as a dict {name: builder}, largest first, "
            "such as {'8': lambda: plain_cnn(8)}. Received: candidates="
            f"{candidates!r}"
        )
    if not candidates:
        logging.warning(
            "search_paths got no candidates, so it trains the direct path "
            "teacher → student only."
        )
    names = list(candidates)
    new_student = _SameStart(student, "student")
    _check_chain([teacher, new_student()])
    builders = {name: _SameStart(candidates[name], name) for name in names}
    ladder = _Ladder(workdir, train_data, val_data, logdir, verbose, settings)
    paths = [
        combo
        for size in range(len(names) + 1)
        for combo in itertools.combinations(names, size)
    ]
    # Assistants at the end of each distinct prefix, shortest prefixes first.
    trained = {(): (teacher, _fingerprints.weights(teacher))}
    accuracies = {}
    for prefix in sorted({p[:k] for p in paths for k in range(1, len(p) + 1)}, key=len):
        parent, parent_fingerprint = trained[prefix[:-1]]
        assistant = builders[prefix[-1]]()
        _check_chain([parent, assistant])
        fingerprint, entry = ladder.step(
            parent, parent_fingerprint, assistant, "-".join(prefix)
        )
        trained[prefix] = (assistant, fingerprint)
        accuracies[prefix] = entry["val_accuracy"]
    table = []
    for path in paths:
        parent, parent_fingerprint = trained[path]
        model = new_student()
        _, entry = ladder.step(
            parent, parent_fingerprint, model, "-".join((*path, "student"))
        )
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
        trainings=ladder.store.trained,
        reused=ladder.store.reused,
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
    optimizer="adam",
    learning_rate=1e-3,
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
        optimizer: a Keras optimizer (copied) or its config, or the name of
            one to use with `learning_rate`, for the short trainings.
        learning_rate: the learning rate of an optimizer given by name.

    Returns:
        A dict: `assistant` (the chosen name), `target_accuracy` (the mean),
        `accuracies` (per candidate), `teacher_accuracy` and
        `student_accuracy`.

    Example:

        >>> suggest_assistant({"8": 0.78, "6": 0.76, "4": 0.74},
        ...                   teacher_accuracy=0.80, student_accuracy=0.70)["assistant"]
        '6'
    """
    known = _check_candidates(candidates)
    for name, value in (
        ("teacher_accuracy", teacher_accuracy),
        ("student_accuracy", student_accuracy),
    ):
        if value is not None:
            _check_accuracy(value, name)
    if not known and (train_data is None or val_data is None):
        raise ValueError(
            "To estimate the candidates' accuracies, pass `train_data` and "
            "`val_data` (or pass known accuracies as {name: accuracy})."
        )

    def estimate(builder, name):
        model = _build(builder, name)
        training.train(
            model,
            train_data,
            epochs=epochs,
            optimizer=optimizer,
            learning_rate=learning_rate,
            verbose=0,
        )
        return training.test_accuracy(model, val_data)

    if teacher_accuracy is None:
        if teacher is None or val_data is None:
            raise ValueError(
                "Pass `teacher_accuracy`, or `teacher` and `val_data` to measure it."
            )
        teacher_accuracy = training.test_accuracy(teacher, val_data)
    if student_accuracy is None:
        if student is None or train_data is None or val_data is None:
            raise ValueError(
                "Pass `student_accuracy`, or `student` (a "
                "builder), `train_data` and `val_data` to "
                "estimate it."
            )
        student_accuracy = estimate(student, "student")
    accuracies = (
        {k: float(v) for k, v in candidates.items()}
        if known
        else {name: estimate(builder, name) for name, builder in candidates.items()}
    )
    target = (teacher_accuracy + student_accuracy) / 2.0
    best = min(accuracies, key=lambda name: abs(accuracies[name] - target))
    return {
        "assistant": best,
        "target_accuracy": target,
        "accuracies": accuracies,
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy": student_accuracy,
    }


def _is_accuracy(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_accuracy(value, name):
    if not _is_accuracy(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"Expected accuracies as fractions in [0, 1]. Received: "
            f"{name}={value!r}. Divide percentages by 100."
        )


def _check_candidates(candidates):
    """Returns True for known accuracies, False for builders to estimate."""
    if not isinstance(candidates, dict) or not candidates:
        raise ValueError(
            "Expected `candidates` as a non-empty dict, {name: accuracy} or "
            f"{{name: builder}}. Received: candidates={candidates!r}"
        )
    known = [_is_accuracy(v) for v in candidates.values()]
    for (name, value), is_accuracy in zip(candidates.items(), known, strict=True):
        if is_accuracy:
            _check_accuracy(value, f"candidates[{name!r}]")
        elif not callable(value):
            raise ValueError(
                "Expected each candidate to be an accuracy in [0, 1] or a "
                "builder of a model. Received: "
                f"candidates[{name!r}]={value!r} ({type(value).__name__})."
            )
    if any(known) and not all(known):
        raise ValueError(
            "Expected `candidates` to hold either accuracies or builders, not "
            f"both. Received: {candidates!r}"
        )
    return all(known)
