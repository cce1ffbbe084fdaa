"""A keras-tuner sweep of assistant size × temperature × distillation weight.

On MNIST, a 784-1200-1200-10 teacher is distilled into a 784-30-30-10
student, directly or through a 2×300 or 2×100 MLP assistant, with
`kd_keras.tuning.tune` (Bayesian optimisation over the teacher-assistant
paper's grid: T in {1, 2, 5, 10, 15, 20}, λ from 0.05 to 1 in steps of 0.05).
It reports how many times the teacher ran over the data (expected: once per
dataset for the whole sweep), trials per hour, and the best settings against
the default ones (no assistant, T = 4, λ = 0.9) and against the student from
scratch, on the test set. Writes markdown, JSON and the sweep's PNG.

    python benchmarks/sweep.py --quick      # under 10 minutes
    python benchmarks/sweep.py              # full
    python benchmarks/sweep.py --quick --backend jax --pipeline array_batches
"""

import pathlib
import shutil
import tempfile

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras

from kd_keras import models
from kd_keras import training
from kd_keras import tuning

FLAGS = flags.FLAGS
common.define_run_flags(default_seeds="1: a sweep is one run")
flags.DEFINE_string("tuner", "bayesian", "keras-tuner tuner.")

STUDENT, ASSISTANTS = (30, 30), (300, 100)


def _settings():
    if FLAGS.quick:
        return dict(
            train_split="train[:5000]", max_trials=12, epochs=3, teacher_epochs=5
        )
    return dict(train_split="train[:30000]", max_trials=24, epochs=6, teacher_epochs=10)


def _mode():
    mode = "quick" if FLAGS.quick else "full"
    if keras.backend.backend() != "tensorflow":
        mode += f"_{keras.backend.backend()}"
    return mode


def main(argv):
    del argv
    if FLAGS.seeds not in (None, 1):
        raise app.UsageError(
            "A sweep is one run (its trials are the repeats): drop --seeds."
        )
    settings = _settings()
    train, val, test = common.mnist_splits(FLAGS, settings["train_split"])
    keras.utils.set_random_seed(0)
    teacher = models.hinton_teacher()
    training.train(teacher, train, val, epochs=settings["teacher_epochs"], verbose=0)
    hypermodel = tuning.DistillationHyperModel(
        teacher,
        lambda: models.mlp(STUDENT, name="student"),
        lambda width: models.mlp((width, width), name=f"assistant_{width}"),
        assistant_sizes=ASSISTANTS,
    )
    workdir = pathlib.Path(tempfile.mkdtemp())
    try:
        with training.Stopwatch() as sweep_time:
            tuner, best = tuning.tune(
                hypermodel,
                train,
                val,
                tuner=FLAGS.tuner,
                max_trials=settings["max_trials"],
                epochs=settings["epochs"],
                directory=workdir,
                project_name="sweep",
            )
        best_student = tuner.get_best_models(1)[0].student
        trials = tuning.trials_table(tuner)
        pathlib.Path(FLAGS.output_dir).mkdir(parents=True, exist_ok=True)
        figure = workdir / "sweep" / "sweep.png"
        if figure.exists():  # Drawn only where matplotlib is installed.
            shutil.copy(figure, pathlib.Path(FLAGS.output_dir) / f"sweep_{_mode()}.png")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    keras.utils.set_random_seed(0)
    default_student = models.mlp(STUDENT, name="student")
    training.distill(
        teacher,
        default_student,
        train,
        val,
        temperature=4.0,
        distillation_weight=0.9,
        epochs=settings["epochs"],
        verbose=0,
    )
    keras.utils.set_random_seed(0)
    scratch = models.mlp(STUDENT, name="student")
    training.train(scratch, train, val, epochs=settings["epochs"], verbose=0)
    hours = sweep_time.seconds / 3600
    comparison = [
        {
            "student 30x30": "teacher 1200x1200 (reference)",
            "settings": "",
            "test_accuracy": training.test_accuracy(teacher, test),
        },
        {
            "student 30x30": "from scratch",
            "settings": "",
            "test_accuracy": training.test_accuracy(scratch, test),
        },
        {
            "student 30x30": "distilled, default settings",
            "settings": "assistant none, T=4, λ=0.9",
            "test_accuracy": training.test_accuracy(default_student, test),
        },
        {
            "student 30x30": "distilled, best of the sweep",
            "settings": (
                f"assistant {best.values['assistant_size']}, "
                f"T={best.values['temperature']:g}, "
                f"λ={best.values['distillation_weight']:.2f}"
            ),
            "test_accuracy": training.test_accuracy(best_student, test),
        },
    ]
    mode = _mode()
    heading = (
        f"Sweep on MNIST ({mode}: {settings['train_split']}, "
        f"{FLAGS.tuner} tuner, {len(trials)} trials of {settings['epochs']} "
        f"epochs, assistants {ASSISTANTS} or none, Keras on "
        f"{keras.backend.backend()}; {sweep_time.seconds / 60:.1f} min, "
        f"{len(trials) / hours:.0f} trials per hour on "
        f"{', '.join(common.environment()['devices']) or 'this machine'}; "
        f"teacher passes over the data: {hypermodel.teacher_passes})"
    )
    markdown = (
        common.markdown_table(
            comparison, ["student 30x30", "settings", "test_accuracy"]
        )
        + "\n\nTrials (score: student validation accuracy):\n\n"
        + common.markdown_table(
            trials,
            ["trial", "assistant_size", "temperature", "distillation_weight", "score"],
        )
    )
    common.write_report(
        FLAGS,
        f"sweep_{mode}",
        heading,
        markdown,
        {
            "settings": settings,
            "teacher_passes": hypermodel.teacher_passes,
            "trials_per_hour": len(trials) / hours,
            "best": best.values,
            "comparison": comparison,
            "trials": trials,
        },
    )


if __name__ == "__main__":
    app.run(main)
