"""What the teacher-size and TAKD studies share: the plain-CNN ladder of
Mirzadeh et al. (2020) on Fashion-MNIST, trained stably to depth 10, the
depth-2 student and its scratch and KD methods.

Both studies keep their work in one folder, so that whichever runs second
reuses the teachers, the searches and the runs of the methods they share
(scratch, and KD from the depth-10 teacher). Run them one after the other,
not side by side: each rewrites the folder's record of finished runs.
"""

import fair  # Before Keras: it sets the backend from --backend.

from kd_keras import models

WIDTH = 0.25
STUDENT = 2
TEACHERS = (4, 6, 8, 10)
SETTINGS = dict(
    quick=dict(
        train_examples=5_000,
        tune_examples=2_500,
        teacher_epochs=3,
        student_epochs=3,
        trials=2,
    ),
    full=dict(
        train_examples=15_000,
        tune_examples=7_500,
        teacher_epochs=10,
        student_epochs=8,
        trials=6,
    ),
)


def cnn(depth, name=None):
    return models.plain_cnn(depth, width=WIDTH, name=name)


def study(name, flag_values):
    """The study, in the ladder's shared work folder."""
    mode = "quick" if flag_values.quick else "full"
    return fair.Study.from_flags(
        name, flag_values, SETTINGS, workdir_name=f"ladder_{mode}"
    )


def teacher(study, depth, seed=0):
    """The plain CNN of `depth` trained on the labels, with a warm-up (kept
    in the work folder)."""
    settings = study.settings
    return study.trained(
        f"teacher_{depth}_seed{seed}",
        lambda: cnn(depth, f"plain_cnn_{depth}"),
        settings["teacher_epochs"],
        seed=seed,
        optimizer=fair.warm_up_adam(
            settings["teacher_epochs"], settings["train_examples"]
        ),
    )


def student():
    return cnn(STUDENT, "student")


def kd_from(study, depth, teacher_model):
    """Plain KD from a ladder teacher (T and λ tuned)."""

    def train(hp, split, seed):
        return fair.distill(
            teacher_model,
            student,
            study,
            split,
            seed,
            hp,
            key=f"teacher_{depth}",
            epochs=study.settings["student_epochs"],
        )

    return fair.Method(f"KD from depth {depth}", train, fair.temperature_and_weight)


def scratch(study):
    return fair.scratch(student, study, study.settings["student_epochs"])
