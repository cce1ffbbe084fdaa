"""Teacher size against teaching ability, on Fashion-MNIST.

Mirzadeh et al. (2020) found that a larger teacher is not always a better
teacher: past some size, the student distilled from it gets worse. Plain CNNs
of depth 4, 6, 8 and 10 (width 0.25; BatchNorm, and a one-epoch warm-up of
the learning rate so that depth 10 trains stably) teach the depth-2 plain
CNN. Every teacher's T and λ are tuned alike by the harness of `fair.py`.
The depth-10 teacher is also trained with two more seeds, to show that it
trains stably.

    python benchmarks/teacher_size.py --quick      # under 10 minutes on 2 cores
    python benchmarks/teacher_size.py              # full, under 60 minutes
"""

from absl import app
from absl import flags
import fair  # Before Keras: it sets the backend from --backend.
import ladder

from kd_keras import training

FLAGS = flags.FLAGS
fair.define_flags(ladder.SETTINGS)


def main(argv):
    del argv
    study = ladder.study("teacher_size", FLAGS)
    settings = study.settings
    with training.Stopwatch() as timer:
        teachers = {depth: ladder.teacher(study, depth) for depth in ladder.TEACHERS}
        rows = study.compare(
            [
                ladder.scratch(study),
                *(ladder.kd_from(study, d, t) for d, t in teachers.items()),
            ]
        )
        deepest = max(ladder.TEACHERS)
        stability = [
            study.data.accuracy(ladder.teacher(study, deepest, seed), "test")
            for seed in range(fair.SEEDS)
        ]
    for row, depth in zip(rows[1:], teachers, strict=True):
        row["teacher_params"] = teachers[depth].count_params()
        row["teacher_test_accuracy"] = (
            f"{100 * study.data.accuracy(teachers[depth], 'test'):.2f}"
        )
    mode = study.mode
    heading = (
        f"Teacher size on Fashion-MNIST ({mode}: plain CNNs width "
        f"{ladder.WIDTH}, teachers {settings['teacher_epochs']} epochs with a "
        f"warm-up, student depth 2 {settings['student_epochs']} epochs, on "
        f"{settings['train_examples']:,} images; {study.budget_text()}; "
        f"{timer.seconds / 60:.1f} min)"
    )
    extra = (
        f"Stability: the depth-{deepest} teacher's test accuracy over "
        f"{fair.SEEDS} seeds: "
        + " / ".join(f"{100 * a:.2f}" for a in stability)
        + f"% ({fair.common.percent_mean_std(stability)})."
    )
    out = study.report(
        FLAGS,
        heading,
        rows,
        extra,
        dict(stability=stability, minutes=timer.seconds / 60),
    )
    fair.plot_rows(
        rows,
        out / f"teacher_size_{mode}.png",
        "Depth-2 student on Fashion-MNIST, by teacher",
        short={r["method"]: r["method"].replace("KD from depth ", "T") for r in rows},
    )


if __name__ == "__main__":
    app.run(main)
