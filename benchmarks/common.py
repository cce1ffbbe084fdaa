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
