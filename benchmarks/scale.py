"""Teacher logits at dataset scale: in memory, on disk (float32, float16)
and top k.

Part 1, scale: a synthetic dataset of 1,000,000 examples of 784 float32
values (3.1 GB), made inside tf.data by arithmetic on the index
(`kd_keras.data.synthetic`), so nothing is stored. Teacher MLP 784-256-10,
student MLP 784-32-10, batch 500. Each cache mode runs in a process of its
own, so that its peak resident memory is its own, and reports:

- build: seconds for `cache_teacher_logits` (the teacher's one pass);
- reuse: seconds for a second call that finds the files (disk modes);
- size: bytes of the files (disk), or of the logits and inputs held (memory);
- memory: rise of the process's peak resident memory over its resident
  memory before caching, through caching and training;
- epoch ratio: the minimum epoch time of the Distiller on the cache over the
  minimum epoch time of the student trained from scratch on the same input
  pipeline, their epochs interleaved in the same process (one warm-up each):
  in order (`shuffle=False`, the scratch pipeline's own order, so the
  ratio is the price of pairing with, reading, verifying and decoding the
  files) and shuffled (the default, which adds the block shuffle that the
  unshuffled scratch pipeline does without).

Part 2, accuracy on MNIST: a teacher MLP 784-1200-1200-10 and students MLP
784-64-10 distilled (T = 4, λ = 0.5) on each cache mode, seeds 0..n-1, test
accuracy against the full-logit cache in memory; and the KD term's relative
error when the top-k logits rebuild the teacher's, on the test digits, at T
= 1, 2, 4, 8.

    python benchmarks/scale.py [--quick] [--examples N] [--idx_dir DIR]
"""

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras
import numpy as np

import kd_keras
from kd_keras import _logit_files
from kd_keras import store

FLAGS = flags.FLAGS
common.define_run_flags(default_seeds="2 quick, 3 full")
flags.DEFINE_integer("examples", None, "Synthetic examples (default 1M; quick 100k).")
flags.DEFINE_integer("top_k", 5, "k of the top-k cache.")
flags.DEFINE_string("worker", None, "Internal: run one cache mode and print JSON.")
flags.DEFINE_string("cache_dir", None, "Internal: the worker's cache folder.")
flags.DEFINE_integer("epochs", None, "Internal: the worker's measured epochs.")
flags.DEFINE_string(
    "scale_rows",
    None,
    "A JSON file of part 1's rows from an earlier run (each run writes "
    "kd_keras_scale_rows.json in the temporary folder): run part 2 only.",
)

BATCH = 500
QUICK = {"examples": 100_000, "epochs": 3, "seeds": 2, "teacher_epochs": 3}
FULL = {"examples": 1_000_000, "epochs": 6, "seeds": 3, "teacher_epochs": 8}
STUDENT_EPOCHS = 10
TEMPERATURE, WEIGHT = 4.0, 0.5


def modes(top_k):
    return {
        "in memory": {},
        "disk float32": {"dtype": "float32"},
        "disk float16": {"dtype": "float16"},
        f"disk top-{top_k}": {"dtype": "float32", "top_k": top_k},
        f"disk top-{top_k} float16": {"dtype": "float16", "top_k": top_k},
    }


def _resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak():
    """The process's peak resident memory: VmHWM, not ru_maxrss, which Linux
    carries over from the parent process across fork and exec."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def mlp(hidden, inputs=784, classes=10):
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            *[keras.layers.Dense(units, activation="relu") for units in hidden],
            keras.layers.Dense(classes),
        ]
    )


def _compiled_student(seed):
    keras.utils.set_random_seed(seed)
    student = mlp([32])
    student.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return student


def worker(mode, examples, epochs, cache_dir):
    """One cache mode on the synthetic data; returns its figures."""
    options = modes(FLAGS.top_k)[mode]
    data = kd_keras.data.synthetic(examples, batch_size=BATCH)
    keras.utils.set_random_seed(0)
    teacher = mlp([256])
    scratch = _compiled_student(1)
    distiller = kd_keras.Distiller(
        teacher, mlp([32]), temperature=TEMPERATURE, distillation_weight=WEIGHT
    )
    distiller.compile("adam")
    before = _resident()
    directory = None if not options else cache_dir
    start = time.perf_counter()
    cached = kd_keras.cache_teacher_logits(
        teacher, data, directory=directory, seed=0, **options
    )
    build = time.perf_counter() - start
    result = {"mode": mode, "examples": examples, "build_s": build}
    if directory is None:
        result["size_bytes"] = examples * (784 + 10) * 4 + examples * 4
    runs = [("scratch", scratch, data), ("distiller", distiller, cached)]
    if directory is not None:
        result["size_bytes"] = _logit_files.size(directory)
        start = time.perf_counter()
        in_order = kd_keras.cache_teacher_logits(
            teacher, data, directory=directory, shuffle=False, **options
        )
        result["reuse_s"] = time.perf_counter() - start
        # The same pipeline in the same order: what pairing with the files,
        # reading, verifying and decoding them cost, without the shuffle.
        runs.append(("distiller, in order", distiller, in_order))
    times = {name: [] for name, _, _ in runs}
    for epoch in range(epochs + 1):
        for name, model, dataset in runs:
            timer = common.EpochTimer()
            model.fit(dataset, epochs=1, verbose=0, callbacks=[timer])
            if epoch:  # The first is a warm-up (tracing).
                times[name].append(timer.seconds[0])
    result["epoch_s"] = {name: min(values) for name, values in times.items()}
    result["epoch_ratio"] = (
        result["epoch_s"]["distiller"] / result["epoch_s"]["scratch"]
    )
    if "distiller, in order" in times:
        result["in_order_ratio"] = (
            result["epoch_s"]["distiller, in order"] / result["epoch_s"]["scratch"]
        )
    result["memory_rise_bytes"] = _peak() - before
    result["logits_bytes"] = examples * 10 * 4
    return result


def scale_part(chosen):
    rows = []
    for mode in modes(FLAGS.top_k):
        cache_dir = tempfile.mkdtemp(prefix="kd_keras_scale_")
        command = [
            sys.executable,
            __file__,
            f"--worker={mode}",
            f"--examples={chosen['examples']}",
            f"--epochs={chosen['epochs']}",
            f"--cache_dir={cache_dir}",
            f"--top_k={FLAGS.top_k}",
        ]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        shutil.rmtree(cache_dir, ignore_errors=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            rows.append({"mode": mode, "error": run.stderr.strip().splitlines()[-1]})
            continue
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def _kd_term(teacher_logits, student_logits, temperature):
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) per example, in float64."""

    def log_softmax(z):
        z = z / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    t, s = log_softmax(teacher_logits), log_softmax(student_logits)
    return temperature**2 * (np.exp(t) * (t - s)).sum(-1)


def accuracy_part(chosen):
    (x, y), (x_test, y_test) = common.mnist_arrays(FLAGS.idx_dir)
    x, x_test = x.reshape(len(x), -1), x_test.reshape(len(x_test), -1)
    keras.utils.set_random_seed(0)
    teacher = mlp([1200, 1200])
    teacher.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    teacher.fit(x, y, batch_size=128, epochs=chosen["teacher_epochs"], verbose=0)
    teacher_accuracy = teacher.evaluate(x_test, y_test, verbose=0)[1]
    import tensorflow as tf

    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
    accuracies, sizes = {}, {}
    for mode, options in modes(FLAGS.top_k).items():
        folder = tempfile.mkdtemp(prefix="kd_keras_mnist_")
        accuracies[mode] = []
        for seed in range(chosen["seeds"]):
            cached = kd_keras.cache_teacher_logits(
                teacher,
                train,
                seed=seed,
                directory=folder if options else None,
                shuffle_buffer=60_000 if options else None,
                **options,
            )
            keras.utils.set_random_seed(seed)
            distiller = kd_keras.Distiller(
                teacher, mlp([64]), temperature=TEMPERATURE, distillation_weight=WEIGHT
            )
            distiller.compile("adam")
            distiller.fit(cached, epochs=STUDENT_EPOCHS, verbose=0)
            predictions = distiller.student.predict(x_test, verbose=0)
            accuracies[mode].append(float((predictions.argmax(-1) == y_test).mean()))
        if options:
            sizes[mode] = _logit_files.size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        print(mode, accuracies[mode], flush=True)
    # The KD term's error from the top-k rebuild, on the test digits, against
    # a student half way (one epoch of scratch training).
    full = np.asarray(teacher.predict(x_test, verbose=0), "float32")
    student = _compiled_student(0)
    student.fit(x, y, batch_size=128, epochs=1, verbose=0)
    student_logits = np.asarray(student.predict(x_test, verbose=0), "float64")
    errors = {}
    for k in (1, 2, FLAGS.top_k):
        layout = _logit_files.Layout((10,), "float32", top_k=k)
        rebuilt = _logit_files.decode(_logit_files.encode(full, layout), layout)
        errors[k] = {}
        for temperature in (1.0, 2.0, 4.0, 8.0):
            exact = _kd_term(full.astype("float64"), student_logits, temperature)
            approx = _kd_term(rebuilt.astype("float64"), student_logits, temperature)
            errors[k][temperature] = float(np.abs(approx - exact).mean() / exact.mean())
    return {
        "teacher_accuracy": float(teacher_accuracy),
        "accuracies": accuracies,
        "mnist_sizes": sizes,
        "kd_relative_error": errors,
    }


def _markdown(headers, rows):
    return common.markdown_table(
        [dict(zip(headers, row, strict=True)) for row in rows], headers
    )


def _megabytes(value):
    return f"{value / 1e6:,.0f} MB"


def report(chosen, rows, accuracy):
    reference = accuracy["accuracies"]["in memory"]
    table = []
    for row in rows:
        mode = row["mode"]
        mean = common.percent_mean_std(accuracy["accuracies"][mode])
        difference = 100 * (np.mean(accuracy["accuracies"][mode]) - np.mean(reference))
        if "error" in row:
            cells = [mode, row["error"], "", "", "", "", "", mean, ""]
        else:
            cells = [
                mode,
                f"{row['build_s']:.1f} s",
                f"{row['reuse_s']:.1f} s" if "reuse_s" in row else "—",
                _megabytes(row["size_bytes"]),
                _megabytes(row["memory_rise_bytes"]),
                f"{row['in_order_ratio']:.2f}" if "in_order_ratio" in row else "—",
                f"{row['epoch_ratio']:.2f} ({row['epoch_s']['distiller']:.1f} s)",
                mean,
                f"{difference:+.2f}" if mode != "in memory" else "—",
            ]
        table.append(cells)
    headers = [
        "cache",
        "build",
        "reuse",
        "size",
        "peak memory rise",
        "epoch / scratch epoch, in order",
        "epoch / scratch epoch, shuffled",
        "MNIST student test accuracy %",
        "vs in memory, points",
    ]
    errors = accuracy["kd_relative_error"]
    temperatures = list(next(iter(errors.values())))
    error_headers = ["k"] + [f"T = {t:g}" for t in temperatures]
    error_table = _markdown(
        error_headers,
        [[k] + [f"{100 * errors[k][t]:.2f}%" for t in temperatures] for k in errors],
    )
    scratch = min(row["epoch_s"]["scratch"] for row in rows if "epoch_s" in row)
    heading = (
        f"# Teacher logits at scale ({'quick' if FLAGS.quick else 'full'})\n\n"
        f"Synthetic data: {chosen['examples']:,} examples of 784 float32 "
        f"({_megabytes(chosen['examples'] * 784 * 4)}), batch {BATCH}; teacher "
        f"MLP 784-256-10, student MLP 784-32-10; logits "
        f"{_megabytes(chosen['examples'] * 40)} as float32. Scratch epoch "
        f"(fastest): {scratch:.1f} s. MNIST: teacher MLP 784-1200-1200-10 "
        f"({100 * accuracy['teacher_accuracy']:.2f}% test), students MLP "
        f"784-64-10, T = {TEMPERATURE:g}, λ = {WEIGHT}, {STUDENT_EPOCHS} "
        f"epochs, {chosen['seeds']} seeds."
    )
    markdown = (
        _markdown(headers, table)
        + "\n\nRelative error of the KD term (mean |approx − exact| / mean exact) "
        "when the top-k logits rebuild the teacher's, MNIST test digits:\n\n"
        + error_table
    )
    name = "scale_quick" if FLAGS.quick else "scale_full"
    common.write_report(
        FLAGS, name, heading, markdown, {"settings": chosen, "scale": rows, **accuracy}
    )


def main(argv):
    del argv
    chosen = common.settings(FLAGS, QUICK, FULL)
    if FLAGS.examples:
        chosen["examples"] = FLAGS.examples
    if FLAGS.worker:
        print(
            json.dumps(
                worker(FLAGS.worker, FLAGS.examples, FLAGS.epochs, FLAGS.cache_dir)
            )
        )
        return
    start = time.perf_counter()
    rows_file = pathlib.Path(tempfile.gettempdir()) / "kd_keras_scale_rows.json"
    if FLAGS.scale_rows:
        rows = json.loads(pathlib.Path(FLAGS.scale_rows).read_text())
    else:
        rows = scale_part(chosen)
        store.write_json(rows_file, rows)  # For --scale_rows, if part 2 fails.
    accuracy = accuracy_part(chosen)
    # Kept before the report, which only formats them.
    store.write_json(
        pathlib.Path(tempfile.gettempdir()) / "kd_keras_scale_raw.json",
        {"settings": chosen, "scale": rows, **accuracy},
    )
    report(chosen, rows, accuracy)
    print(f"\nTotal: {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    pathlib.Path(common.RESULTS).mkdir(exist_ok=True)
    app.run(main)
