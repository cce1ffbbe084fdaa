"""The demo: Hinton's MNIST experiment in small, on the shipped sample."""

import pathlib

import keras

from kd_keras import data
from kd_keras import models
from kd_keras import training
from kd_keras.apps import plots


def run_demo(
    workdir="kd_keras_demo",
    epochs=20,
    teacher_epochs=30,
    temperature=8.0,
    distillation_weight=0.9,
    batch_size=128,
    seed=0,
    verbose=2,
):
    """Trains a teacher, a scratch student and a distilled student.

    All three train on the 8,000 sample training digits and are tested on the
    2,000 sample test digits. The teacher is Hinton's 784-1200-1200-10 net
    with dropout, max-norm and 2-pixel jitter; both students are 784-800-800-10
    with no regularisation, one trained on the labels, the other distilled
    from the teacher (cached logits). The students and a PNG of their
    validation accuracy are written to `workdir`.

    Args:
        workdir: folder for the `.keras` files and the PNG.
        epochs: epochs of each student.
        teacher_epochs: epochs of the teacher.
        temperature: distillation temperature.
        distillation_weight: weight of the distillation term.
        batch_size: batch size.
        seed: seed of weights, shuffles and jitter.
        verbose: Keras verbosity.

    Returns:
        A list of rows `{"model", "params", "test_errors", "test_examples",
        "error_percent", "epochs", "seconds"}`.
    """
    keras.utils.set_random_seed(seed)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = data.sample()
    load = dict(batch_size=batch_size, seed=seed)
    train = data.pipeline((x_train, y_train), shuffle=True, **load)
    jittered = data.pipeline((x_train, y_train), shuffle=True, max_shift=2, **load)
    test = data.pipeline((x_test, y_test), **load)

    rows, histories = [], {}

    def record(name, model, epochs_run, seconds):
        errors, examples = training.test_errors(model, test)
        rows.append(
            {
                "model": name,
                "params": model.count_params(),
                "test_errors": errors,
                "test_examples": examples,
                "error_percent": 100.0 * errors / examples,
                "epochs": epochs_run,
                "seconds": seconds,
            }
        )

    teacher = models.hinton_teacher()
    with training.Stopwatch() as watch:
        training.train(teacher, jittered, test, epochs=teacher_epochs, verbose=verbose)
    record("teacher 2x1200 (dropout, jitter)", teacher, teacher_epochs, watch.seconds)

    scratch = models.mlp((800, 800), name="scratch_student")
    with training.Stopwatch() as watch:
        histories["scratch 2x800"] = training.train(
            scratch, train, test, epochs=epochs, verbose=verbose
        )
    record("student 2x800 from scratch", scratch, epochs, watch.seconds)

    student = models.mlp((800, 800), name="distilled_student")
    with training.Stopwatch() as watch:
        _, histories[f"distilled 2x800, T={temperature:g}"] = training.distill(
            teacher,
            student,
            train,
            test,
            temperature=temperature,
            distillation_weight=distillation_weight,
            epochs=epochs,
            verbose=verbose,
        )
    record(
        f"student 2x800 distilled (T={temperature:g})", student, epochs, watch.seconds
    )

    teacher.save(workdir / "teacher.keras")
    scratch.save(workdir / "scratch_student.keras")
    student.save(workdir / "distilled_student.keras")
    plots.plot_history(
        histories,
        "val_accuracy",
        path=workdir / "students_val_accuracy.png",
        title="Students on the sample's test digits",
    )
    return rows
