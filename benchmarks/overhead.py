"""Epoch time of distillation against training the student alone.

Four runs on full MNIST, teacher 784-1200-1200-10, student 784-800-800-10,
batch 128, interleaved epoch by epoch so that drift in the machine's speed
hits all four alike:

- `scratch`: the student alone, on the labels;
- `on_the_fly`: `kd_keras.Distiller`, the teacher run at every step;
- `cached`: `kd_keras.Distiller` on `kd_keras.cache_teacher_logits`;
- `keras_distillation`: `keras.distillation.Distiller` with
  `LogitsDistillation(loss=keras.losses.KLDivergence())`, so that its loss is
  the true T²·KL.

Each figure is the median of the measured epochs after one warm-up epoch, and
the ratios to `scratch` are medians of the per-round ratios.

    python benchmarks/overhead.py [--epochs 3] [--data_dir DIR] [--idx_dir DIR]
"""

import time

from absl import app
from absl import flags
import numpy as np
import keras

import kd_keras
from kd_keras import data
from kd_keras import models

import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 3, "Measured epochs per run, after 1 warm-up.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("temperature", 4.0, "Distillation temperature.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets folder with MNIST.")
flags.DEFINE_string("idx_dir", None, "Folder of MNIST IDX files to import.")
flags.DEFINE_string(
    "output", str(common.RESULTS / "overhead.json"), "Where to write JSON."
)

TARGETS = {"cached": 1.05, "on_the_fly": 1.5}


def _label_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _runs(train, teacher):
    """Returns {name: (model, dataset)}, each compiled and ready to fit."""
    scratch = models.mlp((800, 800), name="scratch")
    scratch.compile("adam", _label_loss(), metrics=["accuracy"])

    on_the_fly = kd_keras.Distiller(
        teacher, models.mlp((800, 800)), temperature=FLAGS.temperature
    )
    on_the_fly.compile("adam", metrics=["accuracy"])

    cached = kd_keras.Distiller(
        teacher, models.mlp((800, 800)), temperature=FLAGS.temperature
    )
    cached.compile("adam", metrics=["accuracy"])
    start = time.perf_counter()
    cached_data = kd_keras.cache_teacher_logits(teacher, train, seed=0)
    cache_seconds = time.perf_counter() - start

    rival = keras.distillation.Distiller(
        teacher=teacher,
        student=models.mlp((800, 800)),
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=FLAGS.temperature, loss=keras.losses.KLDivergence()
        ),
        student_loss_weight=0.1,
    )
    rival.compile("adam", loss=_label_loss(), metrics=["accuracy"])
    runs = {
        "scratch": (scratch, train),
        "on_the_fly": (on_the_fly, train),
        "cached": (cached, cached_data),
        "keras_distillation": (rival, train),
    }
    return runs, cache_seconds


def main(argv):
    del argv
    data_dir = common.mnist_data_dir(FLAGS.data_dir, FLAGS.idx_dir)
    load = dict(name="mnist", data_dir=data_dir, batch_size=FLAGS.batch_size)
    train = data.load(split="train", shuffle=True, seed=0, **load)
    # The teacher's accuracy does not change its cost, so it stays untrained.
    teacher = models.hinton_teacher()
    runs, cache_seconds = _runs(train, teacher)
    timers = {name: common.EpochTimer() for name in runs}
    for epoch in range(1 + FLAGS.epochs):
        for name, (model, dataset) in runs.items():
            model.fit(dataset, epochs=epoch + 1, initial_epoch=epoch,
                      verbose=0, callbacks=[timers[name]])
    seconds = {name: np.asarray(t.seconds[1:]) for name, t in timers.items()}
    rows = []
    for name in runs:
        rows.append({
            "run": name,
            "epoch_seconds": float(np.median(seconds[name])),
            "ratio_to_scratch": float(
                np.median(seconds[name] / seconds["scratch"])),
            "ratio_to_keras_distillation": float(
                np.median(seconds[name] / seconds["keras_distillation"])),
            "target": f"<= {TARGETS[name]}" if name in TARGETS else "",
        })
    print(common.markdown_table(
        rows, ["run", "epoch_seconds", "ratio_to_scratch",
               "ratio_to_keras_distillation", "target"]))
    print(f"\nTeacher logits cached once in {cache_seconds:.1f} s "
          f"({len(seconds['scratch'])} measured epochs per run).")
    common.write_json(FLAGS.output, {
        "rows": rows,
        "epoch_seconds": {k: v.tolist() for k, v in seconds.items()},
        "cache_seconds": cache_seconds,
        "batch_size": FLAGS.batch_size,
        "environment": common.environment(),
    })


if __name__ == "__main__":
    app.run(main)
