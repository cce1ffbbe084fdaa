"""Helpers shared by the benchmark scripts: backend, data, timing, tables.

Import this module before Keras: a `--backend` flag on the command line sets
KERAS_BACKEND, which Keras reads once, when it is imported.
"""

import os
import pathlib
import platform
import sys
import tempfile
import time

BACKENDS = ("tensorflow", "jax", "torch")


def _backend_from_argv(argv):
    for index, arg in enumerate(argv):
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
        if arg == "--backend" and index + 1 < len(argv):
            return argv[index + 1]
    return None


if _backend_from_argv(sys.argv):
    os.environ["KERAS_BACKEND"] = _backend_from_argv(sys.argv)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kd_keras import data  # noqa: E402
from kd_keras import store  # noqa: E402
from kd_keras.apps.tables import markdown_table  # noqa: E402, F401

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


def mean_std(values):
    values = np.asarray(values, dtype="float64")
    return float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)


def define_backend_flag():
    """`--backend`, read by this module at import (see its docstring)."""
    from absl import flags

    flags.DEFINE_enum(
        "backend",
        keras.backend.backend(),
        BACKENDS,
        "Keras backend (sets KERAS_BACKEND).",
    )


def environment():
    """What the figures were measured on."""
    versions = {}
    for name in ("tensorflow", "jax", "torch"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = module.__version__
    from kd_keras import _backend

    return {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        **versions,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "devices": _backend.devices(),
    }


def mnist_arrays(idx_dir=None):
    """MNIST from its IDX files as NumPy: `((x_train, y_train), (x_test,
    y_test))`, float32 images in [0, 1] of shape (n, 28, 28, 1) and int32
    labels. Needs no TensorFlow. Without `idx_dir`, the files beside the
    checkout are read."""
    return tuple(
        ((x.astype("float32") / 255.0)[..., None], y.astype("int32"))
        for x, y in data.read_mnist(idx_dir or SHARED_MNIST)
    )


def define_run_flags(default_seeds="2 quick, 3 full"):
    """The flags every accuracy benchmark takes."""
    from absl import flags

    define_backend_flag()
    flags.DEFINE_bool(
        "quick", False, "A smaller run that takes under 10 minutes on 2 cores."
    )
    flags.DEFINE_integer("seeds", None, f"Seeds (default: {default_seeds}).")
    flags.DEFINE_enum(
        "pipeline",
        "tfds",
        ["tfds", "array_batches"],
        "tfds: tf.data from tensorflow-datasets; array_batches: "
        "kd_keras.data.ArrayBatches over the IDX files read "
        "into memory (no TensorFlow needed).",
    )
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets folder with MNIST.")
    flags.DEFINE_string("idx_dir", None, "Folder of MNIST IDX files to import.")
    flags.DEFINE_string(
        "output_dir", str(RESULTS), "Where to write the table, JSON and PNG."
    )


def settings(flag_values, quick, full):
    """A benchmark's quick or full settings, with `--seeds` applied."""
    chosen = dict(quick if flag_values.quick else full)
    if flag_values.seeds is not None:
        chosen["seeds"] = flag_values.seeds
    return chosen


VALIDATION_EXAMPLES = 5_000


def _train_examples(train_split):
    """N of a split written "train[:N]", the only form the benchmarks use."""
    prefix, suffix = "train[:", "]"
    if not (train_split.startswith(prefix) and train_split.endswith(suffix)):
        raise ValueError(f"Expected a split 'train[:N]'. Received {train_split!r}.")
    return int(train_split[len(prefix) : -len(suffix)])


def mnist_splits(flag_values, train_split, batch_size=128):
    """(train, validation, test): validation is the last 5,000 train digits.

    With `--pipeline array_batches` they are `kd_keras.data.ArrayBatches`
    over the IDX files, so that the benchmark runs without TensorFlow.
    """
    if getattr(flag_values, "pipeline", "tfds") == "array_batches":
        (x, y), (x_test, y_test) = mnist_arrays(flag_values.idx_dir)
        count = _train_examples(train_split)
        held_out = slice(len(y) - VALIDATION_EXAMPLES, None)
        return (
            data.ArrayBatches(
                x[:count], y[:count], batch_size=batch_size, shuffle=True, seed=0
            ),
            data.ArrayBatches(x[held_out], y[held_out], batch_size=batch_size),
            data.ArrayBatches(x_test, y_test, batch_size=batch_size),
        )
    data_dir = mnist_data_dir(flag_values.data_dir, flag_values.idx_dir)
    load = dict(name="mnist", data_dir=data_dir, batch_size=batch_size)
    return (
        data.load(split=train_split, shuffle=True, seed=0, **load),
        data.load(split=f"train[{60_000 - VALIDATION_EXAMPLES}:]", **load),
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
    store.write_json(out / f"{name}.json", dict(payload, environment=environment()))
    return out
