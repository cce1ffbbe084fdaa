"""Is a larger teacher a better teacher? Student accuracy against teacher size.

Mirzadeh et al. (2020) and Cho & Hariharan (2019) found that as the teacher
grows, a fixed small student first gains, then loses: the gap becomes too
large for the student to follow. This script keeps a plain CNN student of
depth 2 fixed and distils it, on MNIST, from plain CNN teachers of depth 4, 6,
8 and 10 (widths scaled by `--width`), each trained on the labels first. It
prints test accuracy (mean ± std over seeds) against teacher size, with the
student from scratch for reference, and writes JSON and a PNG.

    python benchmarks/teacher_size.py --quick      # under 10 minutes
    python benchmarks/teacher_size.py              # full, under 60 minutes
"""

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras
import numpy as np

from kd_keras import models
from kd_keras import training
from kd_keras.apps import plots

FLAGS = flags.FLAGS
common.define_run_flags()
flags.DEFINE_float("width", 0.25, "Width multiplier of every plain CNN.")
flags.DEFINE_float("temperature", 10.0, "Distillation temperature.")
flags.DEFINE_float("distillation_weight", 0.9, "Weight of the KD term.")

TEACHER_DEPTHS, STUDENT_DEPTH = (4, 6, 8, 10), 2


def _settings():
    return common.settings(
        FLAGS,
        quick=dict(train_split="train[:3000]", teacher_epochs=4, epochs=4, seeds=2),
        full=dict(train_split="train[:15000]", teacher_epochs=10, epochs=8, seeds=3),
    )


def _run_seed(seed, splits, settings):
    train, val, test = splits
    rows = {}
    keras.utils.set_random_seed(seed)
    scratch = models.plain_cnn(STUDENT_DEPTH, width=FLAGS.width)
    training.train(scratch, train, val, epochs=settings["epochs"], verbose=0)
    rows["scratch"] = {"student": training.test_accuracy(scratch, test)}
    for depth in TEACHER_DEPTHS:
        keras.utils.set_random_seed(seed)
        teacher = models.plain_cnn(depth, width=FLAGS.width)
        training.train(
            teacher, train, val, epochs=settings["teacher_epochs"], verbose=0
        )
        keras.utils.set_random_seed(seed)
        student = models.plain_cnn(STUDENT_DEPTH, width=FLAGS.width)
        common.distill(FLAGS, teacher, student, splits, settings["epochs"])
        rows[depth] = {
            "params": teacher.count_params(),
            "teacher": training.test_accuracy(teacher, test),
            "student": training.test_accuracy(student, test),
        }
    return rows


def main(argv):
    del argv
    settings = _settings()
    splits = common.mnist_splits(FLAGS, settings["train_split"])
    with training.Stopwatch() as timer:
        runs = [_run_seed(seed, splits, settings) for seed in range(settings["seeds"])]

    def cell(key, field):
        values = [run[key][field] for run in runs]
        mean, std = common.mean_std(100.0 * np.asarray(values))
        return mean, std, common.percent_mean_std(values)

    table = [
        {
            "teacher": "none (student from scratch)",
            "teacher_params": "",
            "teacher_test_accuracy": "",
            "student_test_accuracy": cell("scratch", "student")[2],
        }
    ]
    means, stds = [], []
    for depth in TEACHER_DEPTHS:
        mean, std, text = cell(depth, "student")
        means.append(mean)
        stds.append(std)
        table.append(
            {
                "teacher": f"plain CNN depth {depth}",
                "teacher_params": runs[0][depth]["params"],
                "teacher_test_accuracy": cell(depth, "teacher")[2],
                "student_test_accuracy": text,
            }
        )
    mode = "quick" if FLAGS.quick else "full"
    heading = (
        f"Teacher size on MNIST ({mode}: student plain CNN depth "
        f"{STUDENT_DEPTH}, width {FLAGS.width:g}, {settings['train_split']}, "
        f"teachers {settings['teacher_epochs']} epochs, students "
        f"{settings['epochs']} epochs, T={FLAGS.temperature:g}, "
        f"λ={FLAGS.distillation_weight:g}, {settings['seeds']} seeds; "
        f"{timer.seconds / 60:.1f} min)"
    )
    markdown = common.markdown_table(
        table,
        ["teacher", "teacher_params", "teacher_test_accuracy", "student_test_accuracy"],
    )
    out = common.write_report(
        FLAGS,
        f"teacher_size_{mode}",
        heading,
        markdown,
        {
            "settings": {**settings, **common.distillation_flags(FLAGS)},
            "table": table,
            "runs": [{str(k): v for k, v in run.items()} for run in runs],
            "minutes": timer.seconds / 60,
        },
    )
    params = [runs[0][d]["params"] for d in TEACHER_DEPTHS]
    plots.plot_curve(
        np.log10(params),
        means,
        "teacher parameters (log10)",
        "student test accuracy %",
        errors=stds,
        xticks=[f"d{d}\n{p:,}" for d, p in zip(TEACHER_DEPTHS, params, strict=True)],
        path=out / f"teacher_size_{mode}.png",
        title=f"Student (plain CNN depth {STUDENT_DEPTH}) by teacher size; "
        f"scratch {cell('scratch', 'student')[2]}",
    )
    print(f"\nWrote {out}/teacher_size_{mode}.{{md,json,png}}")


if __name__ == "__main__":
    app.run(main)
