"""Multi-device and mixed-precision training."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kd_keras

# Logical devices must be set before TensorFlow starts, so this runs in a
# process of its own.
MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import kd_keras

    def models():
        keras.utils.set_random_seed(0)
        def mlp(units):
            return keras.Sequential([keras.Input((8,)),
                                     keras.layers.Dense(units, "relu"),
                                     keras.layers.Dense(4)])
        return mlp(32), mlp(8)

    class Subclassed(keras.Model):  # No input shape: adapters come late.
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(8, "relu")
            self.logits = keras.layers.Dense(4)

        def call(self, x):
            return self.logits(self.hidden(x))

    def hinted(teacher):
        keras.utils.set_random_seed(1)
        student = Subclassed()
        student(x[:1])
        hint = kd_keras.losses.FeatureHint(teacher.layers[0], student.hidden)
        return student, [kd_keras.losses.SoftTargets(), (hint, 0.5)]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.integers(0, 4, 64).astype("int32")
    results = {}
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for name, scope in (("one", tf.distribute.get_strategy()),
                        ("mirrored", strategy)):
        for features in (False, True):
            with scope.scope():
                teacher, student = models()
                losses = None
                if features:
                    student, losses = hinted(teacher)
                distiller = kd_keras.Distiller(
                    teacher, student, temperature=3.0, losses=losses)
                distiller.compile(keras.optimizers.SGD(0.1))
            # Outside the scope: late adapters use the Distiller's strategy.
            history = distiller.fit(x, y, batch_size=16, epochs=2,
                                    shuffle=False, verbose=0)
            results[name + ("_features" if features else "")] = {
                "replicas": scope.num_replicas_in_sync,
                "loss": history.history["loss"],
                "weights": [w.tolist() for w in student.get_weights()],
                "adapters": [type(v._value).__name__
                             for a in distiller.adapters for v in a.weights],
            }
    json.dump(results, sys.stdout)
""")


def test_mirrored_strategy_on_two_devices_matches_one_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for run in ("", "_features"):  # Plain KD; a hint with late adapters.
        mirrored, one = results["mirrored" + run], results["one" + run]
        assert mirrored["replicas"] == 2
        np.testing.assert_allclose(mirrored["loss"], one["loss"], rtol=1e-4)
        for a, b in zip(mirrored["weights"], one["weights"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert set(results["mirrored_features"]["adapters"]) == {"MirroredVariable"}


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.all_backends
def test_mixed_precision_training_keeps_the_loss_in_float32(
    tiny_mlp, reference, tiny_data, mixed_precision
):
    x, y = tiny_data
    teacher, student = tiny_mlp(32, seed=1), tiny_mlp(8, seed=2)
    assert student.layers[-1].compute_dtype == "float16"
    distiller = kd_keras.Distiller(teacher, student, temperature=20.0)
    distiller.compile("adam", metrics=["accuracy"])
    assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    t = teacher.predict(x, verbose=0).astype("float64")
    s = student.predict(x, verbose=0).astype("float64")
    logs = distiller.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    assert logs["distillation_loss"] == pytest.approx(
        reference.distillation_loss(t, s, 20.0), rel=1e-3
    )
