"""`kd-keras`: a thin command line over the library.

    kd-keras COMMAND [--flag=value ...]
    kd-keras COMMAND --help

Each command is one or two library calls; the command prints what they
return.
"""

import inspect
import os
import pathlib
import sys
import textwrap

from absl import flags
from absl import logging

from kd_keras import _fingerprints

COMMANDS = {}


def _command(*flag_groups):
    """Registers a command; its flags live in a FlagValues of its own."""

    def register(function):
        flag_values = flags.FlagValues()
        for group in flag_groups:
            group(flag_values)
        name = function.__name__.rstrip("_").replace("_", "-")
        COMMANDS[name] = (function, flag_values)
        return function

    return register


# Flag groups.


def _data_flags(fv):
    flags.DEFINE_string(
        "dataset", "mnist",
        "tensorflow-datasets name, or 'mnist_sample' for the digits shipped "
        "with the package.", flag_values=fv)
    flags.DEFINE_string(
        "data_dir", None,
        "tensorflow-datasets data folder (see `kd-keras data` to import local "
        "MNIST IDX files into one).", flag_values=fv)
    flags.DEFINE_string("train_split", "train", "Split to train on.",
                        flag_values=fv)
    flags.DEFINE_string("test_split", "test", "Split to test on.",
                        flag_values=fv)
    flags.DEFINE_string("val_split", None,
                        "Split to validate on (and to choose by, in `paths`); "
                        "defaults to the test split. E.g. train[90%:] with "
                        "--train_split=train[:90%].", flag_values=fv)
    flags.DEFINE_integer("batch_size", 128, "Batch size.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of weights, shuffles and jitter.",
                         flag_values=fv)


def _model_flags(fv):
    flags.DEFINE_enum("family", "mlp", ["mlp", "plain_cnn"],
                      "Model family of the model to train.", flag_values=fv)
    flags.DEFINE_list("hidden", ["800", "800"],
                      "mlp: hidden layer widths, e.g. 1200,1200.",
                      flag_values=fv)
    flags.DEFINE_float("dropout", 0.0, "mlp: dropout after hidden layers.",
                       flag_values=fv)
    flags.DEFINE_float("input_dropout", 0.0, "mlp: dropout on the inputs.",
                       flag_values=fv)
    flags.DEFINE_float("max_norm", None,
                       "mlp: max-norm of each unit's incoming weights.",
                       flag_values=fv)
    flags.DEFINE_integer("depth", 2, "plain_cnn: depth (2, 4, 6, 8 or 10).",
                         flag_values=fv)
    flags.DEFINE_float("width", 1.0, "plain_cnn: width multiplier.",
                       flag_values=fv)


def _fit_flags(fv):
    flags.DEFINE_integer("epochs", 10, "Epochs to train.", flag_values=fv)
    flags.DEFINE_float("learning_rate", 1e-3, "Adam's learning rate.",
                       flag_values=fv)
    flags.DEFINE_integer("jitter", 0,
                         "Shift training images by up to this many pixels.",
                         flag_values=fv)
    flags.DEFINE_string("output", None, "Where to write the trained .keras "
                        "model.", required=True, flag_values=fv)
    flags.DEFINE_integer("verbose", 1, "Keras verbosity: 0, 1 (progress "
                         "bars) or 2 (a line per epoch).", flag_values=fv)


def _snapshot_flags(fv):
    flags.DEFINE_list("snapshot_epochs", [],
                      "Also save the model after these epochs (counted from "
                      "1), e.g. 5,10,20, into OUTPUT.snapshots/ with a "
                      "manifest, for early-stopped teachers.", flag_values=fv)
    flags.DEFINE_integer("snapshot_every", None,
                         "Also save the model every N epochs.", flag_values=fv)


def _distill_flags(fv):
    flags.DEFINE_string("teacher", None, "The trained teacher, a .keras file.",
                        required=True, flag_values=fv)
    flags.DEFINE_float("temperature", 4.0, "Distillation temperature T > 0.",
                       flag_values=fv)
    flags.DEFINE_float("distillation_weight", 0.9,
                       "Weight λ of the distillation term, in [0, 1].",
                       flag_values=fv)
    flags.DEFINE_enum("cache_teacher", "auto", ["auto", "yes", "no"],
                      "Cache the teacher's logits once ('auto': unless the "
                      "data is jittered).", flag_values=fv)
    flags.DEFINE_integer("teacher_snapshot", None,
                         "Distil from the snapshot of the teacher taken after "
                         "this epoch (see `train --snapshot_epochs`) instead "
                         "of the final teacher.", flag_values=fv)
    flags.DEFINE_integer("student_early_stop_epoch", None,
                         "Distil for this many epochs, then train on the "
                         "labels only.", flag_values=fv)
    flags.DEFINE_string("student_early_stop_monitor", None,
                        "Train on the labels only once this logged metric "
                        "(e.g. val_accuracy) stops improving.", flag_values=fv)
    flags.DEFINE_integer("student_early_stop_patience", 2,
                         "Epochs without improvement of the monitored metric "
                         "before the switch.", flag_values=fv)


def _ladder_flags(fv):
    # These commands choose by validation accuracy: hold it out of train.
    fv.set_default("train_split", "train[:90%]")
    fv.set_default("val_split", "train[90%:]")
    flags.DEFINE_enum("family", "plain_cnn", ["mlp", "plain_cnn"],
                      "Model family of every model of the chain.",
                      flag_values=fv)
    flags.DEFINE_float("width", 0.25, "plain_cnn: width multiplier.",
                       flag_values=fv)
    flags.DEFINE_string("teacher", None,
                        "A trained teacher (.keras); if not given, the "
                        "teacher of the first size is trained on the labels "
                        "in the work folder first.", flag_values=fv)
    flags.DEFINE_integer("teacher_epochs", None,
                         "Epochs of that teacher (default: --epochs).",
                         flag_values=fv)
    flags.DEFINE_integer("epochs", 5, "Epochs of every distillation step.",
                         flag_values=fv)
    flags.DEFINE_float("learning_rate", 1e-3, "Adam's learning rate.",
                       flag_values=fv)
    flags.DEFINE_string("workdir", "kd_keras_runs",
                        "Folder for the trained models, the manifest and the "
                        "plot; rerunning continues from what it holds.",
                        flag_values=fv)
    flags.DEFINE_integer("verbose", 0, "Keras verbosity.", flag_values=fv)


def _kd_flags(fv):
    flags.DEFINE_float("temperature", 4.0, "Distillation temperature.",
                       flag_values=fv)
    flags.DEFINE_float("distillation_weight", 0.9, "Weight of the KD term.",
                       flag_values=fv)


def _tune_flags(fv):
    flags.DEFINE_string("teacher_size", "10", "Size of the teacher, when "
                        "--teacher is not given.", flag_values=fv)
    flags.DEFINE_string("student_size", "2", "Size of the student.",
                        flag_values=fv)
    flags.DEFINE_list("assistant_sizes", ["8", "6", "4"],
                      "Sizes of the assistants to choose from ('none' is "
                      "always a choice); empty for no assistants.",
                      flag_values=fv)
    flags.DEFINE_list("temperatures", ["1", "2", "5", "10", "15", "20"],
                      "Temperatures to choose from.", flag_values=fv)
    flags.DEFINE_list("distillation_weights", ["0.05", "1", "0.05"],
                      "min,max,step of the distillation weight.",
                      flag_values=fv)
    flags.DEFINE_enum("tuner", "bayesian", ["bayesian", "random", "hyperband"],
                      "keras-tuner tuner.", flag_values=fv)
    flags.DEFINE_integer("max_trials", 12, "Trials of the sweep.",
                         flag_values=fv)
    flags.DEFINE_string("project_name", "sweep",
                        "The sweep's name inside --workdir.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False,
                      "Start afresh instead of resuming the sweep.",
                      flag_values=fv)
    flags.DEFINE_enum("mixed_precision", None,
                      ["mixed_float16", "mixed_bfloat16"],
                      "Build students and assistants under this policy.",
                      flag_values=fv)
    flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                      "Compile the training steps with XLA.", flag_values=fv)


def _chain_flags(fv):
    flags.DEFINE_list("sizes", ["10", "4", "2"],
                      "Sizes from teacher to student: plain_cnn depths, or "
                      "mlp widths of two hidden layers.", flag_values=fv)


def _paths_flags(fv):
    flags.DEFINE_string("teacher_size", "10", "Size of the teacher.",
                        flag_values=fv)
    flags.DEFINE_list("candidates", ["8", "6", "4"],
                      "Sizes of the candidate assistants, largest first.",
                      flag_values=fv)
    flags.DEFINE_string("student_size", "2", "Size of the student.",
                        flag_values=fv)


def _export_flags(fv):
    flags.DEFINE_string("model", None, "The .keras model to export.",
                        required=True, flag_values=fv)
    flags.DEFINE_string("output", None, "Folder to export to (default: the "
                        "model's path without .keras, plus _export).",
                        flag_values=fv)
    flags.DEFINE_list("formats", ["saved_model", "tflite", "tflite_dynamic",
                                  "tflite_int8"],
                      "Formats to write.", flag_values=fv)
    flags.DEFINE_string("representative_split", "train[:1000]",
                        "Split whose inputs calibrate int8.", flag_values=fv)
    flags.DEFINE_float("tolerance", 1e-4,
                       "Largest logit difference allowed in float formats.",
                       flag_values=fv)


def _reproduce_flags(fv):
    flags.DEFINE_string("data_dir", None,
                        "tensorflow-datasets folder with MNIST (see `kd-keras "
                        "data`).", flag_values=fv)
    flags.DEFINE_string("output_dir", "hinton_mnist",
                        "Folder for the table, JSON and plots.",
                        flag_values=fv)
    flags.DEFINE_bool("quick", False, "A smaller run (about 10 minutes on "
                      "2 cores) instead of the full one (about 90).",
                      flag_values=fv)
    flags.DEFINE_integer("seeds", None, "Seeds (default: 3, or 2 quick).",
                         flag_values=fv)
    flags.DEFINE_integer("verbose", 0, "Keras verbosity.", flag_values=fv)


def _evaluate_flags(fv):
    flags.DEFINE_string("model", None, "The .keras model to evaluate.",
                        required=True, flag_values=fv)


def _demo_flags(fv):
    flags.DEFINE_string("workdir", "kd_keras_demo",
                        "Folder for the trained models and the plot.",
                        flag_values=fv)
    flags.DEFINE_integer("epochs", 20, "Epochs of each student.",
                         flag_values=fv)
    flags.DEFINE_integer("teacher_epochs", 30, "Epochs of the teacher.",
                         flag_values=fv)
    flags.DEFINE_float("temperature", 8.0, "Distillation temperature.",
                       flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed.", flag_values=fv)
    flags.DEFINE_integer("verbose", 2, "Keras verbosity.", flag_values=fv)


def _import_flags(fv):
    flags.DEFINE_string("idx_dir", None,
                        "Folder with the four MNIST IDX files (.gz or not).",
                        required=True, flag_values=fv)
    flags.DEFINE_string("data_dir", "~/tensorflow_datasets",
                        "tensorflow-datasets folder to import into.",
                        flag_values=fv)


# Helpers.


def _table(rows, columns):
    widths = {
        c: max(len(c), *(len(_cell(r.get(c, ""))) for r in rows)) for c in columns
    }
    lines = ["  ".join(c.ljust(widths[c]) for c in columns),
             "  ".join("-" * widths[c] for c in columns)]
    for row in rows:
        lines.append("  ".join(_cell(row.get(c, "")).ljust(widths[c])
                               for c in columns))
    return "\n".join(lines)


def _cell(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _load_splits(fv, jitter=0):
    """Returns (train, validation, test) batches."""
    from kd_keras import data

    load = dict(name=fv.dataset, data_dir=fv.data_dir,
                batch_size=fv.batch_size, seed=fv.seed)
    train = data.load(split=fv.train_split, shuffle=True, max_shift=jitter,
                      **load)
    test = data.load(split=fv.test_split, **load)
    val = test if fv.val_split is None else data.load(split=fv.val_split,
                                                      **load)
    return train, val, test


def _build_model(fv, name):
    from kd_keras import models

    if fv.family == "mlp":
        return models.mlp(
            tuple(int(w) for w in fv.hidden), dropout=fv.dropout,
            input_dropout=fv.input_dropout, max_norm=fv.max_norm, name=name)
    return models.plain_cnn(fv.depth, width=fv.width, name=name)


def _output_path(fv):
    path = pathlib.Path(fv.output)
    if path.suffix != ".keras":
        raise ValueError(
            f"Expected --output to end in .keras. Received: --output={path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _backup_dir(fv, path, *extra):
    """The BackupAndRestore folder of a run, named by all its settings.

    Rerunning the same command resumes it; changed flags (or another teacher)
    start afresh instead of restoring a run they did not make.
    """
    settings = {k: v for k, v in fv.flag_values_dict().items()
                if k != "verbose"}
    return path.with_name(
        f"{path.stem}.{_fingerprints.digest(settings, *extra)}.backup")


def _snapshot_dir(model_path):
    return model_path.with_suffix(".snapshots")


def _report(model, test, path):
    from kd_keras import training

    errors, examples = training.test_errors(model, test)
    print(_table([{
        "model": str(path), "params": model.count_params(),
        "test_errors": errors, "test_examples": examples,
        "error_percent": 100.0 * errors / examples}],
        ["model", "params", "test_errors", "test_examples", "error_percent"]))


# Commands.


@_command(_demo_flags)
def demo(fv):
    """Distils a teacher into a student on the MNIST sample shipped with the
    package, and prints the test errors of teacher, scratch student and
    distilled student. Takes a few minutes on two cores."""
    from kd_keras.demo import run_demo

    rows = run_demo(workdir=fv.workdir, epochs=fv.epochs,
                    teacher_epochs=fv.teacher_epochs,
                    temperature=fv.temperature, seed=fv.seed,
                    verbose=fv.verbose)
    print()
    print(_table(rows, ["model", "params", "test_errors", "test_examples",
                        "error_percent", "epochs", "seconds"]))
    print(f"\nModels and students_val_accuracy.png are in {fv.workdir}/")


@_command(_data_flags, _model_flags, _fit_flags, _snapshot_flags)
def train(fv):
    """Trains a model on the labels (a teacher, or a student from scratch)
    and writes it as a .keras file. Rerunning an interrupted command resumes
    from its last finished epoch."""
    from kd_keras import training

    from kd_keras.callbacks import TeacherSnapshots

    path = _output_path(fv)
    train_data, val, test = _load_splits(fv, jitter=fv.jitter)
    model = _build_model(fv, path.stem)
    callbacks = []
    if fv.snapshot_epochs or fv.snapshot_every:
        callbacks.append(TeacherSnapshots(
            _snapshot_dir(path), epochs=[int(e) for e in fv.snapshot_epochs],
            every=fv.snapshot_every))
    training.train(model, train_data, val, epochs=fv.epochs,
                   learning_rate=fv.learning_rate, callbacks=callbacks,
                   backup_dir=_backup_dir(fv, path), verbose=fv.verbose)
    model.save(path)
    _report(model, test, path)
    if callbacks:
        print(f"\nSnapshots of epochs "
              f"{', '.join(TeacherSnapshots.read_manifest(_snapshot_dir(path)))}"
              f" are in {_snapshot_dir(path)}/")


@_command(_data_flags, _model_flags, _fit_flags, _distill_flags)
def distill(fv):
    """Distils a trained teacher (.keras) into a new student and writes the
    student as a .keras file (without the teacher). Rerunning an interrupted
    command resumes from its last finished epoch."""
    import keras
    from kd_keras import training

    from kd_keras.callbacks import StudentEarlyStop
    from kd_keras.callbacks import TeacherSnapshots

    path = _output_path(fv)
    train_data, val, test = _load_splits(fv, jitter=fv.jitter)
    if fv.teacher_snapshot is None:
        teacher = keras.saving.load_model(fv.teacher)
    else:
        teacher = TeacherSnapshots.load(
            _snapshot_dir(pathlib.Path(fv.teacher)), fv.teacher_snapshot)
    student = _build_model(fv, path.stem)
    callbacks = []
    if fv.student_early_stop_epoch is not None or fv.student_early_stop_monitor:
        callbacks.append(StudentEarlyStop(
            epoch=fv.student_early_stop_epoch,
            monitor=fv.student_early_stop_monitor,
            patience=fv.student_early_stop_patience))
    cache = {"auto": "auto", "yes": True, "no": False}[fv.cache_teacher]
    training.distill(teacher, student, train_data, val,
                     temperature=fv.temperature,
                     distillation_weight=fv.distillation_weight,
                     epochs=fv.epochs, learning_rate=fv.learning_rate,
                     cache=cache, callbacks=callbacks,
                     backup_dir=_backup_dir(fv, path,
                                            _fingerprints.weights(teacher)),
                     verbose=fv.verbose)
    student.save(path)
    _report(student, test, path)
    if callbacks and callbacks[0].switch_epoch is not None:
        print(f"\nThe student trained on the labels only from epoch "
              f"{callbacks[0].switch_epoch + 1}.")


def _ladder_model(fv, size, name):
    from kd_keras import models

    if fv.family == "mlp":
        return models.mlp((int(size), int(size)), name=name)
    return models.plain_cnn(int(size), width=fv.width, name=name)


def _ladder_teacher(fv, size, train_data, val):
    """Loads --teacher, or trains (or reloads) one in the work folder."""
    import keras
    from kd_keras import training

    if fv.teacher:
        return keras.saving.load_model(fv.teacher)
    workdir = pathlib.Path(fv.workdir)
    # Named by what it depends on, so changed flags train a new teacher.
    key = _fingerprints.digest(
        fv.family, size, fv.width, fv.dataset, fv.data_dir, fv.train_split,
        fv.val_split, fv.test_split, fv.batch_size, fv.seed,
        fv.teacher_epochs or fv.epochs, fv.learning_rate)
    path = workdir / f"teacher_{fv.family}_{size}_{key}.keras"
    if path.is_file():
        print(f"Reusing the teacher {path}")
        return keras.saving.load_model(path)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = _ladder_model(fv, size, f"teacher_{size}")
    training.train(teacher, train_data, val,
                   epochs=fv.teacher_epochs or fv.epochs,
                   learning_rate=fv.learning_rate,
                   backup_dir=path.with_suffix(".backup"), verbose=fv.verbose)
    teacher.save(path)
    return teacher


@_command(_data_flags, _ladder_flags, _kd_flags, _chain_flags)
def chain(fv):
    """Distils a teacher into a student through assistants of the given
    sizes, one step after another, and prints each step's validation
    accuracy. Rerunning the command skips the finished steps."""
    from kd_keras import assistants
    from kd_keras import plots
    from kd_keras import training

    if len(fv.sizes) < 2:
        raise ValueError("Expected at least two --sizes: teacher and student.")
    train_data, val, test = _load_splits(fv)
    teacher = _ladder_teacher(fv, fv.sizes[0], train_data, val)
    ladder = [teacher] + [_ladder_model(fv, size, f"{fv.family}_{size}")
                          for size in fv.sizes[1:]]
    student, report = assistants.distill_chain(
        ladder, train_data, val, temperature=fv.temperature,
        distillation_weight=fv.distillation_weight, epochs=fv.epochs,
        learning_rate=fv.learning_rate, workdir=pathlib.Path(fv.workdir) /
        "chain", seed=fv.seed, verbose=fv.verbose)
    print(_table(report, ["step", "teacher", "student", "val_accuracy",
                          "epochs", "seconds", "reused"]))
    errors, examples = training.test_errors(student, test)
    print(f"\nStudent test errors: {errors}/{examples}")
    png = pathlib.Path(fv.workdir) / "chain.png"
    plots.plot_chain(report, path=png)
    print(f"Wrote {png}")


@_command(_data_flags, _ladder_flags, _kd_flags, _paths_flags)
def paths(fv):
    """Trains every distillation path from the teacher to the student through
    the candidate assistants (shared prefixes once), and prints the student
    accuracy of each path. Rerunning the command skips finished steps."""
    from kd_keras import assistants
    from kd_keras import plots

    train_data, val, test = _load_splits(fv)
    teacher = _ladder_teacher(fv, fv.teacher_size, train_data, val)
    candidates = {
        size: (lambda size=size: _ladder_model(fv, size, f"{fv.family}_{size}"))
        for size in fv.candidates}
    result = assistants.search_paths(
        teacher, candidates,
        lambda: _ladder_model(fv, fv.student_size, "student"),
        train_data, val, test_data=test, temperature=fv.temperature,
        distillation_weight=fv.distillation_weight, epochs=fv.epochs,
        learning_rate=fv.learning_rate,
        workdir=pathlib.Path(fv.workdir) / "paths", seed=fv.seed,
        verbose=fv.verbose)
    print(_table(result.table, ["path", "steps", "student_val_accuracy",
                                "student_test_accuracy"]))
    print(f"\n{result.trainings} distillations run now, {result.reused} "
          f"reused; {result.distinct_steps} distinct steps against "
          f"{result.naive_trainings} without sharing prefixes.")
    png = pathlib.Path(fv.workdir) / "paths.png"
    plots.plot_paths(result.table, path=png)
    print(f"Wrote {png}")


@_command(_data_flags, _ladder_flags, _tune_flags)
def tune(fv):
    """Sweeps assistant size, temperature and distillation weight with
    keras-tuner and prints the trials and the best settings. Rerunning the
    command resumes the sweep; keras-tuner's KERASTUNER_* variables make it a
    chief or a worker of a distributed sweep."""
    from kd_keras import tuning

    if "KERASTUNER_ORACLE_IP" in os.environ and not fv.teacher:
        raise ValueError(
            "A distributed sweep needs one teacher for all its processes: "
            "train it first (`kd-keras train --output teacher.keras ...`) and "
            "pass --teacher=teacher.keras to the chief and every worker.")
    train_data, val, _ = _load_splits(fv)
    teacher = _ladder_teacher(fv, fv.teacher_size, train_data, val)
    sizes = [size for size in fv.assistant_sizes if size]
    hypermodel = tuning.DistillationHyperModel(
        teacher, lambda: _ladder_model(fv, fv.student_size, "student"),
        (lambda size: _ladder_model(fv, size, f"assistant_{size}"))
        if sizes else None,
        assistant_sizes=sizes,
        temperatures=[float(t) for t in fv.temperatures],
        distillation_weights=[float(w) for w in fv.distillation_weights],
        learning_rate=fv.learning_rate, mixed_precision=fv.mixed_precision,
        jit_compile={"auto": "auto", "true": True,
                     "false": False}[fv.jit_compile])
    tuner, best = tuning.tune(
        hypermodel, train_data, val, tuner=fv.tuner,
        max_trials=fv.max_trials, epochs=fv.epochs, directory=fv.workdir,
        project_name=fv.project_name, overwrite=fv.overwrite, seed=fv.seed,
        verbose=fv.verbose)
    if best is None:
        if tuning._is_worker():
            print("This worker's trials are done; the chief writes the "
                  "results.")
        else:
            print(f"No trial has finished yet in {tuner.project_dir}; rerun "
                  "the command to resume the sweep.")
        return
    print(_table(tuning.trials_table(tuner),
                 ["trial", "status", "assistant_size", "temperature",
                  "distillation_weight", "score"]))
    print(f"\nBest: {best.values}")
    print(f"Teacher passes over the data: {hypermodel.teacher_passes}")
    print(f"Wrote best_hyperparameters.json, trials.json and sweep.png to "
          f"{tuner.project_dir}/")


@_command(_data_flags, _export_flags)
def export(fv):
    """Exports a .keras model to SavedModel and TFLite (float, dynamic-range,
    int8), reloads each, and prints size, logit difference, argmax agreement,
    latency and test accuracy per format."""
    import keras
    from kd_keras import data as data_lib
    from kd_keras import export as export_lib

    load = dict(name=fv.dataset, data_dir=fv.data_dir,
                batch_size=fv.batch_size)
    representative = data_lib.load(split=fv.representative_split, **load)
    test = data_lib.load(split=fv.test_split, **load)
    model_path = pathlib.Path(fv.model)
    output = fv.output or model_path.with_name(model_path.stem + "_export")
    report = export_lib.export_student(
        keras.saving.load_model(model_path), output, formats=fv.formats,
        representative_data=representative, test_data=test,
        tolerance=fv.tolerance)
    rows = [{"format": name, **{k: v for k, v in entry.items()
                                if k != "path"}}
            for name, entry in report.items()]
    print(_table(rows, ["format", "bytes", "max_abs_diff",
                        "argmax_agreement_percent", "latency_ms",
                        "accuracy"]))
    print(f"\nWrote the exports and report.json to {output}/")


EXPERIMENTS = ("hinton-mnist",)


@_command(_reproduce_flags)
def reproduce(fv, experiment=None):
    """Reruns a paper's experiment: `kd-keras reproduce hinton-mnist` trains
    Hinton et al.'s MNIST teacher and students (distillation at several
    temperatures, the omitted-3 and 7s-and-8s transfer sets with their bias
    fixes, 3% of the labels) and prints the results beside the paper's."""
    from kd_keras import reproduce as reproduce_lib

    if experiment not in EXPERIMENTS:
        raise ValueError(
            f"Name an experiment: `kd-keras reproduce {EXPERIMENTS[0]}`. "
            f"Received: {experiment!r}")
    result = reproduce_lib.hinton_mnist(
        data_dir=fv.data_dir, output_dir=fv.output_dir, quick=fv.quick,
        seeds=fv.seeds, verbose=fv.verbose)
    print(result["table"])
    print(f"Wrote the table, JSON and plots to {fv.output_dir}/")


@_command(_data_flags, _evaluate_flags)
def evaluate(fv):
    """Prints a .keras model's test errors on a dataset split."""
    import keras

    _, _, test = _load_splits(fv)
    model = keras.saving.load_model(fv.model)
    _report(model, test, fv.model)


@_command(_import_flags)
def data(fv):
    """Imports local MNIST IDX files into a tensorflow-datasets folder, so
    that `--dataset mnist --data_dir DIR` works with no network."""
    from kd_keras import data as data_lib

    counts = data_lib.import_mnist(fv.idx_dir, fv.data_dir)
    print(_table([{"split": k, "examples": v} for k, v in counts.items()],
                 ["split", "examples"]))
    print(f"\nMNIST is ready in {fv.data_dir}: pass --data_dir {fv.data_dir}")


# Entry point.


def _usage():
    lines = ["usage: kd-keras COMMAND [--flag=value ...]", "",
             "Knowledge distillation for Keras. Commands:", ""]
    for name, (function, _) in COMMANDS.items():
        summary = " ".join(function.__doc__.split()).split(". ")[0]
        lines.append(f"  {name:10s} {summary}.")
    lines += ["", "`kd-keras COMMAND --help` lists a command's flags."]
    return "\n".join(lines)


def _command_help(name):
    function, flag_values = COMMANDS[name]
    doc = textwrap.fill(" ".join(function.__doc__.split()), 79)
    return f"usage: kd-keras {name} [--flag=value ...]\n\n{doc}\n\nflags:\n" + (
        flag_values.get_help(include_special_flags=False))


def run(argv=None):
    """Runs `kd-keras`; returns the process exit status."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv[1]
    if name not in COMMANDS:
        print(f"kd-keras: unknown command {name!r}.\n\n{_usage()}",
              file=sys.stderr)
        return 2
    if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv[2:]):
        print(_command_help(name))
        return 0
    function, flag_values = COMMANDS[name]
    flag_values.unparse_flags()  # Each run starts from the defaults.
    try:
        rest = flag_values([f"kd-keras {name}"] + argv[2:])
    except flags.Error as error:
        print(f"kd-keras {name}: {error}\nSee `kd-keras {name} --help`.",
              file=sys.stderr)
        return 2
    positional = rest[1:]
    if len(positional) > len(inspect.signature(function).parameters) - 1:
        print(f"kd-keras {name}: unexpected arguments {positional}. "
              f"See `kd-keras {name} --help`.", file=sys.stderr)
        return 2
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.WARNING)
    if "seed" in flag_values:
        import keras

        keras.utils.set_random_seed(flag_values.seed)
    try:
        function(flag_values, *positional)
    except ValueError as error:
        print(f"kd-keras {name}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
