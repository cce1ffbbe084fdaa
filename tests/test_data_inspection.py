"""A dataset is inspected once: one walk of a `tf.data` pipeline gives the
description every check reads, and the library reads no batch it does not
need. A spy counts the walks and the reads, so that this stays true."""

import collections

import numpy as np
import pytest

import kd_keras
from kd_keras import _datasets
from kd_keras import training

pytestmark = pytest.mark.all_backends


class Spy:
    """Counts, per dataset, the walks of its pipeline and the passes that
    start reading it (a first batch, or a whole pass)."""

    def __init__(self, monkeypatch):
        self.walks = collections.Counter()
        self.reads = collections.Counter()
        walk, read = _datasets._walk, _datasets.numpy_batches

        def counted_walk(dataset):
            self.walks[id(dataset)] += 1
            return walk(dataset)

        def counted_read(data):
            self.reads[id(data)] += 1
            return read(data)

        monkeypatch.setattr(_datasets, "_walk", counted_walk)
        monkeypatch.setattr(_datasets, "numpy_batches", counted_read)


@pytest.fixture
def pipelines(tiny_data):
    import tensorflow as tf

    x, y = tiny_data

    def make(rows):
        # A map, so that the walk has a function to inspect.
        return (
            tf.data.Dataset.from_tensor_slices((x[rows], y[rows]))
            .batch(16)
            .map(lambda a, b: (a * 1.0, b))
        )

    return make(slice(0, 48)), make(slice(48, 64))


@pytest.mark.parametrize("backup", [False, True], ids=["plain", "backup_dir"])
def test_distill_walks_each_pipeline_once_and_reads_one_first_batch(
    tiny_mlp, pipelines, monkeypatch, tmp_path, backup
):
    train, val = pipelines
    spy = Spy(monkeypatch)
    training.distill(
        tiny_mlp(32, seed=1),
        tiny_mlp(8, seed=2),
        train,
        val,
        epochs=2,
        verbose=0,
        backup_dir=tmp_path / "backup" if backup else None,
    )
    assert spy.walks[id(train)] == 1 and spy.walks[id(val)] == 1
    # The training data: one pass, which caches the teacher's logits (and
    # gives the backup's fingerprint); the validation data: its first batch.
    assert spy.reads[id(train)] == 1
    assert spy.reads[id(val)] == 1


def test_distill_without_caching_reads_the_training_data_once_for_a_backup(
    tiny_mlp, pipelines, monkeypatch, tmp_path
):
    train, val = pipelines
    spy = Spy(monkeypatch)
    training.distill(
        tiny_mlp(32, seed=1),
        tiny_mlp(8, seed=2),
        train,
        val,
        epochs=1,
        verbose=0,
        cache=False,
        backup_dir=tmp_path,
    )
    assert spy.walks[id(train)] == 1
    # The fingerprint's pass, then the first batch checked before training.
    assert spy.reads[id(train)] == 2


def test_disk_cache_walks_once_and_reads_the_first_batches_twice(
    tiny_mlp, pipelines, monkeypatch, tmp_path
):
    train, _ = pipelines
    spy = Spy(monkeypatch)
    kd_keras.cache_teacher_logits(tiny_mlp(32, seed=1), train, directory=tmp_path)
    assert spy.walks[id(train)] == 1
    # The pass that writes the logits, and the deliberate second read of the
    # first two batches that checks the pipeline is deterministic.
    assert spy.reads[id(train)] == 2


def test_a_description_is_kept_for_the_life_of_its_pipeline(pipelines):
    train, _ = pipelines
    first = _datasets.describe(train)
    assert _datasets.describe(train) is first
    assert first.kind == "tf.data" and first.cardinality == 3
    assert not (first.endless or first.cache or first.shuffle)
    assert first.random_ops == () and first.opaque_ops == ()


def test_a_description_keeps_no_pipeline_alive():
    import gc
    import weakref

    import tensorflow as tf

    # A source-only pipeline: its own source is itself.
    dataset = tf.data.Dataset.from_tensors((np.ones((4, 3)), np.zeros(4)))
    _datasets.describe(dataset)
    key, alive = id(dataset), weakref.ref(dataset)
    del dataset
    gc.collect()
    assert alive() is None
    assert key not in _datasets._DESCRIPTIONS


def test_the_caching_pass_gives_the_fingerprint_of_a_full_pass(
    tiny_mlp, pipelines, tiny_data
):
    from kd_keras import data
    from kd_keras import teachers

    train, _ = pipelines
    x, y = tiny_data
    for dataset in (train, data.ArrayBatches(x, y, batch_size=16, shuffle=True)):
        _, fingerprint = teachers.cache_and_fingerprint(tiny_mlp(32, seed=1), dataset)
        assert fingerprint == _datasets.fingerprint(dataset)


def test_the_fingerprint_of_files_follows_their_content(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "records")

    def write(values):
        with tf.io.TFRecordWriter(path) as writer:
            for value in values:
                writer.write(value)

    write([b"a", b"b"])
    records = tf.data.TFRecordDataset([path]).batch(2)
    first = _datasets.fingerprint(records)
    write([b"a", b"c"])  # The same pipeline object reads other content now.
    assert _datasets.fingerprint(records) != first


def test_the_fingerprint_of_strings_is_that_of_their_text():
    # Strings used to be hashed by where they sit in memory: the same text
    # in new objects gave another fingerprint, and so a backup or a stored
    # model trained on text data was never found again.
    from kd_keras import data

    def texts():
        return np.array([b"".join([b"to", b" be"]), b"".join([b"or", b" not"])], object)

    first = data.ArrayBatches(texts(), np.arange(2), batch_size=2)
    second = data.ArrayBatches(texts(), np.arange(2), batch_size=2)
    assert _datasets.fingerprint(first) == _datasets.fingerprint(second)
    other = np.array([b"to be", b"or NOT"], object)
    assert _datasets.fingerprint(
        data.ArrayBatches(other, np.arange(2), batch_size=2)
    ) != _datasets.fingerprint(first)
