"""One test per hook of `_keras_internals` and `_tfdata_internals`, each
named after it: a Keras, TensorFlow or tf.data upgrade that changes a
private API kd_keras relies on breaks the test that names it."""

import keras
import numpy as np
import pytest

from kd_keras import _keras_internals as internals

BACKEND = keras.backend.backend()
tensorflow_only = pytest.mark.tensorflow_only


def mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)]
    )


# Keras: tensors and layers.


@pytest.mark.all_backends
def test_keras_mask():
    embed = keras.layers.Embedding(5, 2, mask_zero=True)
    outputs = embed(np.array([[1, 2, 0]]))
    mask = keras.ops.convert_to_numpy(internals.keras_mask(outputs))
    np.testing.assert_array_equal(mask, [[True, True, False]])
    assert internals.keras_mask(keras.ops.ones((1, 3))) is None


@pytest.mark.all_backends
def test_in_stateless_scope():
    assert not internals.in_stateless_scope()
    with keras.StatelessScope():
        assert internals.in_stateless_scope()


@pytest.mark.all_backends
def test_reduce_weighted_values():
    values = np.array([[1.0, 2.0], [3.0, 4.0]], "float32")
    weights = np.array([[1.0, 0.0], [2.0, 1.0]], "float32")
    mask = np.array([[True, True], [True, False]])
    reduced = internals.reduce_weighted_values(
        values, weights, mask, "sum_over_batch_size", dtype="float32"
    )
    # Masked positions count neither in the sum nor in the divisor.
    expected = (1.0 * 1 + 2.0 * 0 + 3.0 * 2) / 3
    assert float(keras.ops.convert_to_numpy(reduced)) == pytest.approx(expected)


@pytest.mark.all_backends
def test_output_layer():
    model = mlp()
    assert internals.output_layer(model.outputs[0]) is model.layers[-1]
    assert internals.output_layer(keras.ops.ones((1,))) is None


@pytest.mark.all_backends
def test_child_layers():
    inner = mlp()
    outer = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1)])
    children = internals.child_layers(outer)
    assert inner in children and outer.layers[-1] in children
    assert inner.layers[0] not in children  # Not recursive.


@pytest.mark.all_backends
def test_all_layers():
    inner = mlp()
    outer = keras.Sequential([keras.Input((3,)), inner])
    layers = internals.all_layers(outer)
    assert outer in layers and inner in layers and inner.layers[0] in layers


class _Watch(keras.callbacks.Callback):
    """Records, mid-epoch, what the hooks say of the model's first weight,
    without syncing the state (through `callback_model`)."""

    def on_train_batch_end(self, batch, logs=None):
        model = internals.callback_model(self)
        self.held = internals.held_by_training_state(model.weights[0])
        self.synced = internals.jax_state_synced(model)


@pytest.mark.all_backends
def test_held_by_training_state():
    model = mlp()
    model.compile("sgd", "mse")
    assert not internals.held_by_training_state(model.weights[0])
    watch = _Watch()
    model.fit(
        np.ones((8, 3)), np.ones((8, 2)), batch_size=4, verbose=0, callbacks=[watch]
    )
    # Keras' JAX trainer keeps the weights in its training state mid-epoch.
    assert watch.held == (BACKEND == "jax")
    assert not internals.held_by_training_state(model.weights[0])


@pytest.mark.all_backends
def test_jax_state_synced():
    model = mlp()
    model.compile("sgd", "mse")
    assert internals.jax_state_synced(model)
    watch = _Watch()
    model.fit(
        np.ones((8, 3)), np.ones((8, 2)), batch_size=4, verbose=0, callbacks=[watch]
    )
    assert watch.synced == (BACKEND != "jax")


@pytest.mark.all_backends
def test_callback_model():
    model = mlp()
    callback = keras.callbacks.Callback()
    callback.set_model(model)
    assert internals.callback_model(callback) is model


# Keras: the trainer.


@pytest.mark.all_backends
def test_compute_loss():
    model = mlp()
    model.compile("sgd", "mse")
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    y_pred = model(x)
    loss = internals.compute_loss(
        model, x=x, y=y, y_pred=y_pred, sample_weight=None, training=False
    )
    expected = np.mean(keras.ops.convert_to_numpy(y_pred) ** 2)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.all_backends
def test_loss_tracker():
    model = mlp()
    model.compile("sgd", "mse")
    tracker = internals.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean) and tracker.name == "loss"


@pytest.mark.all_backends
def test_unbuilt_compiled_metrics():
    model = mlp()
    model.compile("sgd", "mse", metrics=["mae"])
    assert internals.unbuilt_compiled_metrics(model) in model.metrics
    model.evaluate(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    assert internals.unbuilt_compiled_metrics(model) is None


@pytest.mark.all_backends
def test_validation_during_fit():
    seen = []

    class Recording(keras.Sequential):
        def evaluate(self, *args, **kwargs):
            seen.append(internals.validation_during_fit(kwargs))
            return super().evaluate(*args, **kwargs)

    model = Recording([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.ones((8, 3)), np.ones((8, 2))
    model.fit(x, y, validation_data=(x, y), verbose=0)
    model.evaluate(x, y, verbose=0)
    assert seen == [True, False]


@tensorflow_only
def test_symbolic_build_from_first_replica():
    import tensorflow as tf

    calls = []

    class Model(internals.SymbolicBuildFromFirstReplica, keras.Sequential):
        def _build_from_first_replica(self, strategy):
            calls.append(strategy)
            return True

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = Model([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
    model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, verbose=0)
    # Keras asked the mixin, which built from the first replica's batch.
    assert calls and calls[0] is strategy


# TensorFlow: tf.distribute.


@tensorflow_only
@pytest.mark.slow
def test_in_multi_worker_mode():
    import subprocess
    import sys

    # A strategy of one worker, in a process of its own (it sets up
    # collective ops, which a test process must not keep).
    code = (
        "import tensorflow as tf\n"
        "from kd_keras import _keras_internals as internals\n"
        "one = tf.distribute.MultiWorkerMirroredStrategy()\n"
        "print(internals.in_multi_worker_mode(one),"
        " internals.in_multi_worker_mode(tf.distribute.get_strategy()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]


@tensorflow_only
def test_first_replica():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    values = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(context.replica_id_in_sync_group + 7)
    )
    first = internals.first_replica(strategy, {"a": values, "b": 1})
    assert int(first["a"]) == 7 and first["b"] == 1


# tf.data (TensorFlow installed, on any backend).


def _tf():
    import tensorflow as tf

    return tf


@pytest.mark.all_backends
def test_stage_inputs():
    from kd_keras import _tfdata_internals

    source = _tf().data.Dataset.range(4)
    mapped = source.map(lambda x: x + 1)
    assert _tfdata_internals.stage_inputs(mapped) == [source]
    assert _tfdata_internals.stage_inputs(source) == []


@pytest.mark.all_backends
def test_stage_kind():
    from kd_keras import _tfdata_internals

    data = _tf().data.Dataset.range(4)
    kinds = [
        _tfdata_internals.stage_kind(stage)
        for stage in (data.shuffle(2), data.cache(), data.repeat(2), data.take(1), data)
    ]
    assert kinds == ["shuffle", "cache", "repeat", "take", "other"]


@pytest.mark.all_backends
def test_stage_name():
    from kd_keras import _tfdata_internals

    named = _tf().data.Dataset.range(4).map(lambda x: x, name="mine")
    assert _tfdata_internals.stage_name(named) == "mine"


@pytest.mark.all_backends
def test_repeat_count():
    from kd_keras import _tfdata_internals

    data = _tf().data.Dataset.range(4)
    assert _tfdata_internals.repeat_count(data.repeat()) == -1
    assert _tfdata_internals.repeat_count(data.repeat(3)) == 3


@pytest.mark.all_backends
def test_runs_nondeterministically():
    from kd_keras import _tfdata_internals

    data = _tf().data.Dataset.range(4)
    loose = data.map(lambda x: x, num_parallel_calls=2, deterministic=False)
    strict = data.map(lambda x: x, num_parallel_calls=2)
    assert _tfdata_internals.runs_nondeterministically(loose)
    assert not _tfdata_internals.runs_nondeterministically(strict)


@pytest.mark.all_backends
def test_stage_graphs():
    from kd_keras import _tfdata_internals

    tf = _tf()
    mapped = tf.data.Dataset.range(4).map(
        lambda x: x + tf.random.uniform([], maxval=2, dtype=tf.int64)
    )
    ops = {
        node.op
        for graph in _tfdata_internals.stage_graphs(mapped)
        for node in graph.as_graph_def().node
    }
    assert "AddV2" in ops and any("Random" in op for op in ops)


@pytest.mark.all_backends
def test_few_download_retries():
    from tensorflow_datasets.core.download import downloader

    from kd_keras import _tfdata_internals

    default = downloader.MAX_RETRIES
    with _tfdata_internals.few_download_retries(2):
        assert downloader.MAX_RETRIES == 2
    assert downloader.MAX_RETRIES == default
