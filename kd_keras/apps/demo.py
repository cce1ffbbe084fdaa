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
    workdir.mkdir(parents=True, exist_ok=True)  # Fails before any training.
    (x_train, y_train), (x_test, y_test) = data.sample()
    load = dict(batch_size=batch_size, seed=seed)
    train = data.pipeline((x_train, y_train), shuffle=True, **load)
    jittered = data.pipeline((x_train, y_train), shuffle=True, max_shift=2, **load)
    test = data.pipeline((x_test, y_test), **load)
    fit = dict(verbose=verbose, epochs=epochs)

    teacher = models.hinton_teacher()
    seconds, _ = _timed(
        training.train, teacher, jittered, test, **dict(fit, epochs=teacher_epochs)
    )
    rows = [
        _row("teacher 2x1200 (dropout, jitter)", teacher, test, teacher_epochs, seconds)
    ]
    histories = {}
    scratch = models.mlp((800, 800), name="scratch_student")
    seconds, histories["scratch 2x800"] = _timed(
        training.train, scratch, train, test, **fit
    )
    rows.append(_row("student 2x800 from scratch", scratch, test, epochs, seconds))
    student = models.mlp((800, 800), name="distilled_student")
    seconds, (_, histories[f"distilled 2x800, T={temperature:g}"]) = _timed(
        training.distill,
        teacher,
        student,
        train,
        test,
        temperature=temperature,
        distillation_weight=distillation_weight,
        **fit,
    )
    name = f"student 2x800 distilled (T={temperature:g})"
    rows.append(_row(name, student, test, epochs, seconds))
    _save(workdir, [teacher, scratch, student], histories)
    return rows


def _timed(function, *args, **kwargs):
    """`(seconds, function(*args, **kwargs))`."""
    with training.Stopwatch() as watch:
        result = function(*args, **kwargs)
    return watch.seconds, result


def test_row(name, model, test):
    """A model's size and test errors, as a row of a table."""
    errors, examples = training.test_errors(model, test)
    return {
        "model": name,
        "params": model.count_params(),
        "test_errors": errors,
        "test_examples": examples,
        "error_percent": 100.0 * errors / examples,
    }


def _row(name, model, test, epochs, seconds):
    """One line of the demo's table: the model's test errors and cost."""
    return dict(test_row(name, model, test), epochs=epochs, seconds=seconds)


def _save(workdir, trained, histories):
    """The models as `name.keras`, and the students' validation curves."""
    for model in trained:
        model.save(workdir / f"{model.name}.keras")
    plots.plot_history(
        histories,
        "val_accuracy",
        path=workdir / "students_val_accuracy.png",
        title="Students on the sample's test digits",
    )
