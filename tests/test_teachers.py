import numpy as np
import pytest
import tensorflow as tf

import kd_keras
from kd_keras import data

pytestmark = pytest.mark.all_backends


def in_order(x, y, batch_size=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def test_cached_training_matches_on_the_fly_training(copy_of, tiny_mlp, tiny_data):
    x, y = tiny_data
    teacher, student = tiny_mlp(32, seed=1), tiny_mlp(8, seed=2)
    twin = copy_of(student)
    on_the_fly = kd_keras.Distiller(teacher, student, temperature=3.0)
    on_the_fly.compile("adam")
    cached = kd_keras.Distiller(teacher, twin, temperature=3.0)
    cached.compile("adam")
    history = on_the_fly.fit(in_order(x, y), epochs=3, verbose=0, shuffle=False)
    cached_history = cached.fit(
        kd_keras.cache_teacher_logits(teacher, in_order(x, y), shuffle=False),
        epochs=3,
        verbose=0,
        shuffle=False,
    )
    np.testing.assert_allclose(
        cached_history.history["loss"], history.history["loss"], rtol=1e-5
    )
    for a, b in zip(student.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_training_on_cached_logits_does_not_run_the_teacher(
    counting_teacher, tiny_mlp, tiny_data
):
    x, y = tiny_data
    teacher = counting_teacher()
    cached = kd_keras.cache_teacher_logits(teacher, in_order(x, y))
    after_caching = teacher.count()
    assert after_caching == len(x) // 16
    distiller = kd_keras.Distiller(teacher, tiny_mlp(8, seed=2))
    distiller.compile("sgd")
    distiller.fit(cached, validation_data=cached, epochs=2, verbose=0, shuffle=False)
    distiller.evaluate(cached, verbose=0)
    assert teacher.count() == after_caching


def test_cached_logits_belong_to_their_inputs_after_shuffling(tiny_mlp, tiny_data):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64).batch(10)
    cached = kd_keras.cache_teacher_logits(teacher, shuffled, seed=3)
    seen = 0
    for _epoch in range(2):
        for inputs, labels in cached:
            np.testing.assert_allclose(
                inputs["teacher_logits"],
                teacher.predict(inputs["inputs"], verbose=0),
                rtol=1e-5,
                atol=1e-6,
            )
            seen += len(labels)
    assert seen == 2 * len(x)


def test_cache_keeps_batch_size_labels_and_sample_weights(tiny_mlp, tiny_data):
    x, y = tiny_data
    weights = np.linspace(0, 1, len(x)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(16)
    cached = kd_keras.cache_teacher_logits(tiny_mlp(seed=1), dataset, shuffle=False)
    ((inputs, labels, sample_weight),) = cached.take(1).as_numpy_iterator()
    assert len(labels) == 16
    np.testing.assert_array_equal(labels, y[:16])
    np.testing.assert_allclose(sample_weight, weights[:16])
    np.testing.assert_allclose(inputs["inputs"], x[:16])
    assert int(cached.cardinality()) == len(x) // 16


def test_cache_accepts_arrays_in_batches_of_128_or_batch_size(tiny_mlp, tiny_data):
    x, y = tiny_data
    cached = kd_keras.cache_teacher_logits(tiny_mlp(seed=1), (x, y), batch_size=8)
    assert isinstance(cached, data.ArrayBatches)
    assert len(cached) == len(x) // 8
    # As `training.as_batches`: 128 by default, so the 64 rows are one batch.
    assert len(kd_keras.cache_teacher_logits(tiny_mlp(seed=1), (x, y))) == 1


def test_cache_refuses_a_randomly_augmented_dataset(tiny_mlp, tiny_data):
    x, y = tiny_data
    noisy = in_order(x, y).map(lambda a, b: (a + tf.random.normal(tf.shape(a)), b))
    with pytest.raises(ValueError, match="random or opaque ops.*on the fly"):
        kd_keras.cache_teacher_logits(tiny_mlp(seed=1), noisy)


def test_cache_refuses_jittered_images():
    (x, y), _ = data.sample()
    jittered = data.pipeline((x[:64], y[:64]), batch_size=32, max_shift=2)
    teacher = kd_keras.models.mlp((8,))
    with pytest.raises(ValueError, match="random or opaque ops"):
        kd_keras.cache_teacher_logits(teacher, jittered)
    cached = kd_keras.cache_teacher_logits(teacher, jittered, allow_random=True)
    assert int(cached.cardinality()) == 2


def test_cache_refuses_a_teacher_that_outputs_probabilities(tiny_mlp, tiny_data):
    with pytest.raises(ValueError, match="logits"):
        kd_keras.cache_teacher_logits(
            tiny_mlp(activation="softmax"), in_order(*tiny_data)
        )


def test_the_data_fingerprint_follows_content_not_order():
    from kd_keras import _datasets

    x = np.arange(40, dtype="float32").reshape(20, 2)
    y = np.arange(20) % 4

    def fingerprint(a, b, shuffle=False):
        dataset = tf.data.Dataset.from_tensor_slices((a, b))
        if shuffle:
            dataset = dataset.shuffle(20, seed=1)
        return _datasets.fingerprint(dataset.batch(6))

    same = fingerprint(x, y)
    assert fingerprint(x, y, shuffle=True) == same
    assert fingerprint(x, np.roll(y, 1)) != same  # labels re-paired
    nudged = x.copy()
    nudged[3, 1] += 1e-6
    assert fingerprint(nudged, y) != same


def test_fingerprints_of_opaque_and_augmented_pipelines_follow_the_inputs():
    import tensorflow as tf

    from kd_keras import _datasets

    x = np.random.default_rng(0).normal(size=(16, 2)).astype("float32")
    y = np.arange(16) % 4

    def opaque(scale):
        return (
            tf.data.Dataset.from_tensor_slices((x * scale, y))
            .batch(4)
            .map(lambda a, b: (tf.numpy_function(lambda v: v, [a], tf.float32), b))
        )

    assert _datasets.fingerprint(opaque(1)) != _datasets.fingerprint(opaque(100))
    (images, labels), _ = data.sample()

    def jittered(rows):
        return data.pipeline((images[rows], labels[rows]), batch_size=100, max_shift=2)

    same = _datasets.fingerprint(jittered(slice(0, 300)))
    assert _datasets.fingerprint(jittered(slice(0, 300))) == same
    shifted = np.roll(np.arange(300), 1)  # Same labels, other images.
    other = data.pipeline(
        (images[:300][shifted], labels[:300]), batch_size=100, max_shift=2
    )
    assert _datasets.fingerprint(other) != same
