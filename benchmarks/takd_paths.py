"""Teacher-assistant distillation on the plain CNN ladder, on MNIST.

Mirzadeh et al. (2020) distil a plain CNN of depth 10 into one of depth 2,
directly (KD) or through assistants of depth 8, 6 and 4 (TAKD). This script
trains, for each seed, the depth-10 teacher, the depth-2 student from scratch,
and every distillation path from 10 to 2 through the ordered subsets of
{8, 6, 4} with `kd_keras.assistants.search_paths` (shared prefixes trained
once). Widths are scaled (`--width`) to fit a CPU.

Rows, like the paper's Table 1: no KD, KD (teacher → student), TAKD (through
the assistant `suggest_assistant` picks from the validation accuracies:
nearest the mean of teacher and student), and every path; test accuracy,
mean ± std over seeds. Writes markdown, JSON and a PNG of the paths to
benchmarks/results/.

    python benchmarks/takd_paths.py --quick      # under 10 minutes
    python benchmarks/takd_paths.py              # full, under 60 minutes
"""

import pathlib
import tempfile

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras
import numpy as np

from kd_keras import assistants
from kd_keras import models
from kd_keras import training
from kd_keras.apps import plots

FLAGS = flags.FLAGS
common.define_run_flags()
flags.DEFINE_float("width", 0.25, "Width multiplier of the ladder.")
flags.DEFINE_float(
    "temperature",
    10.0,
    "Distillation temperature (the paper's plain-CNN runs use T = 10).",
)
flags.DEFINE_float("distillation_weight", 0.9, "Weight of the KD term.")

TEACHER, ASSISTANTS, STUDENT = 10, (8, 6, 4), 2


def _settings():
    return common.settings(
        FLAGS,
        quick=dict(train_split="train[:3000]", epochs=3, teacher_epochs=4, seeds=2),
        full=dict(train_split="train[:10000]", epochs=6, teacher_epochs=8, seeds=3),
    )


def _cnn(depth, name):
    return models.plain_cnn(depth, width=FLAGS.width, name=name)


def _run_seed(seed, splits, settings, workdir):
    train, val, test = splits

    keras.utils.set_random_seed(seed)
    teacher = _cnn(TEACHER, "teacher")
    training.train(teacher, train, val, epochs=settings["teacher_epochs"], verbose=0)
    keras.utils.set_random_seed(seed)
    scratch = _cnn(STUDENT, "student")
    training.train(scratch, train, val, epochs=settings["epochs"], verbose=0)
    result = assistants.search_paths(
        teacher,
        {str(d): (lambda d=d: _cnn(d, f"assistant_{d}")) for d in ASSISTANTS},
        lambda: _cnn(STUDENT, "student"),
        train,
        val,
        test_data=test,
        temperature=FLAGS.temperature,
        distillation_weight=FLAGS.distillation_weight,
        epochs=settings["epochs"],
        workdir=workdir / f"seed{seed}",
        seed=seed,
    )
    suggestion = assistants.suggest_assistant(
        {str(d): result.assistant_accuracies[(str(d),)] for d in ASSISTANTS},
        teacher_accuracy=training.test_accuracy(teacher, val),
        student_accuracy=training.test_accuracy(scratch, val),
    )
    return {
        "teacher_test_accuracy": training.test_accuracy(teacher, test),
        "scratch_test_accuracy": training.test_accuracy(scratch, test),
        "paths": {row["path"]: row for row in result.table},
        "suggested_assistant": suggestion["assistant"],
        "trainings": result.trainings,
        "naive_trainings": result.naive_trainings,
        "teacher_params": teacher.count_params(),
        "student_params": scratch.count_params(),
    }


def main(argv):
    del argv
    settings = _settings()
    splits = common.mnist_splits(FLAGS, settings["train_split"])
    runs = []
    with training.Stopwatch() as timer, tempfile.TemporaryDirectory() as tmp:
        for seed in range(settings["seeds"]):
            runs.append(_run_seed(seed, splits, settings, pathlib.Path(tmp)))
    paths = list(runs[0]["paths"])

    def path_accuracies(path):
        return [run["paths"][path]["student_test_accuracy"] for run in runs]

    takd = [
        run["paths"][f"teacher → {run['suggested_assistant']} → student"][
            "student_test_accuracy"
        ]
        for run in runs
    ]
    summary = [
        {
            "row": f"teacher (depth {TEACHER})",
            "test_accuracy_percent": common.percent_mean_std(
                [r["teacher_test_accuracy"] for r in runs]
            ),
        },
        {
            "row": f"no KD (depth {STUDENT} from scratch)",
            "test_accuracy_percent": common.percent_mean_std(
                [r["scratch_test_accuracy"] for r in runs]
            ),
        },
        {
            "row": "KD (teacher → student)",
            "test_accuracy_percent": common.percent_mean_std(
                path_accuracies("teacher → student")
            ),
        },
        {
            "row": "TAKD (suggested assistant: "
            + "/".join(r["suggested_assistant"] for r in runs)
            + ")",
            "test_accuracy_percent": common.percent_mean_std(takd),
        },
    ]
    every_path = sorted(
        (
            {
                "path": path,
                "steps": runs[0]["paths"][path]["steps"],
                "test_accuracy_percent": common.percent_mean_std(path_accuracies(path)),
                "mean": float(np.mean(path_accuracies(path))),
            }
            for path in paths
        ),
        key=lambda row: -row["mean"],
    )
    mode = "quick" if FLAGS.quick else "full"
    heading = (
        f"TAKD paths on MNIST ({mode}: plain CNN width {FLAGS.width:g}, "
        f"{settings['train_split']}, teacher {settings['teacher_epochs']} "
        f"epochs, every step {settings['epochs']} epochs, "
        f"T={FLAGS.temperature:g}, λ={FLAGS.distillation_weight:g}, "
        f"{settings['seeds']} seeds; {runs[0]['trainings']} distillations per "
        f"seed instead of {runs[0]['naive_trainings']} without shared "
        f"prefixes; {timer.seconds / 60:.1f} min in all)"
    )
    markdown = (
        common.markdown_table(summary, ["row", "test_accuracy_percent"])
        + "\n\nEvery path (test accuracy %, mean ± std over seeds):\n\n"
        + common.markdown_table(every_path, ["path", "steps", "test_accuracy_percent"])
    )
    out = common.write_report(
        FLAGS,
        f"takd_paths_{mode}",
        heading,
        markdown,
        {
            "settings": {**settings, **common.distillation_flags(FLAGS)},
            "summary": summary,
            "paths": every_path,
            "runs": runs,
            "minutes": timer.seconds / 60,
        },
    )
    plots.plot_paths(
        [
            {"path": row["path"], "test accuracy (mean over seeds)": row["mean"]}
            for row in every_path
        ],
        metric="test accuracy (mean over seeds)",
        path=out / f"takd_paths_{mode}.png",
        title=f"Plain CNN {TEACHER} → {STUDENT} on MNIST, every path",
    )
    print(f"\nWrote {out}/takd_paths_{mode}.{{md,json,png}}")


if __name__ == "__main__":
    app.run(main)
