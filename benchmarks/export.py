"""Teacher against distilled student, in every export format, on MNIST.

Trains a 784-1200-1200-10 teacher, distils it into a 784-300-300-10 student,
exports both with `kd_keras.export.export_student` (SavedModel, float TFLite,
dynamic-range TFLite, int8 TFLite calibrated on 500 training digits), and
reports each file's size, the single-example latency (TFLite interpreter,
median) and the accuracy on the 10,000 MNIST test digits.

    python benchmarks/export.py --quick      # under 10 minutes
    python benchmarks/export.py              # full
"""

import pathlib
import shutil
import tempfile

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras

from kd_keras import export
from kd_keras import models
from kd_keras import training

FLAGS = flags.FLAGS
common.define_run_flags(default_seeds="1")


def _settings():
    if FLAGS.quick:
        return dict(train_split="train[:10000]", epochs=4)
    return dict(train_split="train[:55000]", epochs=12)


def main(argv):
    del argv
    settings = _settings()
    train, val, test = common.mnist_splits(FLAGS, settings["train_split"])
    keras.utils.set_random_seed(0)
    teacher = models.hinton_teacher()
    training.train(teacher, train, val, epochs=settings["epochs"], verbose=0)
    student = models.mlp((300, 300), name="student")
    training.distill(
        teacher,
        student,
        train,
        val,
        temperature=4.0,
        epochs=settings["epochs"],
        verbose=0,
    )
    rows = []
    workdir = pathlib.Path(tempfile.mkdtemp())
    try:
        for name, model in (("teacher 2x1200", teacher), ("student 2x300", student)):
            report = export.export_student(
                model,
                workdir / name.split()[0],
                representative_data=train,
                test_data=test,
            )
            for fmt, entry in report.items():
                rows.append(
                    {
                        "model": name,
                        "format": fmt,
                        "size_kb": entry.get("bytes", 4 * entry.get("params", 0))
                        / 1024,
                        "latency_ms": entry["latency_ms"],
                        "test_accuracy_percent": 100 * entry["accuracy"],
                        "max_abs_diff": f"{entry.get('max_abs_diff', 0.0):.1e}",
                    }
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    mode = "quick" if FLAGS.quick else "full"
    heading = (
        f"Export on MNIST ({mode}: {settings['train_split']}, "
        f"{settings['epochs']} epochs each; latency is one example, median, "
        "2 CPU cores; the keras row's size is 4 bytes per parameter)"
    )
    common.write_report(
        FLAGS,
        f"export_{mode}",
        heading,
        common.markdown_table(
            rows,
            [
                "model",
                "format",
                "size_kb",
                "latency_ms",
                "test_accuracy_percent",
                "max_abs_diff",
            ],
        ),
        {"settings": settings, "rows": rows},
    )


if __name__ == "__main__":
    app.run(main)
