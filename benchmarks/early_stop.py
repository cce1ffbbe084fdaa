"""Early stop of the student's KD term and early-stopped teachers, on MNIST.

Cho & Hariharan (2019) found that a small student can learn better (1) when
the distillation term is switched off part-way through its training and (2)
when it learns from an early checkpoint of the teacher. This script tests both
on MNIST with a capacity-limited student (784-30-30-10, where Hinton et al.
found T between 2.5 and 4 best) and a large teacher (784-1200-1200-10 with
dropout and max-norm). Rows, each over several seeds (mean ± std of test
error):

- scratch: the student on the labels alone;
- full KD: distilled from the final teacher for all epochs;
- KD + student early stop: the KD term switched off half-way;
- KD from early-stopped teacher: distilled from the teacher's snapshot after
  `--early_teacher_epoch` epochs;
- both.

Writes a markdown table and JSON to benchmarks/results/ and a PNG of the
validation curves (seed 0) with the switch epoch marked.

    python benchmarks/early_stop.py --quick      # under 10 minutes
    python benchmarks/early_stop.py              # full, under 60 minutes
"""

import pathlib
import tempfile

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras
import numpy as np

import kd_keras
from kd_keras import callbacks
from kd_keras import models
from kd_keras import training
from kd_keras.apps import plots

FLAGS = flags.FLAGS
common.define_run_flags(default_seeds="3")
flags.DEFINE_float("temperature", 3.0, "Distillation temperature.")
flags.DEFINE_float("distillation_weight", 0.9, "Weight of the KD term.")
flags.DEFINE_integer(
    "early_teacher_epoch",
    None,
    "Epoch of the early-stopped teacher's snapshot (default: 2 with --quick, else 5).",
)

ROWS = (
    ("scratch", None, False),
    ("full KD", "final", False),
    ("KD + student early stop", "final", True),
    ("KD from early-stopped teacher", "early", False),
    ("both", "early", True),
)


def _settings():
    if FLAGS.quick:
        settings = dict(
            train_split="train[:10000]",
            teacher_epochs=8,
            student_epochs=16,
            early_teacher_epoch=2,
        )
    else:
        settings = dict(
            train_split="train[:55000]",
            teacher_epochs=20,
            student_epochs=30,
            early_teacher_epoch=5,
        )
    if FLAGS.early_teacher_epoch is not None:
        settings["early_teacher_epoch"] = FLAGS.early_teacher_epoch
    settings["seeds"] = FLAGS.seeds or 3
    return settings


def _run_seed(seed, splits, settings, workdir):
    """Trains one teacher and the five students; returns rows and curves."""
    train, val, test = splits
    keras.utils.set_random_seed(seed)
    teacher = models.hinton_teacher()
    snapshots = workdir / f"teacher_seed{seed}"
    training.train(
        teacher,
        train,
        val,
        epochs=settings["teacher_epochs"],
        callbacks=[
            callbacks.TeacherSnapshots(
                snapshots, epochs=[settings["early_teacher_epoch"]]
            )
        ],
        verbose=0,
    )
    teachers = {
        "final": teacher,
        "early": callbacks.TeacherSnapshots.load(
            snapshots, settings["early_teacher_epoch"]
        ),
    }
    cached = {
        name: kd_keras.cache_teacher_logits(t, train, seed=seed)
        for name, t in teachers.items()
    }
    results = {
        f"teacher ({name})": training.test_errors(t, test)
        for name, t in teachers.items()
    }
    curves, switches = {}, {}
    stop_epoch = settings["student_epochs"] // 2
    for row, teacher_name, early_stop in ROWS:
        keras.utils.set_random_seed(seed)
        student = models.mlp((30, 30), name="student")
        if teacher_name is None:
            history = training.train(
                student, train, val, epochs=settings["student_epochs"], verbose=0
            )
        else:
            stop = [callbacks.StudentEarlyStop(epoch=stop_epoch)]
            _, history = training.distill(
                teachers[teacher_name],
                student,
                cached[teacher_name],
                val,
                temperature=FLAGS.temperature,
                distillation_weight=FLAGS.distillation_weight,
                epochs=settings["student_epochs"],
                cache=False,
                callbacks=stop if early_stop else [],
                verbose=0,
            )
            if early_stop:
                switches[row] = stop[0].switch_epoch + 1
        results[row] = training.test_errors(student, test)
        curves[row] = history.history
    return results, curves, switches


def main(argv):
    del argv
    settings = _settings()
    splits = common.mnist_splits(FLAGS, settings["train_split"])
    per_seed = []
    with training.Stopwatch() as timer, tempfile.TemporaryDirectory() as workdir:
        for seed in range(settings["seeds"]):
            results, curves, switches = _run_seed(
                seed, splits, settings, pathlib.Path(workdir)
            )
            per_seed.append(results)
            if seed == 0:
                first_curves, first_switches = curves, switches
    names = list(per_seed[0])
    table = []
    for name in names:
        errors = [r[name][0] for r in per_seed]
        examples = per_seed[0][name][1]
        table.append(
            {
                "model": name,
                "test_error_percent": common.percent_mean_std(
                    np.asarray(errors) / examples
                ),
                "test_errors": "/".join(map(str, errors)),
            }
        )
    mode = "quick" if FLAGS.quick else "full"
    heading = (
        f"Early stops on MNIST ({mode}: {settings['train_split']}, "
        f"teacher {settings['teacher_epochs']} epochs, student 30x30 "
        f"{settings['student_epochs']} epochs, T={FLAGS.temperature:g}, "
        f"λ={FLAGS.distillation_weight:g}, KD off from epoch "
        f"{settings['student_epochs'] // 2 + 1}, early teacher = epoch "
        f"{settings['early_teacher_epoch']}; {settings['seeds']} seeds, "
        f"{timer.seconds / 60:.1f} min)"
    )
    markdown = common.markdown_table(
        table, ["model", "test_error_percent", "test_errors"]
    )
    out = common.write_report(
        FLAGS,
        f"early_stop_{mode}",
        heading,
        markdown,
        {
            "settings": {
                **settings,
                "temperature": FLAGS.temperature,
                "distillation_weight": FLAGS.distillation_weight,
            },
            "rows": table,
            "per_seed": per_seed,
            "minutes": timer.seconds / 60,
        },
    )
    plots.plot_history(
        {name: first_curves[name] for name, _, _ in ROWS},
        "val_accuracy",
        path=out / f"early_stop_{mode}.png",
        title="Student 30x30 validation accuracy (seed 0); dashed: KD off",
        marks=first_switches,
    )
    print(f"\nWrote {out}/early_stop_{mode}.{{md,json,png}}")


if __name__ == "__main__":
    app.run(main)
