import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import keras
import pytest

SHARED_MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
NUM_CLASSES = 4
FEATURES = 8


def tiny_mlp(units=16, seed=0, num_classes=NUM_CLASSES, activation=None,
             name=None):
    """A small logits classifier on FEATURES inputs, built and seeded."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(num_classes, activation=activation),
        ],
        name=name,
    )


def copy_of(model):
    """A new model with the same architecture and weights."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


class CountingLayer(keras.layers.Layer):
    """An identity layer that counts how many times it runs (in graphs too)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = self.add_weight(shape=(), initializer="zeros",
                                     trainable=False, name="calls")

    def call(self, inputs):
        self.calls.assign_add(1.0)
        return inputs


def counting_teacher(seed=1):
    """A tiny teacher whose `count()` says how many batches it has run on."""
    keras.utils.set_random_seed(seed)
    counter = CountingLayer()
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(16, activation="relu")(counter(inputs))
    model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(hidden))
    model.count = lambda: int(counter.calls.numpy())
    return model


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
