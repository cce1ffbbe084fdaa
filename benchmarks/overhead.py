"""Epoch time of distillation against training the student alone, on one
Keras backend.

Four runs on MNIST digits (30,000 by default), teacher 784-1200-1200-10,
student 784-800-800-10, batch 128, interleaved epoch by epoch so that drift
in the machine's speed hits all four alike:

- `scratch`: the student alone, on the labels;
- `on_the_fly`: `kd_keras.Distiller`, the teacher run at every step;
- `cached`: `kd_keras.Distiller` on `kd_keras.cache_teacher_logits`;
- `keras_distillation`: `keras.distillation.Distiller` with
  `LogitsDistillation(loss=keras.losses.KLDivergence())`, so that its loss is
  the true T²·KL.

Every run reads the same kind of input pipeline: by default
`kd_keras.data.ArrayBatches` over the digits in memory (the cached run's
carries the logits beside them), which needs no TensorFlow; on TensorFlow,
`--pipeline tf_data` makes every run read an in-memory `tf.data` pipeline
instead. Each figure is the minimum epoch time over the measured epochs,
after one warm-up epoch: a machine that stalls only ever adds time. Ratios
are of those minima.

    python benchmarks/overhead.py --backend jax [--epochs 6] [--idx_dir DIR]
"""

import time

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras
import numpy as np

import kd_keras
from kd_keras import data
from kd_keras import models
from kd_keras import store

FLAGS = flags.FLAGS
common.define_backend_flag()
flags.DEFINE_integer("epochs", 6, "Measured epochs per run, after 1 warm-up.")
flags.DEFINE_integer("examples", 30_000, "Training digits.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("temperature", 4.0, "Distillation temperature.")
flags.DEFINE_enum(
    "pipeline",
    "array_batches",
    ["array_batches", "tf_data"],
    "Input pipeline of every run.",
)
flags.DEFINE_string(
    "idx_dir",
    None,
    "Folder of the MNIST IDX files (default: the shared copy beside the checkout).",
)
flags.DEFINE_string(
    "output",
    None,
    "Where to write JSON (default: results/overhead_<backend>[_tf_data].json).",
)

TARGETS = {"cached": "<= 1.05 × scratch", "on_the_fly": "<= keras_distillation"}


def _label_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _pipeline(x, y, shuffle):
    """Batches of the arrays, as every run reads them."""
    if FLAGS.pipeline == "array_batches":
        return data.ArrayBatches(
            x, y, batch_size=FLAGS.batch_size, shuffle=shuffle, seed=0
        )
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(y), seed=0)
    return dataset.batch(FLAGS.batch_size).prefetch(tf.data.AUTOTUNE)


def _runs(x, y, teacher):
    """Returns {name: (model, batches)}, each compiled and ready to fit."""
    train = _pipeline(x, y, shuffle=True)
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
    cached_train = kd_keras.cache_teacher_logits(
        teacher, _pipeline(x, y, shuffle=False), seed=0
    )
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
        "cached": (cached, cached_train),
        "keras_distillation": (rival, train),
    }
    return runs, cache_seconds


def main(argv):
    del argv
    if FLAGS.pipeline == "tf_data" and FLAGS.backend != "tensorflow":
        raise app.UsageError("--pipeline tf_data is for --backend tensorflow.")
    (x, y), _ = common.mnist_arrays(FLAGS.idx_dir)
    x, y = x[: FLAGS.examples], y[: FLAGS.examples]
    keras.utils.set_random_seed(0)
    # The teacher's accuracy does not change its cost, so it stays untrained.
    teacher = models.hinton_teacher()
    runs, cache_seconds = _runs(x, y, teacher)
    timers = {name: common.EpochTimer() for name in runs}
    for epoch in range(1 + FLAGS.epochs):
        for name, (model, batches) in runs.items():
            model.fit(
                batches,
                epochs=epoch + 1,
                initial_epoch=epoch,
                verbose=0,
                callbacks=[timers[name]],
            )
    seconds = {name: np.asarray(t.seconds[1:]) for name, t in timers.items()}
    fastest = {name: float(values.min()) for name, values in seconds.items()}
    rows = [
        {
            "run": name,
            "min_epoch_seconds": fastest[name],
            "ratio_to_scratch": fastest[name] / fastest["scratch"],
            "ratio_to_keras_distillation": (
                fastest[name] / fastest["keras_distillation"]
            ),
            "target": TARGETS.get(name, ""),
        }
        for name in runs
    ]
    backend = keras.backend.backend()
    heading = (
        f"Epoch time on {backend} ({FLAGS.pipeline}; {len(y):,} digits, "
        f"batch {FLAGS.batch_size}; minimum over {FLAGS.epochs} interleaved "
        f"epochs after 1 warm-up; teacher logits cached once in "
        f"{cache_seconds:.1f} s)"
    )
    print(
        heading
        + "\n\n"
        + common.markdown_table(
            rows,
            [
                "run",
                "min_epoch_seconds",
                "ratio_to_scratch",
                "ratio_to_keras_distillation",
                "target",
            ],
        )
    )
    suffix = "" if FLAGS.pipeline == "array_batches" else "_tf_data"
    output = FLAGS.output or common.RESULTS / f"overhead_{backend}{suffix}.json"
    store.write_json(
        output,
        {
            "heading": heading,
            "rows": rows,
            "epoch_seconds": {k: v.tolist() for k, v in seconds.items()},
            "cache_seconds": cache_seconds,
            "examples": len(y),
            "batch_size": FLAGS.batch_size,
            "pipeline": FLAGS.pipeline,
            "environment": common.environment(),
        },
    )


if __name__ == "__main__":
    app.run(main)
