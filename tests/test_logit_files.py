"""Teacher logits cached on disk: pairing, float16, top k, reuse, resumption
and bounded memory."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import kd_keras
from kd_keras import _datasets
from kd_keras import _logit_files
from kd_keras import _logit_writer
from kd_keras.distiller import TEACHER_LOGITS_KEY


def in_order(x, y, batch_size=16):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def counted(teacher):
    """Counts the batches the teacher runs on (in `teacher.batches`)."""
    predict = teacher.predict_on_batch
    teacher.batches = 0

    def counting(x):
        teacher.batches += 1
        return predict(x)

    teacher.predict_on_batch = counting
    return teacher


def collect(cached):
    """Inputs, labels and logits of one pass, concatenated."""
    parts = [
        (inputs["inputs"].numpy(), labels.numpy(), inputs[TEACHER_LOGITS_KEY].numpy())
        for inputs, labels in cached
    ]
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def folder_of(directory):
    """The folder `cache_teacher_logits` keeps a dataset's logits in (the
    only one in `directory`)."""
    (folder,) = pathlib.Path(directory).glob("data-*")
    return folder


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.all_backends
def test_disk_cache_pairs_every_example_with_its_teacher_logits(
    tiny_mlp, tiny_data, tmp_path
):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    expected = np.asarray(teacher.predict(x, verbose=0))
    cached = kd_keras.cache_teacher_logits(
        teacher, in_order(x, y), directory=tmp_path / "a", shuffle=False
    )
    inputs, labels, logits = collect(cached)
    np.testing.assert_array_equal(inputs, x)
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    # Shuffled after the pairing (by blocks where the batches have one size,
    # else example by example), batched at another size: every example still
    # carries its own logits, and batches mix the input's batches.
    uneven = in_order(x[:32], y[:32]).concatenate(in_order(x[32:], y[32:], 10))
    larger_last = in_order(x[:32], y[:32]).concatenate(in_order(x[32:], y[32:], 32))
    for name, batches in (
        ("even", in_order(x, y)),
        ("uneven", uneven),
        ("larger_last", larger_last),
    ):
        for batch_size in (16, 10):
            shuffled = kd_keras.cache_teacher_logits(
                teacher, batches, directory=tmp_path / name, batch_size=batch_size
            )
            orders = []
            for _epoch in range(2):
                inputs, labels, logits = collect(shuffled)
                rows = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in inputs]
                assert sorted(rows) == list(range(len(x)))
                np.testing.assert_allclose(logits, expected[rows], rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(labels, y[rows])
                orders.append(rows)
            assert orders[0] != orders[1], "reshuffled every epoch"
            assert len(shuffled) == -(-len(x) // batch_size)
            assert len({row // 16 for row in orders[0][:batch_size]}) > 1
    # Arrays give ArrayBatches (any backend) with the same logits.
    batches = kd_keras.cache_teacher_logits(
        teacher, (x, y), directory=tmp_path / "b", shuffle=False, batch_size=16
    )
    served = np.concatenate(
        [batches[i][0][TEACHER_LOGITS_KEY] for i in range(len(batches))]
    )
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.all_backends
def test_float16_halves_the_files_and_rounds_the_logits(tiny_mlp, tiny_data, tmp_path):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    expected = np.asarray(teacher.predict(x, verbose=0))
    sizes = {}
    for dtype in ("float32", "float16"):
        folder = tmp_path / dtype
        cached = kd_keras.cache_teacher_logits(
            teacher, (x, y), directory=folder, dtype=dtype, shuffle=False
        )
        logits = cached[0][0][TEACHER_LOGITS_KEY]
        assert logits.dtype == np.float32
        # predict and predict_on_batch may differ in float32's last bit.
        np.testing.assert_allclose(
            logits,
            expected.astype(dtype).astype("float32"),
            rtol=1e-3 if dtype == "float16" else 1e-6,
            atol=1e-6,
        )
        np.testing.assert_array_equal(logits, logits.astype(dtype).astype("float32"))
        sizes[dtype] = sum(p.stat().st_size for p in folder.glob("*/*.bin"))
    assert sizes["float32"] == len(x) * 4 * 4
    assert sizes["float16"] * 2 == sizes["float32"]


def test_top_k_keeps_the_k_probabilities_and_the_rest_s_mass(tmp_path):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(50, 7)) * 3).astype("float32")
    layout = _logit_files.Layout((7,), "float32", top_k=3)
    rebuilt = _logit_files.decode(_logit_files.encode(logits, layout), layout)
    # NumPy reference: the 3 largest kept; the other 4 share the rest of the
    # probability at T = 1 equally.
    p = softmax(logits.astype("float64"))
    top = np.argsort(-logits, axis=1)[:, :3]
    kept = np.zeros_like(p, bool)
    np.put_along_axis(kept, top, True, axis=1)
    reference = np.where(kept, p, ((1 - (p * kept).sum(1)) / 4)[:, None])
    np.testing.assert_allclose(softmax(rebuilt.astype("float64")), reference, atol=1e-6)
    np.testing.assert_array_equal(rebuilt[kept], logits[kept])
    # TensorFlow decodes the raw records as NumPy does, whatever the class
    # ids' type (one byte up to 256 classes, two up to 65,536, then four).
    for classes in (7, 300, 70_000):
        logits = (rng.normal(size=(3, classes)) * 3).astype("float32")
        layout = _logit_files.Layout((classes,), "float16", top_k=3)
        records = _logit_files.encode(logits, layout)
        rebuilt = _logit_files.decode(records, layout)
        assert rebuilt.argmax(-1).tolist() == logits.argmax(-1).tolist()
        raw = tf.constant([r.tobytes() for r in records])
        np.testing.assert_allclose(
            _logit_files.decode_tf(raw, layout).numpy(), rebuilt, rtol=1e-6
        )
    # A teacher so sure that nothing is left: the rest stays finite, below
    # the k kept logits.
    sure = np.array([[80.0, 0.0, -5.0, -9.0]], "float32")
    layout = _logit_files.Layout((4,), "float32", top_k=1)
    rebuilt = _logit_files.decode(_logit_files.encode(sure, layout), layout)
    assert np.isfinite(rebuilt).all() and rebuilt[0, 0] == 80.0
    assert (rebuilt[0, 1:] < 80.0).all()


def test_top_k_cache_trains_a_distiller_with_the_rebuilt_logits(
    tiny_mlp, tiny_data, tmp_path
):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    cached = kd_keras.cache_teacher_logits(
        teacher, in_order(x, y), directory=tmp_path, top_k=2, shuffle=False
    )
    _, _, logits = collect(cached)
    layout = _logit_files.Layout((4,), "float32", top_k=2)
    full = np.asarray(teacher.predict(x, verbose=0))
    np.testing.assert_allclose(
        logits,
        _logit_files.decode(_logit_files.encode(full, layout), layout),
        rtol=1e-5,
        atol=1e-6,
    )
    distiller = kd_keras.Distiller(teacher, tiny_mlp(8, seed=2))
    distiller.compile("adam")
    before = distiller.evaluate(cached, verbose=0, return_dict=True)
    distiller.fit(cached, epochs=3, verbose=0)
    after = distiller.evaluate(cached, verbose=0, return_dict=True)
    assert after["distillation_loss"] < before["distillation_loss"]


def test_a_second_call_reuses_the_files_until_weights_or_data_change(
    tiny_mlp, tiny_data, tmp_path
):
    x, y = tiny_data
    teacher = counted(tiny_mlp(32, seed=1))
    first = collect(
        kd_keras.cache_teacher_logits(
            teacher, in_order(x, y), directory=tmp_path, shuffle=False
        )
    )
    assert teacher.batches == 4
    again = collect(
        kd_keras.cache_teacher_logits(
            teacher, in_order(x, y), directory=tmp_path, shuffle=False
        )
    )
    assert teacher.batches == 4, "reused: the teacher did not run"
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # One changed example: only its batch is recomputed.
    changed = x.copy()
    changed[20] += 1.0
    pipeline = kd_keras.cache_teacher_logits(
        teacher, in_order(changed, y), directory=tmp_path, shuffle=False
    )
    assert teacher.batches == 5
    index = _logit_files.read_index(folder_of(tmp_path))
    listed = {batch.file for batch in index.batches}
    files = {p.name for p in folder_of(tmp_path).glob("*.bin")}
    # The replaced file stays while this process, which read it, lives.
    assert files > listed and len(files - listed) == 1
    index_file = folder_of(tmp_path) / _logit_files.INDEX
    written = index_file.stat().st_mtime_ns
    # Another teacher (weights changed), or other settings (float16): every
    # batch, in a folder of their own.
    bias = teacher.layers[-1].bias.numpy()
    teacher.layers[-1].bias.assign(bias + 1.0)
    recomputed = collect(
        kd_keras.cache_teacher_logits(
            teacher, in_order(changed, y), directory=tmp_path, shuffle=False
        )
    )
    assert teacher.batches == 9
    np.testing.assert_allclose(
        recomputed[2], np.asarray(teacher.predict(changed, verbose=0)), rtol=1e-6
    )
    kd_keras.cache_teacher_logits(
        teacher, in_order(changed, y), directory=tmp_path, dtype="float16"
    )
    assert teacher.batches == 13
    assert len(list(tmp_path.glob("data-*"))) == 3
    # The first teacher's pipeline still reads its files, and its cache is
    # reused as it is: the index is not even rewritten (a read-only copy
    # would do).
    assert collect(pipeline)[0].shape == x.shape
    teacher.layers[-1].bias.assign(bias)
    kd_keras.cache_teacher_logits(
        teacher, in_order(changed, y), directory=tmp_path, shuffle=False
    )
    assert teacher.batches == 13
    assert index_file.stat().st_mtime_ns == written


def test_an_interrupted_write_resumes_where_it_stopped(
    tiny_mlp, tiny_data, tmp_path, monkeypatch
):
    x, y = tiny_data
    monkeypatch.setattr(_logit_writer, "SHARD_BYTES", 2 * 16 * 4 * 4)  # 2 batches.
    teacher = counted(tiny_mlp(32, seed=1))
    predict = teacher.predict_on_batch

    def stops_on_the_fourth_batch(inputs):
        if teacher.batches == 3:
            raise KeyboardInterrupt
        return predict(inputs)

    teacher.predict_on_batch = stops_on_the_fourth_batch
    with pytest.raises(KeyboardInterrupt):
        kd_keras.cache_teacher_logits(
            teacher, in_order(x, y), directory=tmp_path, shuffle=False
        )
    index = _logit_files.read_index(folder_of(tmp_path))
    assert not index.complete and index.examples == 32  # One shard kept.
    teacher.predict_on_batch = predict
    resumed = collect(
        kd_keras.cache_teacher_logits(
            teacher, in_order(x, y), directory=tmp_path, shuffle=False
        )
    )
    assert teacher.batches == 3 + 2, "the first shard's two batches were reused"
    np.testing.assert_array_equal(resumed[2], np.asarray(teacher.predict(x, verbose=0)))
    assert _logit_files.read_index(folder_of(tmp_path)).complete
    assert not list(folder_of(tmp_path).glob("*.tmp"))


def test_an_interrupted_reuse_keeps_the_finished_cache_untouched(
    tiny_mlp, tiny_data, tmp_path, monkeypatch
):
    x, y = tiny_data
    monkeypatch.setattr(_logit_writer, "SHARD_BYTES", 2 * 16 * 4 * 4)  # 2 batches.
    teacher = counted(tiny_mlp(32, seed=1))
    kd_keras.cache_teacher_logits(teacher, in_order(x, y), directory=tmp_path)
    files = {p: p.stat().st_ino for p in folder_of(tmp_path).glob("*.bin")}
    index = _logit_files.read_index(folder_of(tmp_path))
    digest = _logit_writer._batch_digest
    calls = []

    def stops_on_the_fourth_batch(*batch):
        calls.append(1)
        if len(calls) == 2 + 4:  # Two batches replayed, then the pass.
            raise KeyboardInterrupt
        return digest(*batch)

    monkeypatch.setattr(_logit_writer, "_batch_digest", stops_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        kd_keras.cache_teacher_logits(teacher, in_order(x, y), directory=tmp_path)
    monkeypatch.setattr(_logit_writer, "_batch_digest", digest)
    assert _logit_files.read_index(folder_of(tmp_path)).payload == index.payload
    copies = []
    records = _logit_writer._Previous.records
    monkeypatch.setattr(
        _logit_writer._Previous,
        "records",
        lambda self, position: copies.append(position) or records(self, position),
    )
    kd_keras.cache_teacher_logits(teacher, in_order(x, y), directory=tmp_path)
    assert teacher.batches == 4, "the teacher ran once, on the first call only"
    assert copies == [], "kept shards are verified, never copied"
    # Reuse rewrites nothing: the same files (inodes).
    assert {p: p.stat().st_ino for p in folder_of(tmp_path).glob("*.bin")} == files


def test_datasets_sharing_a_directory_keep_their_own_logits(
    tiny_mlp, tiny_data, tmp_path
):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    train = kd_keras.cache_teacher_logits(
        teacher, in_order(x[:48], y[:48]), directory=tmp_path, shuffle=False
    )
    validation = kd_keras.cache_teacher_logits(
        teacher, in_order(x[48:], y[48:]), directory=tmp_path, shuffle=False
    )
    expected = np.asarray(teacher.predict(x, verbose=0))
    np.testing.assert_allclose(collect(train)[2], expected[:48], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        collect(validation)[2], expected[48:], rtol=1e-5, atol=1e-6
    )
    assert len(list(tmp_path.glob("data-*"))) == 2
    # Empty data is refused before anything is touched.
    files = sorted(tmp_path.glob("*/*"))
    with pytest.raises(ValueError, match="empty"):
        kd_keras.cache_teacher_logits(
            teacher, in_order(x[:0], y[:0]), directory=tmp_path
        )
    assert sorted(tmp_path.glob("*/*")) == files


def test_a_disk_cache_is_no_augmentation_to_kd_keras_own_checks(
    tiny_mlp, tiny_data, tmp_path
):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    cached = kd_keras.cache_teacher_logits(teacher, in_order(x, y), directory=tmp_path)
    # Its shuffle draws at random, but only reorders: not an augmentation,
    # and its fingerprint is that of its content (it used to never return).
    assert _datasets.augmentation_ops(cached) == []
    assert _datasets.fingerprint(cached) == _datasets.fingerprint(cached)
    inputs = kd_keras.teachers.without_teacher_logits(cached)
    assert kd_keras.teachers.is_cached(kd_keras.cache_teacher_logits(teacher, inputs))


def test_batch_digests_read_strings_by_their_text():
    texts = np.array(["a cat", "a dog"], dtype=object)
    same = np.array(["".join(["a ", w]) for w in ("cat", "dog")], dtype=object)
    assert same[0] is not texts[0]
    other = np.array(["a cat", "a cow"], dtype=object)
    assert _logit_writer._batch_digest(
        texts, None, None
    ) == _logit_writer._batch_digest(same, None, None)
    assert _logit_writer._batch_digest(
        texts, None, None
    ) != _logit_writer._batch_digest(other, None, None)


def test_disk_cache_refuses_what_it_cannot_pair(tiny_mlp, tiny_data, tmp_path):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(ValueError, match="shuffles.*remove the shuffle"):
        kd_keras.cache_teacher_logits(
            teacher, data.shuffle(64).batch(16), directory=tmp_path
        )
    loose = data.batch(16).map(
        lambda a, b: (a, b), num_parallel_calls=2, deterministic=False
    )
    with pytest.raises(ValueError, match="deterministic=True"):
        kd_keras.cache_teacher_logits(teacher, loose, directory=tmp_path)
    options = tf.data.Options()
    options.deterministic = False
    with pytest.raises(ValueError, match="Options.deterministic"):
        kd_keras.cache_teacher_logits(
            teacher, data.batch(16).with_options(options), directory=tmp_path
        )

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return x, y

    with pytest.raises(ValueError, match="tf.data.Dataset.*arrays"):
        kd_keras.cache_teacher_logits(teacher, Batches(), directory=tmp_path)
    with pytest.raises(ValueError, match="below the number of classes"):
        kd_keras.cache_teacher_logits(teacher, (x, y), directory=tmp_path, top_k=4)
    with pytest.raises(ValueError, match="dtype"):
        kd_keras.cache_teacher_logits(teacher, (x, y), directory=tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="`top_k`.*Pass `directory=`"):
        kd_keras.cache_teacher_logits(teacher, (x, y), top_k=2)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        kd_keras.cache_teacher_logits(
            teacher, (x, y), directory=tmp_path, shuffle_buffer=0
        )
    with pytest.raises(ValueError, match="shuffle=False"):
        kd_keras.cache_teacher_logits(
            teacher, (x, y), directory=tmp_path, shuffle=False, shuffle_buffer=64
        )
    # Reordered on every pass, though no stage says so: caught by reading the
    # first batches twice.
    halves = [data.take(32), data.skip(32)]
    mixed = tf.data.Dataset.sample_from_datasets(
        halves, rerandomize_each_iteration=True
    ).batch(16)
    with pytest.raises(ValueError, match="differ from one pass to the next"):
        kd_keras.cache_teacher_logits(teacher, mixed, directory=tmp_path)
    with pytest.raises(ValueError, match="endless.*take"):
        kd_keras.cache_teacher_logits(
            teacher, data.batch(16).repeat(), directory=tmp_path
        )
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        kd_keras.cache_teacher_logits(teacher, (x, y), directory=tmp_path / "file")
    assert not list(tmp_path.glob("data-*")), "nothing was written"


def test_endless_data_is_refused_in_memory_too(tiny_mlp, tiny_data):
    x, y = tiny_data
    endless = in_order(x, y).repeat()
    filtered = endless.filter(lambda a, b: True)  # Of unknown cardinality.
    for data in (endless, filtered):
        with pytest.raises(ValueError, match="endless.*take"):
            kd_keras.cache_teacher_logits(tiny_mlp(32, seed=1), data)
    assert kd_keras.cache_teacher_logits(tiny_mlp(32, seed=1), filtered.take(2))


def test_an_input_that_grew_since_the_caching_fails_rather_than_mispairs(
    tiny_mlp, tiny_data, tmp_path
):
    x, y = tiny_data
    lines = tmp_path / "examples.csv"
    lines.write_text("".join(",".join(map(str, row)) + "\n" for row in x))

    def parse(line):
        return tf.strings.to_number(tf.strings.split(line, ",")), 0

    data = tf.data.TextLineDataset(str(lines)).map(parse).batch(16)
    cached = kd_keras.cache_teacher_logits(
        tiny_mlp(32, seed=1), data, directory=tmp_path / "logits", shuffle=False
    )
    assert len(collect(cached)[0]) == len(x)
    with lines.open("a") as more:
        more.write(",".join(["0.5"] * 8) + "\n")
    with pytest.raises(tf.errors.OpError, match="expected to contain 4 elements"):
        collect(cached)


def test_example_sizes_count_strings_by_their_length():
    texts = np.array(["x" * 100, "y" * 300], dtype=object)
    assert _logit_writer._example_bytes(texts, np.zeros(2, "int32"), None) == 200 + 4


def test_float16_refuses_logits_beyond_its_range(tiny_data, tmp_path):
    x, y = tiny_data
    keras.utils.set_random_seed(0)
    loud = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4), keras.layers.Rescaling(1e5)]
    )
    with pytest.raises(ValueError, match="float16.*65504.*float32"):
        kd_keras.cache_teacher_logits(loud, (x, y), directory=tmp_path, dtype="float16")
    kd_keras.cache_teacher_logits(loud, (x, y), directory=tmp_path)


def test_writers_sharing_a_folder_leave_each_other_s_files(
    tiny_mlp, tiny_data, tmp_path, monkeypatch
):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    kd_keras.cache_teacher_logits(teacher, (x, y), directory=tmp_path)
    tmp_path = folder_of(tmp_path)
    # Another host, and a live process of this one, are writing in the same
    # folder; a killed process of this host (its name holds dots) left its
    # file behind.
    host = "node1.cluster.local"
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    others = [
        tmp_path / "logits.otherhost.lan.123.0123abcd.tmp",
        tmp_path / f"logits.{host}.{os.getppid()}.0123abcd.tmp",
    ]
    abandoned = tmp_path / f"logits.{host}.{dead_pid.pid}.0123abcd.tmp"
    others.append(tmp_path / "logits.backup.tmp")  # Not ours: left alone.
    for path in (*others, abandoned):
        path.write_bytes(b"half a shard")
    kd_keras.cache_teacher_logits(teacher, (x, y), directory=tmp_path.parent)
    assert all(path.read_bytes() == b"half a shard" for path in others)
    assert sorted(tmp_path.glob("*.tmp")) == sorted(others)


# Runs in a process of its own, so that its peak memory is its own.
MEMORY = textwrap.dedent("""
    import json, resource, sys
    import keras, tensorflow as tf
    import kd_keras

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    count, directory = int(sys.argv[1]), sys.argv[2] or None
    data = kd_keras.data.synthetic(count, batch_size=500)
    keras.utils.set_random_seed(0)
    def mlp(units):
        return keras.Sequential([keras.Input((784,)),
                                 keras.layers.Dense(units, "relu"),
                                 keras.layers.Dense(10)])
    teacher, student = mlp(64), mlp(8)
    distiller = kd_keras.Distiller(teacher, student)
    distiller.compile("sgd")
    before = rss()
    cached = kd_keras.cache_teacher_logits(
        teacher, data, directory=directory, shuffle_buffer=2000)
    distiller.fit(cached, epochs=1, verbose=0)
    # VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss
    # across fork and exec (the whole test session's), not into VmHWM.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f
                    if line.startswith("VmHWM:"))
    json.dump({"raise": peak - before, "before": before, "peak": peak,
               "cached": type(cached).__name__}, sys.stdout)
""")


@pytest.mark.slow
def test_disk_cache_memory_stays_bounded_whatever_the_data_size(tmp_path):
    def raised(count, directory):
        run = subprocess.run(
            [sys.executable, "-c", MEMORY, str(count), str(directory)],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        return json.loads(run.stdout)

    # Peak memory over the process's start, for 8 times the data: the
    # runtime's own ~110 MB (threads, graphs) cancel in the difference,
    # which must stay far below the inputs' growth (a fixed bound on one
    # size failed by 0.2 MB on a quieter machine).
    count, small = 160_000, 20_000  # 502 MB and 63 MB of float32 inputs.
    measured = raised(count, tmp_path)
    few = raised(small, tmp_path / "small")
    inputs = count * 784 * 4
    grown = measured["raise"] - few["raise"]
    assert grown < (inputs - small * 784 * 4) / 10, (measured, few)
    assert measured["raise"] < inputs / 2, measured
    # Another process reuses the files: the same teacher (same seed) does
    # not run.
    keras.utils.set_random_seed(0)
    teacher = counted(
        keras.Sequential(
            [
                keras.Input((784,)),
                keras.layers.Dense(64, "relu"),
                keras.layers.Dense(10),
            ]
        )
    )
    data = kd_keras.data.synthetic(count, batch_size=500)
    kd_keras.cache_teacher_logits(teacher, data, directory=tmp_path)
    assert teacher.batches == 0
    assert _logit_files.read_index(folder_of(tmp_path)).examples == count
