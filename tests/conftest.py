import gzip
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
SHARED_MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
NUM_CLASSES = 4
FEATURES = 8


def _tiny_mlp(units=16, seed=0, num_classes=NUM_CLASSES, activation=None, name=None):
    """A small logits classifier on FEATURES inputs, built and seeded (not
    seeded with seed=None)."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(num_classes, activation=activation),
        ],
        name=name,
    )


def _copy_of(model):
    """A new model with the same architecture and weights."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


class CountingLayer(keras.layers.Layer):
    """An identity layer that counts how many times it runs, also inside
    compiled steps and conditionals: a variable on TensorFlow, a host
    callback on JAX, and plain Python on PyTorch, which runs eagerly."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._python_calls = 0
        if BACKEND == "tensorflow":
            self.calls = self.add_weight(
                shape=(), initializer="zeros", trainable=False, name="calls"
            )

    def _count_one(self):
        self._python_calls += 1

    def call(self, inputs):
        if BACKEND == "tensorflow":
            self.calls.assign_add(1.0)
        elif BACKEND == "jax":
            import jax

            jax.debug.callback(self._count_one)
        elif inputs.device.type != "meta":  # Shape inference uses "meta".
            self._count_one()
        return inputs

    def count(self):
        if BACKEND == "tensorflow":
            return int(self.calls.numpy())
        if BACKEND == "jax":
            import jax

            jax.effects_barrier()
        return self._python_calls


def _counting_teacher(seed=1):
    """A tiny teacher whose `count()` says how many batches it has run on."""
    keras.utils.set_random_seed(seed)
    counter = CountingLayer()
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(16, activation="relu")(counter(inputs))
    model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(hidden))
    model.count = counter.count
    return model


class NumpyReference:
    """The losses, computed in float64 NumPy, that tests hold kd_keras to."""

    @staticmethod
    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    @classmethod
    def per_position_kd(cls, t, s, temperature):
        """T²·KL at every position of logits (..., classes); one logit is
        binary."""
        t, s = np.asarray(t, "float64"), np.asarray(s, "float64")
        if t.shape[-1] == 1:
            p = 1.0 / (1.0 + np.exp(-t[..., 0] / temperature))
            q = 1.0 / (1.0 + np.exp(-s[..., 0] / temperature))
            kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
            return temperature**2 * kl
        log_p = cls.log_softmax(t / temperature)
        log_q = cls.log_softmax(s / temperature)
        return temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(-1)

    @classmethod
    def distillation_loss(cls, t, s, temperature):
        return cls.per_position_kd(t, s, temperature).mean()

    @classmethod
    def token_cross_entropy(cls, logits, labels):
        """Cross-entropy at every position of logits (..., classes)."""
        log_q = cls.log_softmax(np.asarray(logits, "float64"))
        return -np.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]

    @classmethod
    def cross_entropy(cls, logits, labels):
        return cls.token_cross_entropy(logits, labels).mean()

    @staticmethod
    def binary_cross_entropy(logits, labels):
        p = 1 / (1 + np.exp(-np.asarray(logits, "float64")[..., 0]))
        return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


class Interrupt(keras.callbacks.Callback):
    """Stops the run after `epoch` epochs, before their backup, as a killed
    process would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt


# Shared helpers, as fixtures: tests take them as arguments.


@pytest.fixture(scope="session")
def interrupt():
    """`interrupt(n)`: a callback that kills the run after n epochs."""
    return Interrupt


@pytest.fixture(scope="session")
def features():
    """The input width of `tiny_mlp` and `tiny_data`."""
    return FEATURES


@pytest.fixture(scope="session")
def num_classes():
    """The class count of `tiny_mlp` and `tiny_data`."""
    return NUM_CLASSES


@pytest.fixture(scope="session")
def tiny_mlp():
    return _tiny_mlp


@pytest.fixture(scope="session")
def copy_of():
    return _copy_of


@pytest.fixture(scope="session")
def counting_teacher():
    return _counting_teacher


@pytest.fixture(scope="session")
def gradient():
    return _gradient


@pytest.fixture(scope="session")
def central_differences():
    return _central_differences


@pytest.fixture(scope="session")
def keras_and_kd_keras_totals():
    return _keras_and_kd_keras_totals


@pytest.fixture(scope="session")
def shared_mnist():
    """Where the real MNIST IDX files are; may be missing."""
    return SHARED_MNIST


def _write_idx(path, array):
    """Writes a uint8 array as a gzipped IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def small_idx_set(tmp_path):
    """A small MNIST-format set of random images: the four gzipped IDX files
    in tmp_path/idx. Returns the folder and `{"train": (x, y), "test": (x,
    y)}`, 20 training and 10 test uint8 images with their labels."""
    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, count in (("train", "train", 20), ("test", "t10k", 10)):
        x = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, count, dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
        arrays[split] = (x, y)
    return folder, arrays


@pytest.fixture
def reference():
    """`NumpyReference`, for tests that compare against NumPy."""
    return NumpyReference


@pytest.fixture
def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, FEATURES)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + 2 * (x[:, 1] > 0).astype("int32")
    return x, y


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory):
    """A tfds folder with the real MNIST, imported from the shared IDX files."""
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"the MNIST IDX files are not at {SHARED_MNIST}")
    from kd_keras import data

    data_dir = tmp_path_factory.mktemp("tfds")
    data.import_mnist(SHARED_MNIST, data_dir)
    return data_dir


def _gradient(function, value):
    """d function(value) / d value, on the current backend."""
    value = np.asarray(value, "float32")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(value)
        with tf.GradientTape() as tape:
            result = function(variable)
        return tape.gradient(result, variable).numpy()
    if BACKEND == "jax":
        import jax

        return np.asarray(jax.grad(function)(value))
    import torch

    tensor = torch.tensor(value, requires_grad=True)
    function(tensor).backward()
    return tensor.grad.numpy()


def _central_differences(function, value, step=1e-5):
    """d function(value) / d value of a float64 NumPy function, by central
    differences: the reference for `_gradient`."""
    expected = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        up, down = value.copy(), value.copy()
        up[index] += step
        down[index] -= step
        expected[index] = (function(up) - function(down)) / (2 * step)
    return expected


def _keras_and_kd_keras_totals(teacher, student, arguments, x, y):
    """The total loss of `keras.distillation.Distiller(**arguments)` and of
    `kd_keras.Distiller(**arguments)` on one batch: a Keras user switches by
    changing one import."""
    import kd_keras

    totals = []
    for module in (keras.distillation, kd_keras):
        distiller = module.Distiller(teacher, student, **arguments)
        distiller.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        loss = distiller.compute_loss(x, y, student(x), training=False)
        totals.append(float(keras.ops.convert_to_numpy(loss)))
    return totals


# Tests that hold on every Keras backend carry the first marker and run
# again on the others; tests without it run on TensorFlow only. Within a
# module marked `all_backends`, a test that needs Keras on TensorFlow itself
# (tf.distribute, the TensorFlow training step) carries the second, and one
# that does not depend on the backend at all (files, fingerprints, the
# tuner's oracle) the third, so that it runs once. Tests that need
# processes, the command line end to end or the real MNIST carry the fourth,
# and run only with `--slow` (as `.ci/run` does): plain `pytest` is the fast
# suite.
ALL_BACKENDS = "all_backends"
TENSORFLOW_ONLY = "tensorflow_only"
BACKEND_INDEPENDENT = "backend_independent"
SLOW = "slow"


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the tests marked slow (processes, the command line end "
        "to end, the real MNIST), as .ci/run does",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", f"{ALL_BACKENDS}: holds on every Keras backend")
    config.addinivalue_line(
        "markers",
        f"{TENSORFLOW_ONLY}: needs Keras on TensorFlow (overrides {ALL_BACKENDS})",
    )
    config.addinivalue_line(
        "markers",
        f"{BACKEND_INDEPENDENT}: the same on every backend, so it runs once, "
        f"on TensorFlow (overrides {ALL_BACKENDS})",
    )
    config.addinivalue_line(
        "markers",
        f"{SLOW}: needs processes, the command line end to end or the real "
        "MNIST; runs with --slow",
    )


def _selected(item, config):
    if SLOW in item.keywords and not config.getoption("--slow"):
        return False
    if BACKEND == "tensorflow":
        return True
    return ALL_BACKENDS in item.keywords and not (
        TENSORFLOW_ONLY in item.keywords or BACKEND_INDEPENDENT in item.keywords
    )


def pytest_collection_modifyitems(config, items):
    kept = [item for item in items if _selected(item, config)]
    dropped = [item for item in items if not _selected(item, config)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
