"""Multi-device and mixed-precision training."""

import json
import os
import socket
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


@pytest.mark.slow
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


# The models and data of the two scripts below (after their imports).
MODELS_AND_DATA = textwrap.dedent("""
    def mlp(units):
        return keras.Sequential([keras.Input((8,)),
                                 keras.layers.Dense(units, "relu"),
                                 keras.layers.Dense(4)])

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype("float32")
    y = rng.integers(0, 4, 128).astype("int32")
""")

# A worker of a MultiWorkerMirroredStrategy cluster on 127.0.0.1 (or, with
# no ports, the same training in one process): a Distiller on the fly, on
# cached logits in memory and on logits on disk.
MULTI_WORKER = (
    textwrap.dedent("""
    import json, os, sys
    index, ports, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if ports:
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
            "task": {"type": "worker", "index": index}})
    import numpy as np, tensorflow as tf, keras
    import kd_keras

    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if ports
                else tf.distribute.get_strategy())
""")
    + MODELS_AND_DATA
    + textwrap.dedent("""
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    keras.utils.set_random_seed(0)
    teacher = mlp(32)
    trains = {
        "on_the_fly": data,
        "cached": kd_keras.cache_teacher_logits(teacher, data, shuffle=False),
        "disk": kd_keras.cache_teacher_logits(
            teacher, data, shuffle=False, directory=f"{folder}/{index}"),
        # Shuffled, by default with a seed from the data, so the workers'
        # shuffles agree.
        "disk_shuffled": kd_keras.cache_teacher_logits(
            teacher, data, directory=f"{folder}/{index}", shuffle_buffer=64),
    }
    results = {"replicas": strategy.num_replicas_in_sync}
    for name, train in trains.items():
        # The examples this worker gets (their first value) in one epoch.
        seen = []
        for batch in strategy.experimental_distribute_dataset(train):
            x = batch[0]["inputs"] if isinstance(batch[0], dict) else batch[0]
            for part in strategy.experimental_local_results(x):
                seen += part.numpy()[:, 0].tolist()
        with strategy.scope():
            keras.utils.set_random_seed(1)
            student = mlp(8)
            distiller = kd_keras.Distiller(teacher, student, temperature=3.0)
            distiller.compile(keras.optimizers.SGD(0.1), metrics=["accuracy"])
        history = distiller.fit(train, epochs=2, verbose=0)
        results[name] = {
            "loss": history.history["loss"],
            "accuracy": history.history["accuracy"],
            "evaluate": distiller.evaluate(data, verbose=0, return_dict=True),
            "weights": [w.tolist() for w in student.get_weights()],
            "seen": seen,
        }
    print(json.dumps(results))
""")
)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_all(commands, timeout=240):
    """Runs the commands together; returns their JSON outputs."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    running = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for c in commands
    ]
    outputs = []
    try:
        for process in running:
            out, err = process.communicate(timeout=timeout)
            assert process.returncode == 0, err.decode()[-3000:]
            outputs.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for process in running:
            process.kill()
    return outputs


def _assert_same_training(runs, reference, names):
    for run in runs:
        for name in names:
            got, expected = run[name], reference[name]
            np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
            np.testing.assert_allclose(got["accuracy"], expected["accuracy"])
            for key, value in expected["evaluate"].items():
                assert got["evaluate"][key] == pytest.approx(value, rel=1e-5), key
            for a, b in zip(got["weights"], expected["weights"], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_multi_worker_strategy_on_two_processes_matches_one_process(tmp_path):
    ports = ",".join(map(str, _free_ports(2)))
    script = [sys.executable, "-c", MULTI_WORKER]
    *workers, single = _run_all(
        [
            [*script, "0", ports, str(tmp_path)],
            [*script, "1", ports, str(tmp_path)],
            [*script, "0", "", str(tmp_path / "single")],
        ]
    )
    assert [w["replicas"] for w in workers] == [2, 2] and single["replicas"] == 1
    _assert_same_training(workers, single, ("on_the_fly", "cached", "disk"))
    # Shuffled: the same split of the first pass (below), but the later
    # passes of a sharded pipeline need not reshuffle as the plain one does.
    for worker in workers:
        got, expected = worker["disk_shuffled"], single["disk_shuffled"]
        np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-2)
    names = ("on_the_fly", "cached", "disk", "disk_shuffled")
    for name in names:  # The workers split every batch between them.
        first, second = (w[name]["seen"] for w in workers)
        assert len(first) == len(second) == 64
        assert sorted(first + second) == sorted(single[name]["seen"])


# The same Distiller on JAX, on one CPU device and then under
# keras.distribution.DataParallel over two.
DATA_PARALLEL = (
    textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["KERAS_BACKEND"] = "jax"
    import numpy as np, keras
    import kd_keras
""")
    + MODELS_AND_DATA
    + textwrap.dedent("""
    results = {}
    for run in ("one", "data_parallel"):
        if run == "data_parallel":
            devices = keras.distribution.list_devices("cpu")
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=devices))
        keras.utils.set_random_seed(0)
        teacher = mlp(32)
        trains = {
            "on_the_fly": kd_keras.data.ArrayBatches(x, y, batch_size=32),
            "cached": kd_keras.cache_teacher_logits(
                teacher, (x, y), batch_size=32, shuffle=False),
            "disk": kd_keras.cache_teacher_logits(
                teacher, (x, y), batch_size=32, shuffle=False,
                directory=os.path.join(sys.argv[1], run)),
        }
        results[run] = {"devices": len(keras.distribution.list_devices("cpu"))}
        for name, train in trains.items():
            keras.utils.set_random_seed(1)
            student = mlp(8)
            distiller = kd_keras.Distiller(teacher, student, temperature=3.0)
            distiller.compile(keras.optimizers.SGD(0.1), metrics=["accuracy"])
            history = distiller.fit(train, epochs=2, verbose=0)
            results[run][name] = {
                "loss": history.history["loss"],
                "accuracy": history.history["accuracy"],
                "evaluate": distiller.evaluate(
                    x, y, batch_size=32, verbose=0, return_dict=True),
                "weights": [w.tolist() for w in student.get_weights()],
                "sharded_over": len(student.weights[0].value.sharding.device_set),
            }
    print(json.dumps(results))
""")
)


@pytest.mark.slow
def test_jax_data_parallel_on_two_devices_matches_one_device(tmp_path):
    (results,) = _run_all([[sys.executable, "-c", DATA_PARALLEL, str(tmp_path)]])
    one, parallel = results["one"], results["data_parallel"]
    assert parallel["devices"] == 2
    names = ("on_the_fly", "cached", "disk")
    assert [parallel[name]["sharded_over"] for name in names] == [2, 2, 2]
    _assert_same_training([parallel], one, names)


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
