"""What each `kd-keras` command does: a few public library calls, and the
printing of what they return. `kd_keras.apps.cli` parses the flags."""

import os
import pathlib

from kd_keras.apps.tables import text_table


def _splits(args, max_shift=0):
    """Returns (train, validation, test) batches; test is None for commands
    without --test_split, and validation defaults to test."""
    from kd_keras import data as data_lib

    load = dict(
        name=args.dataset,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    train_data = data_lib.load(
        split=args.train_split, shuffle=True, max_shift=max_shift, **load
    )
    test = None
    if getattr(args, "test_split", None) is not None:
        test = data_lib.load(split=args.test_split, **load)
    if args.val_split is None:
        if test is None:
            raise ValueError("Pass --val_split to validate on.")
        return train_data, test, test
    return train_data, data_lib.load(split=args.val_split, **load), test


def _model(args, name, size=None):
    """A new model: of the given ladder size (plain_cnn depth, or mlp width
    of two hidden layers), or shaped by --hidden / --depth."""
    from kd_keras import models

    if args.family == "mlp":
        if size is not None:
            return models.mlp((int(size), int(size)), name=name)
        return models.mlp(
            args.hidden,
            dropout=args.dropout,
            input_dropout=args.input_dropout,
            max_norm=args.max_norm,
            name=name,
        )
    depth = int(size) if size is not None else args.depth
    return models.plain_cnn(depth, width=args.width, name=name)


def _output_path(args):
    path = pathlib.Path(args.output)
    if path.suffix != ".keras":
        raise ValueError(
            f"Expected --output to end in .keras. Received: --output={path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _callbacks(args, name=""):
    import keras

    if not args.logdir:
        return []
    return [keras.callbacks.TensorBoard(os.path.join(args.logdir, name))]


def _settings(args, epochs=None):
    from kd_keras import store

    settings = store.Settings(
        epochs=epochs or args.epochs,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        temperature=getattr(args, "temperature", 4.0),
        distillation_weight=getattr(args, "distillation_weight", 0.9),
        seed=args.seed,
    )
    settings.check()  # Before any training.
    return settings


def _steps(args, name):
    """What `distill_chain` and `search_paths` take besides models and data:
    the work folder `--workdir/name`, logging, and the settings."""
    import dataclasses

    return {
        "workdir": pathlib.Path(args.workdir) / name,
        "logdir": args.logdir,
        "verbose": args.verbose,
        **dataclasses.asdict(_settings(args)),
    }


def _ladder_teacher(args, size, train_data, val):
    """Loads --teacher, or trains (or reuses) one in the work folder."""
    import keras

    from kd_keras import store

    if args.teacher:
        return keras.saving.load_model(args.teacher)
    teacher = _model(args, f"teacher_{size}", size)
    _, entry = store.ModelStore(pathlib.Path(args.workdir) / "teachers").train(
        teacher,
        train_data,
        val,
        _settings(args, args.teacher_epochs),
        verbose=args.verbose,
    )
    if entry["reused"]:
        print(f"Reusing the teacher {entry['path']}")
    return teacher


def _report(model, test, path):
    from kd_keras.apps.demo import test_row

    row = test_row(str(path), model, test)
    print(text_table([row], list(row)))


# Commands.


def demo(args):
    """Teacher, scratch and distilled students on the shipped MNIST sample.

    Trains Hinton's teacher, a student from scratch and a distilled student
    on the sample inside the package, and prints their test errors. Takes a
    few minutes on two cores."""
    from kd_keras.apps.demo import run_demo

    rows = run_demo(
        workdir=args.workdir,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        temperature=args.temperature,
        distillation_weight=args.distillation_weight,
        seed=args.seed,
        verbose=args.verbose,
    )
    print()
    print(
        text_table(
            rows,
            [
                "model",
                "params",
                "test_errors",
                "test_examples",
                "error_percent",
                "epochs",
                "seconds",
            ],
        )
    )
    print(f"\nModels and students_val_accuracy.png are in {args.workdir}/")


def train(args):
    """Trains a model on the labels and writes it as a .keras file.

    A teacher, or a student from scratch. Rerunning an interrupted command
    resumes from its last finished epoch."""
    from kd_keras import training
    from kd_keras.callbacks import TeacherSnapshots

    path = _output_path(args)
    train_data, val, test = _splits(args, max_shift=args.jitter)
    model = _model(args, path.stem)
    callbacks = _callbacks(args)
    snapshots = path.with_suffix(".snapshots")
    if args.snapshot_epochs or args.snapshot_every:
        callbacks.append(
            TeacherSnapshots(
                snapshots, epochs=args.snapshot_epochs, every=args.snapshot_every
            )
        )
    training.train(
        model,
        train_data,
        val,
        epochs=args.epochs,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        callbacks=callbacks,
        backup_dir=path.with_suffix(".backup"),
        verbose=args.verbose,
    )
    model.save(path)
    _report(model, test, path)
    if args.snapshot_epochs or args.snapshot_every:
        saved = ", ".join(TeacherSnapshots.read_manifest(snapshots))
        print(f"\nSnapshots of epochs {saved} are in {snapshots}/")


def distill(args):
    """Distils a trained teacher into a new student, written as .keras.

    The student's file holds no teacher. Rerunning an interrupted command
    resumes from its last finished epoch."""
    import keras

    from kd_keras import training
    from kd_keras.callbacks import StudentEarlyStop
    from kd_keras.callbacks import TeacherSnapshots

    if not args.teacher:
        raise ValueError("Pass the trained teacher: --teacher=teacher.keras")
    path = _output_path(args)
    train_data, val, test = _splits(args, max_shift=args.jitter)
    if args.teacher_snapshot is None:
        teacher = keras.saving.load_model(args.teacher)
    else:
        teacher = TeacherSnapshots.load(
            pathlib.Path(args.teacher).with_suffix(".snapshots"), args.teacher_snapshot
        )
    student = _model(args, path.stem)
    early_stop = None
    if args.student_early_stop_epoch is not None or args.student_early_stop_monitor:
        early_stop = StudentEarlyStop(
            epoch=args.student_early_stop_epoch,
            monitor=args.student_early_stop_monitor,
            patience=args.student_early_stop_patience,
        )
    training.distill(
        teacher,
        student,
        train_data,
        val,
        cache={"auto": "auto", "yes": True, "no": False}[args.cache_teacher],
        callbacks=_callbacks(args) + [early_stop] * bool(early_stop),
        **_settings(args).distillation_arguments(),
        backup_dir=path.with_suffix(".backup"),
        verbose=args.verbose,
    )
    student.save(path)
    _report(student, test, path)
    if early_stop is not None and early_stop.switch_epoch is not None:
        print(
            f"\nThe student trained on the labels only from epoch "
            f"{early_stop.switch_epoch + 1}."
        )


def chain(args):
    """Distils a teacher into a student through assistants, step by step.

    Prints each step's validation accuracy and writes chain.png. Rerunning
    the command skips the finished steps."""
    from kd_keras import assistants
    from kd_keras import training
    from kd_keras.apps import plots

    if len(args.sizes) < 2:
        raise ValueError("Expected at least two --sizes: teacher and student.")
    steps = _steps(args, "chain")  # Checked before the teacher trains.
    train_data, val, test = _splits(args)
    teacher = _ladder_teacher(args, args.sizes[0], train_data, val)
    ladder = [teacher] + [
        _model(args, f"{args.family}_{size}", size) for size in args.sizes[1:]
    ]
    student, report = assistants.distill_chain(ladder, train_data, val, **steps)
    print(
        text_table(
            report,
            [
                "step",
                "teacher",
                "student",
                "val_accuracy",
                "epochs",
                "seconds",
                "reused",
            ],
        )
    )
    errors, examples = training.test_errors(student, test)
    print(f"\nStudent test errors: {errors}/{examples}")
    png = pathlib.Path(args.workdir) / "chain.png"
    plots.plot_chain(report, path=png)
    print(f"Wrote {png}")


def paths(args):
    """Trains every distillation path through the candidate assistants.

    Shared prefixes train once; prints the student's accuracy of each path
    and writes paths.png. Rerunning the command skips finished steps."""
    from kd_keras import assistants
    from kd_keras.apps import plots

    if len(set(args.candidates)) != len(args.candidates):
        raise ValueError(
            f"--candidates: each size once. Received: {list(args.candidates)}"
        )
    steps = _steps(args, "paths")  # Checked before the teacher trains.
    train_data, val, test = _splits(args)
    teacher = _ladder_teacher(args, args.teacher_size, train_data, val)
    candidates = {
        size: (lambda size=size: _model(args, f"{args.family}_{size}", size))
        for size in args.candidates
    }
    result = assistants.search_paths(
        teacher,
        candidates,
        lambda: _model(args, "student", args.student_size),
        train_data,
        val,
        test_data=test,
        **steps,
    )
    print(
        text_table(
            result.table,
            ["path", "steps", "student_val_accuracy", "student_test_accuracy"],
        )
    )
    print(
        f"\n{result.trainings} distillations run now, {result.reused} "
        f"reused; {result.distinct_steps} distinct steps against "
        f"{result.naive_trainings} without sharing prefixes."
    )
    png = pathlib.Path(args.workdir) / "paths.png"
    plots.plot_paths(result.table, path=png)
    print(f"Wrote {png}")


def tune(args):
    """Sweeps assistant size, temperature and weight with keras-tuner.

    Prints the trials and the best settings and writes sweep.png. Rerunning
    the command resumes the sweep; keras-tuner's KERASTUNER_* variables make
    it a chief or a worker of a distributed sweep."""
    from kd_keras import tuning

    if (tuning.is_chief() or tuning.is_worker()) and not args.teacher:
        raise ValueError(
            "A distributed sweep needs one teacher for all its processes: "
            "train it first (`kd-keras train --output teacher.keras ...`) and "
            "pass --teacher=teacher.keras to the chief and every worker."
        )
    train_data, val, _ = _splits(args)
    teacher = _ladder_teacher(args, args.teacher_size, train_data, val)
    hypermodel = _hypermodel(args, teacher)
    tuner, best = tuning.tune(
        hypermodel,
        train_data,
        val,
        tuner=args.tuner,
        max_trials=args.max_trials,
        epochs=args.epochs,
        directory=args.workdir,
        project_name=args.project_name,
        overwrite=args.overwrite,
        seed=args.seed,
        callbacks=_callbacks(args),
        verbose=args.verbose,
    )
    if best is None:
        if tuning.is_worker():
            print("This worker's trials are done; the chief writes the results.")
        else:
            print(
                f"No trial has finished yet in {tuner.project_dir}; rerun "
                "the command to resume the sweep."
            )
        return
    _print_sweep(tuner, best, hypermodel.teacher_passes)


def _hypermodel(args, teacher):
    from kd_keras import tuning

    sizes = [size for size in args.assistant_sizes if size]
    return tuning.DistillationHyperModel(
        teacher,
        lambda: _model(args, "student", args.student_size),
        (lambda size: _model(args, f"assistant_{size}", size)) if sizes else None,
        assistant_sizes=sizes,
        temperatures=args.temperatures,
        distillation_weights=args.distillation_weights,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        mixed_precision=args.mixed_precision,
        jit_compile={"auto": "auto", "true": True, "false": False}[args.jit_compile],
    )


SWEEP_COLUMNS = (
    "trial",
    "status",
    "assistant_size",
    "temperature",
    "distillation_weight",
    "score",
)


def _print_sweep(tuner, best, teacher_passes):
    """Prints the trials and the best settings; draws sweep.png."""
    from kd_keras import tuning
    from kd_keras.apps import plots

    trials = tuning.trials_table(tuner)
    png = pathlib.Path(tuner.project_dir) / "sweep.png"
    plots.plot_sweep([row for row in trials if row["score"] is not None], path=png)
    print(text_table(trials, SWEEP_COLUMNS))
    print(f"\nBest: {best.values}")
    print(f"Teacher passes over the data: {teacher_passes}")
    print(
        f"Wrote best_hyperparameters.json, trials.json and {png.name} to "
        f"{tuner.project_dir}/"
    )


def export(args):
    """Exports a .keras model to SavedModel and TFLite, checking each.

    Float, dynamic-range and (with --dataset) int8 TFLite. Reloads each and
    prints size, logit difference, argmax agreement, latency and (with
    --dataset and --test_split) accuracy per format. Without data, the
    formats are compared on random inputs."""
    import keras

    from kd_keras import data as data_lib
    from kd_keras import export as export_lib

    if "tflite_int8" in args.formats and args.dataset is None:
        raise ValueError(
            "tflite_int8 calibrates on training inputs: pass --dataset (and "
            "--representative_split), or leave it out of --formats."
        )
    load = dict(name=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size)
    representative = test = None
    if args.dataset is not None and "tflite_int8" in args.formats:
        representative = data_lib.load(split=args.representative_split, **load)
    if args.dataset is not None:
        test = data_lib.load(split=args.test_split, **load)
    model_path = pathlib.Path(args.model)
    output = args.output_dir or model_path.with_name(model_path.stem + "_export")
    report = export_lib.export_student(
        keras.saving.load_model(model_path),
        output,
        formats=args.formats,
        representative_data=representative,
        test_data=test,
        tolerance=args.tolerance,
    )
    rows = [
        {
            "format": name,
            **{k: v for k, v in entry.items() if k not in ("path", "compared_on")},
        }
        for name, entry in report.items()
    ]
    print(
        text_table(
            rows,
            [
                "format",
                "bytes",
                "max_abs_diff",
                "argmax_agreement_percent",
                "latency_ms",
                "accuracy",
            ],
        )
    )
    print(
        f"\nCompared on {report['keras']['compared_on']}. Wrote the "
        f"exports and report.json to {output}/"
    )


def evaluate(args):
    """Prints a .keras model's test errors on a dataset split."""
    import keras

    from kd_keras import data as data_lib

    test = data_lib.load(
        name=args.dataset,
        split=args.test_split,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
    )
    _report(keras.saving.load_model(args.model), test, args.model)


def reproduce(args):
    """Reruns a paper's experiment and prints it beside the paper.

    `kd-keras reproduce hinton-mnist` trains Hinton et al.'s MNIST teacher
    and students (distillation at several temperatures, the omitted-3 and
    7s-and-8s transfer sets with their bias fixes, 3% of the labels)."""
    from kd_keras.apps import reproduce as reproduce_lib

    result = reproduce_lib.hinton_mnist(
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        quick=args.quick,
        seeds=args.seeds,
        verbose=args.verbose,
    )
    print(result["table"])
    print(f"Wrote the table, JSON and plots to {args.output_dir}/")


def data(args):
    """Imports local MNIST or Fashion-MNIST IDX files into a tfds folder.

    Afterwards `--dataset NAME --data_dir DIR` works with no network."""
    from kd_keras import data as data_lib

    counts = data_lib.import_idx(args.idx_dir, args.data_dir, name=args.name)
    print(
        text_table(
            [{"split": k, "examples": v} for k, v in counts.items()],
            ["split", "examples"],
        )
    )
    print(
        f"\n{data_lib.IDX_DATASETS[args.name]} is ready in {args.data_dir}: "
        f"pass --dataset {args.name} --data_dir {args.data_dir}"
    )
