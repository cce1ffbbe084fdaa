"""Early stops on Fashion-MNIST: the student's KD term and the teacher.

Cho & Hariharan (2019) found that a small student learns better (1) when the
distillation term is switched off part-way through its training (student
early stop) and (2) when it learns from an early checkpoint of the teacher
(ESKD). A 2-conv CNN teacher (32 and 64 channels, Dense 128) teaches an MLP
784-32-10, the regime where plain KD can fall below training from scratch.
Methods, each tuned alike by the harness of `fair.py`:

- scratch: the student on the labels alone;
- KD: the final teacher for every epoch (T, λ);
- student early stop: KD switched off from a tuned epoch (T, λ, epoch);
- early-stopped teacher: a snapshot of the teacher at a tuned epoch before
  its last (T, λ, snapshot);
- both (T, λ, epoch, snapshot).

    python benchmarks/early_stop.py --quick      # under 10 minutes on 2 cores
    python benchmarks/early_stop.py              # full, under 60 minutes
"""

from absl import app
from absl import flags
import fair  # Before Keras: it sets the backend from --backend.

from kd_keras import callbacks
from kd_keras import models
from kd_keras import training

FLAGS = flags.FLAGS
SETTINGS = dict(
    quick=dict(
        train_examples=15_000,
        tune_examples=5_000,
        teacher_epochs=3,
        student_epochs=6,
        trials=3,
    ),
    full=dict(
        train_examples=30_000,
        tune_examples=10_000,
        teacher_epochs=8,
        student_epochs=15,
        trials=8,
    ),
)
fair.define_flags(SETTINGS)


def student():
    return models.mlp((32,), name="student")


def methods(study, settings):
    epochs, teacher_epochs = settings["student_epochs"], settings["teacher_epochs"]
    snapshots = study.workdir / "teacher_snapshots"

    final = study.trained(
        "teacher",
        lambda: fair.conv_net((32, 64), 128, "teacher"),
        teacher_epochs,
        callbacks=[callbacks.TeacherSnapshots(snapshots, every=1)],
    )
    teachers = {teacher_epochs: final}

    def teacher_at(epoch):
        if epoch not in teachers:
            teachers[epoch] = callbacks.TeacherSnapshots.load(snapshots, epoch)
        return teachers[epoch]

    def method(name, early_student, early_teacher):
        def space(hp):
            fair.temperature_and_weight(hp)
            values = {}
            if early_student:
                values["kd_off"] = hp.Int("kd_off_epoch", 1, epochs - 1)
            if early_teacher:
                values["snapshot"] = hp.Int("teacher_epoch", 1, teacher_epochs - 1)
            return values

        def train(hp, split, seed):
            values = space(hp)
            epoch = values.get("snapshot", teacher_epochs)
            stop = (
                [callbacks.StudentEarlyStop(epoch=values["kd_off"])]
                if early_student
                else []
            )
            return fair.distill(
                teacher_at(epoch),
                student,
                study,
                split,
                seed,
                hp,
                key=f"teacher_{epoch}",
                epochs=epochs,
                callbacks=stop,
            )

        return fair.Method(name, train, space)

    return teacher_at, [
        fair.scratch(student, study, epochs),
        method("KD", False, False),
        method("student early stop", True, False),
        method("early-stopped teacher", False, True),
        method("both", True, True),
    ]


def main(argv):
    del argv
    study = fair.Study.from_flags("early_stop", FLAGS, SETTINGS)
    settings = study.settings
    with training.Stopwatch() as timer:
        teacher_at, candidates = methods(study, settings)
        rows = study.compare(candidates)
    # The teacher's final epoch, and the snapshots the methods chose.
    epochs = sorted(
        {settings["teacher_epochs"]}
        | {c["teacher_epoch"] for c in study.chosen.values() if "teacher_epoch" in c}
    )
    teacher_accuracy = {e: study.data.accuracy(teacher_at(e), "test") for e in epochs}
    heading = (
        f"Early stops on Fashion-MNIST ({study.mode}: teacher CNN 32-64-128, "
        f"{settings['teacher_epochs']} epochs, "
        f"{100 * teacher_accuracy[settings['teacher_epochs']]:.2f}% test; "
        f"student MLP 784-32-10, {settings['student_epochs']} epochs on "
        f"{settings['train_examples']:,} images; {study.budget_text()}; "
        f"{timer.seconds / 60:.1f} min)"
    )
    snapshots = "Test accuracy of the teacher at its last epoch and at the "
    snapshots += "snapshots chosen: " + ", ".join(
        f"epoch {e}: {100 * a:.2f}%" for e, a in teacher_accuracy.items()
    )
    out = study.report(
        FLAGS,
        heading,
        rows,
        snapshots,
        dict(teacher_test_accuracy=teacher_accuracy, minutes=timer.seconds / 60),
    )
    fair.plot_rows(
        rows,
        out / f"early_stop_{study.mode}.png",
        "Student MLP 784-32-10 on Fashion-MNIST, early stops",
    )


if __name__ == "__main__":
    app.run(main)
