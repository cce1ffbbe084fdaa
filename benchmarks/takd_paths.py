"""Teacher assistants (TAKD) on Fashion-MNIST: tuned, and every path.

Mirzadeh et al. (2020) distil a large teacher into a small student through
an assistant of middle size (TAKD), and report that the best single
assistant is the one whose accuracy is nearest the mean of the teacher's and
the student's. Plain CNNs (width 0.25) of the ladder in `ladder.py`: teacher
depth 10, student depth 2, assistants 8, 6 and 4. Methods, tuned alike by
the harness of `fair.py`:

- scratch; KD from the teacher (T, λ);
- TAKD (the assistant, T, λ), each step with the same T and λ.

Then every path (T→S, T→8→S, ..., T→8→6→4→S) is trained once (seed 0) with
TAKD's chosen T and λ, and the mean-accuracy rule's assistant, chosen on
validation accuracies, is checked against the best path.

    python benchmarks/takd_paths.py --quick      # under 10 minutes on 2 cores
    python benchmarks/takd_paths.py              # full, under 60 minutes
"""

from absl import app
from absl import flags
import common
import fair  # Before Keras: it sets the backend from --backend.
import keras
import ladder

from kd_keras import assistants
from kd_keras import training

FLAGS = flags.FLAGS
fair.define_flags(ladder.SETTINGS)
TEACHER = 10
ASSISTANTS = (8, 6, 4)


def takd(study, teacher):
    epochs = study.settings["student_epochs"]

    def space(hp):
        fair.temperature_and_weight(hp)
        return hp.Choice("assistant", list(ASSISTANTS))

    def train(hp, split, seed):
        depth = space(hp)
        assistant = fair.distill(
            teacher,
            lambda: ladder.cnn(depth, f"assistant_{depth}"),
            study,
            split,
            seed,
            hp,
            key=f"teacher_{TEACHER}",
            epochs=epochs,
        )
        # The new assistant's logits serve this student only: not kept.
        return fair.distill(
            assistant, ladder.student, study, split, seed, hp, epochs=epochs
        )

    return fair.Method("TAKD", train, space)


def every_path(study, teacher, chosen):
    """Every path, seed 0, on the training split with TAKD's T and λ."""
    settings = study.settings
    keras.utils.set_random_seed(0)
    result = assistants.search_paths(
        teacher,
        {str(d): (lambda d=d: ladder.cnn(d, f"assistant_{d}")) for d in ASSISTANTS},
        ladder.student,
        study.data.batches("train", shuffle=True),
        study.data.batches("val"),
        test_data=study.data.batches("test"),
        temperature=chosen["temperature"],
        distillation_weight=chosen["distillation_weight"],
        epochs=settings["student_epochs"],
        workdir=study.workdir / "paths",
        seed=0,
    )
    keras.utils.set_random_seed(0)
    scratch = ladder.scratch(study).train(None, "train", 0)
    suggestion = assistants.suggest_assistant(
        {str(d): result.assistant_accuracies[(str(d),)] for d in ASSISTANTS},
        teacher_accuracy=study.data.accuracy(teacher, "val"),
        student_accuracy=study.data.accuracy(scratch, "val"),
    )
    return result, suggestion


def main(argv):
    del argv
    study = ladder.study("takd_paths", FLAGS)
    settings = study.settings
    with training.Stopwatch() as timer:
        teacher = ladder.teacher(study, TEACHER)
        rows = study.compare(
            [
                ladder.scratch(study),
                ladder.kd_from(study, TEACHER, teacher),
                takd(study, teacher),
            ]
        )
        result, suggestion = every_path(study, teacher, study.chosen["TAKD"])
    by_path = {row["path"]: row for row in result.table}
    rule_path = f"teacher → {suggestion['assistant']} → student"
    best_single = max(
        (row for row in result.table if row["steps"] == 2),
        key=lambda row: row["student_val_accuracy"],
    )
    paths_table = [
        {
            "path": row["path"],
            "steps": row["steps"],
            "val_accuracy_percent": f"{100 * row['student_val_accuracy']:.2f}",
            "test_accuracy_percent": f"{100 * row['student_test_accuracy']:.2f}",
        }
        for row in result.table
    ]
    teacher_accuracy = study.data.accuracy(teacher, "test")
    extra = (
        f"Every path, seed 0, TAKD's T and λ (sorted by validation accuracy; "
        f"{result.trainings + result.reused} distillations instead of "
        f"{result.naive_trainings} without shared prefixes):\n\n"
        + common.markdown_table(
            paths_table,
            ["path", "steps", "val_accuracy_percent", "test_accuracy_percent"],
        )
        + f"\n\nMean-accuracy rule (on validation): assistant "
        f"{suggestion['assistant']} → {rule_path}: "
        f"{100 * by_path[rule_path]['student_test_accuracy']:.2f}% test; best "
        f"single-assistant path on validation: {best_single['path']}: "
        f"{100 * best_single['student_test_accuracy']:.2f}% test; best path on "
        f"validation: {result.table[0]['path']}: "
        f"{100 * result.table[0]['student_test_accuracy']:.2f}% test."
    )
    heading = (
        f"TAKD on Fashion-MNIST ({study.mode}: plain CNNs width {ladder.WIDTH}, "
        f"teacher depth {TEACHER} {100 * teacher_accuracy:.2f}% test, "
        f"student depth 2, {settings['student_epochs']} epochs per step on "
        f"{settings['train_examples']:,} images; {study.budget_text()}; "
        f"{timer.seconds / 60:.1f} min)"
    )
    out = study.report(
        FLAGS,
        heading,
        rows,
        extra,
        dict(
            teacher_test_accuracy=teacher_accuracy,
            paths=result.table,
            suggestion=suggestion,
            minutes=timer.seconds / 60,
        ),
    )
    fair.plot_rows(
        rows, out / f"takd_paths_{study.mode}.png", "Depth-2 student, Fashion-MNIST"
    )


if __name__ == "__main__":
    app.run(main)
