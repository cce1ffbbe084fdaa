"""Helpers shared by the benchmark scripts: data, timing, tables."""

import json
import os
import pathlib
import tempfile
import time

import numpy as np
import keras

from kd_keras import data

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The shared MNIST IDX files beside the checkout, when present.
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
DEFAULT_DATA_DIR = pathlib.Path(tempfile.gettempdir()) / "kd_keras_tfds"


def mnist_data_dir(data_dir=None, idx_dir=None):
    """Returns a tfds data folder holding MNIST, importing IDX files if needed.

    Without `idx_dir`, the IDX files beside the checkout are used when
    present; otherwise tensorflow-datasets downloads MNIST into `data_dir`.
    """
    data_dir = pathlib.Path(data_dir or DEFAULT_DATA_DIR)
    idx_dir = idx_dir or (SHARED_MNIST if SHARED_MNIST.is_dir() else None)
    if idx_dir is not None:
        data.import_mnist(idx_dir, data_dir)
    return data_dir


class EpochTimer(keras.callbacks.Callback):
    """Records the wall-clock seconds of every epoch in `self.seconds`."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def markdown_table(rows, columns):
    """Formats a list of dicts as a markdown table of the given columns."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path, payload):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_to_builtin) + "\n")


def _to_builtin(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def mean_std(values):
    values = np.asarray(values, dtype="float64")
    return float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)


def environment():
    """What the figures were measured on."""
    import tensorflow as tf

    return {
        "cpus": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpus": len(tf.config.list_physical_devices("GPU")),
    }


def define_run_flags(default_seeds="2 quick, 3 full"):
    """The flags every accuracy benchmark takes."""
    from absl import flags

    flags.DEFINE_bool("quick", False, "A smaller run that takes under 10 "
                      "minutes on 2 cores.")
    flags.DEFINE_integer("seeds", None, f"Seeds (default: {default_seeds}).")
    flags.DEFINE_string("data_dir", None,
                        "tensorflow-datasets folder with MNIST.")
    flags.DEFINE_string("idx_dir", None, "Folder of MNIST IDX files to import.")
    flags.DEFINE_string("output_dir", str(RESULTS),
                        "Where to write the table, JSON and PNG.")


def mnist_splits(flag_values, train_split, batch_size=128):
    """(train, validation, test): validation is the last 5,000 train digits."""
    data_dir = mnist_data_dir(flag_values.data_dir, flag_values.idx_dir)
    load = dict(name="mnist", data_dir=data_dir, batch_size=batch_size)
    return (
        data.load(split=train_split, shuffle=True, seed=0, **load),
        data.load(split="train[55000:]", **load),
        data.load(split="test", **load),
    )


def percent_mean_std(fractions):
    """'97.12 ± 0.08' from accuracies (or error rates) given as fractions."""
    mean, std = mean_std(100.0 * np.asarray(fractions, dtype="float64"))
    return f"{mean:.2f} ± {std:.2f}"


def write_report(flag_values, name, heading, markdown, payload):
    """Prints the heading and table, and writes them as markdown and JSON."""
    print(heading + "\n\n" + markdown)
    out = pathlib.Path(flag_values.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(f"{heading}\n\n{markdown}\n")
    write_json(out / f"{name}.json",
               dict(payload, environment=environment()))
    return out
