"""Faults injected into teacher logits on disk, the way disks, people and
second processes damage them. Each outcome is held to the teacher's own
logits: a fault is recovered (the damaged batches recomputed, with a
warning that names the file) or detected (an error that names the file,
the batch and the fix), and nothing wrong is ever served."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

from absl import logging
import numpy as np
import pytest
import tensorflow as tf

import kd_keras
from kd_keras import _logit_files
from kd_keras import _logit_writer
from kd_keras.distiller import INPUTS_KEY
from kd_keras.distiller import TEACHER_LOGITS_KEY

pytestmark = pytest.mark.backend_independent

BATCH = 16


def two_batches_a_shard(monkeypatch, dtype="float32"):
    """Small shards: two batches of 16 examples of 4 logits each."""
    width = 2 if dtype == "float16" else 4
    monkeypatch.setattr(_logit_writer, "SHARD_BYTES", 2 * BATCH * 4 * width)


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    two_batches_a_shard(monkeypatch)


@pytest.fixture
def setup(tiny_mlp, tiny_data, tmp_path):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    teacher.batches = 0
    predict = teacher.predict_on_batch

    def counting(inputs):
        teacher.batches += 1
        return predict(inputs)

    teacher.predict_on_batch = counting
    expected = np.asarray(teacher.predict(x, verbose=0))
    return x, y, teacher, expected, tmp_path


def pipeline(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def cache(teacher, data, directory, **options):
    options.setdefault("shuffle", False)
    return kd_keras.cache_teacher_logits(teacher, data, directory=directory, **options)


def folder_of(directory):
    (folder,) = pathlib.Path(directory).glob("data-*")
    return folder


def shards(directory):
    """The shard files of the folder's index, in order."""
    index = _logit_files.read_index(folder_of(directory))
    return [folder_of(directory) / shard["file"] for shard in index.shards]


def flip(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def served(dataset):
    """Inputs and logits of every batch served until the dataset ends or
    fails; the error, if any."""
    inputs, logits, error = [], [], None
    try:
        for batch, _ in dataset:
            inputs.append(batch[INPUTS_KEY].numpy())
            logits.append(batch[TEACHER_LOGITS_KEY].numpy())
    except tf.errors.OpError as raised:
        error = raised
    return inputs, logits, error


def assert_right(inputs, logits, x, expected, **tolerance):
    """Every served example carries its teacher's logits."""
    tolerance = tolerance or {"rtol": 1e-6, "atol": 1e-6}
    rows = {row.tobytes(): i for i, row in enumerate(x)}
    for batch_inputs, batch_logits in zip(inputs, logits, strict=True):
        for row, row_logits in zip(batch_inputs, batch_logits, strict=True):
            np.testing.assert_allclose(
                row_logits, expected[rows[row.tobytes()]], **tolerance
            )


def warnings_of(caplog):
    return " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@pytest.fixture
def caplog(caplog):
    logging.use_python_logging()
    caplog.set_level("WARNING")
    return caplog


# Bit flips.


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_flipped_byte_in_logits_is_recomputed_on_reuse(
    setup, caplog, monkeypatch, dtype
):
    two_batches_a_shard(monkeypatch, dtype)
    x, y, teacher, expected, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path, dtype=dtype)
    damaged = shards(tmp_path)[1]
    flip(damaged, 1, bit=6)
    again = cache(teacher, pipeline(x, y), tmp_path, dtype=dtype)
    assert teacher.batches == 4 + 1, "only the damaged batch ran again"
    assert str(damaged) in warnings_of(caplog) and "checksum" in warnings_of(caplog)
    inputs, logits, error = served(again)
    assert error is None and len(inputs) == 4
    tolerance = {"rtol": 1e-3, "atol": 1e-3} if dtype == "float16" else {}
    assert_right(inputs, logits, x, expected, **tolerance)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_flipped_byte_under_a_live_dataset_fails_the_read_naming_the_file(
    setup, monkeypatch, dtype
):
    two_batches_a_shard(monkeypatch, dtype)
    x, y, teacher, expected, tmp_path = setup
    live = cache(teacher, pipeline(x, y), tmp_path, dtype=dtype)
    damaged = shards(tmp_path)[1]
    flip(damaged, 3 * 4)
    inputs, logits, error = served(live)
    # Batches 1 and 2 are whole; batch 3 is the first of the damaged shard.
    assert len(inputs) == 2
    tolerance = {"rtol": 1e-3, "atol": 1e-3} if dtype == "float16" else {}
    assert_right(inputs, logits, x, expected, **tolerance)
    message = str(error)
    assert re.search(r"batch\W+3\b", message) and damaged.name in message
    assert "fail their checksum" in message and "cache_teacher_logits" in message


def test_a_flipped_top_k_class_id_is_caught_by_the_checksum(setup, caplog):
    x, y, teacher, expected, tmp_path = setup
    live = cache(teacher, pipeline(x, y), tmp_path, top_k=2)
    layout = _logit_files.read_index(folder_of(tmp_path)).layout
    _, offset = layout.record.fields["indices"]
    flip(shards(tmp_path)[0], layout.record.itemsize * 5 + offset, bit=7)
    inputs, _, error = served(live)
    assert inputs == [] and "fail their checksum" in str(error)
    cache(teacher, pipeline(x, y), tmp_path, top_k=2)
    assert teacher.batches == 4 + 1 and "checksum" in warnings_of(caplog)


def test_a_top_k_class_id_out_of_range_is_refused_by_a_bound_check(setup):
    x, y, teacher, _, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path, top_k=2)
    index = _logit_files.read_index(folder_of(tmp_path))
    records = _logit_files.numpy_records(folder_of(tmp_path), index).copy()
    records["indices"][3, 0] = 250
    with pytest.raises(ValueError, match="class ids beyond the 4 classes"):
        _logit_files.check_indices(records, index.layout, folder_of(tmp_path))


# The index.


def edit_index(directory, change):
    path = folder_of(directory) / _logit_files.INDEX
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize(
    "change, warned",
    [
        (lambda p: p.update(shape=[2, 2]), "checksum"),  # The same record size.
        (lambda p: p.update(dtype="float16"), "other settings"),
        (lambda p: p["shards"][0]["crc32"].__setitem__(1, 12345), "checksum"),
        (lambda p: p["shards"][0]["rows"].__setitem__(0, 15), "cut short"),
        # As if the data had changed: those batches run again.
        (lambda p: p["shards"][1]["digests"].reverse(), ""),
    ],
    ids=["shape", "dtype", "checksum", "rows", "digests"],
)
def test_index_fields_that_disagree_with_the_files_are_rebuilt(
    setup, caplog, change, warned
):
    x, y, teacher, expected, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path)
    edit_index(tmp_path, change)
    inputs, logits, error = served(cache(teacher, pipeline(x, y), tmp_path))
    assert error is None and len(inputs) == 4
    assert_right(inputs, logits, x, expected)
    assert teacher.batches > 4 and warned in warnings_of(caplog)


def test_shard_names_swapped_in_the_index_are_caught(setup, caplog):
    x, y, teacher, expected, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path)

    def swap(payload):
        first, second = payload["shards"]
        first["file"], second["file"] = second["file"], first["file"]

    edit_index(tmp_path, swap)
    inputs, logits, error = served(cache(teacher, pipeline(x, y), tmp_path))
    assert error is None
    assert_right(inputs, logits, x, expected)
    assert teacher.batches == 4 + 4 and "checksum" in warnings_of(caplog)


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 2, "shards": [',  # Cut short.
        "shards_not_a_list",
        "foreign_file",
        "fingerprint",
        "[]",
    ],
    ids=["truncated", "wrong_type", "foreign_file", "fingerprint", "not_an_object"],
)
def test_an_index_of_another_form_is_ignored_and_rebuilt(setup, caplog, text):
    x, y, teacher, expected, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path)
    path = folder_of(tmp_path) / _logit_files.INDEX
    payload = json.loads(path.read_text())
    first, kind = payload["shards"][0], text
    if text == "shards_not_a_list":  # Every other field as written.
        text = json.dumps({**payload, "shards": "many"})
    elif text == "foreign_file":
        text = json.dumps({**payload, "shards": [{**first, "file": "../../x.bin"}]})
    elif text == "fingerprint":
        first["fingerprints"][0] = "not hex"
        text = json.dumps(payload)
    path.write_text(text)
    inputs, logits, _ = served(cache(teacher, pipeline(x, y), tmp_path))
    assert_right(inputs, logits, x, expected)
    assert teacher.batches == 8 and "Ignoring the index" in warnings_of(caplog)
    if kind in ("shards_not_a_list", "foreign_file", "fingerprint"):
        assert re.search("another form|fingerprint=", warnings_of(caplog))


# Truncated, missing and replaced files.


@pytest.mark.parametrize("size", [0, 100], ids=["emptied", "cut"])
def test_a_truncated_shard_is_recomputed_on_reuse(setup, caplog, size):
    x, y, teacher, expected, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path)
    damaged = shards(tmp_path)[0]
    with open(damaged, "r+b") as f:
        f.truncate(size)
    inputs, logits, _ = served(cache(teacher, pipeline(x, y), tmp_path))
    assert_right(inputs, logits, x, expected)
    assert teacher.batches == 4 + 2 and str(damaged) in warnings_of(caplog)


def test_a_shard_truncated_under_a_live_dataset_fails_before_serving_it(setup):
    x, y, teacher, expected, tmp_path = setup
    live = cache(teacher, pipeline(x, y), tmp_path)
    damaged = shards(tmp_path)[1]
    with open(damaged, "r+b") as f:
        f.truncate(0)
    inputs, logits, error = served(live)
    assert len(inputs) == 2, "the first shard's batches, and nothing shifted"
    assert_right(inputs, logits, x, expected)
    assert damaged.name in str(error) and "cut short" in str(error)


def test_a_missing_shard_is_recomputed_on_reuse(setup):
    x, y, teacher, expected, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path)
    shards(tmp_path)[1].unlink()
    inputs, logits, _ = served(cache(teacher, pipeline(x, y), tmp_path))
    assert_right(inputs, logits, x, expected)
    assert teacher.batches == 4 + 2


def test_a_shard_copied_from_another_dataset_is_caught(setup, caplog):
    x, y, teacher, expected, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path / "a")
    other = x.copy()
    other[20:] += 1.0  # The same first batch: its own folder all the same.
    cache(teacher, pipeline(other, y), tmp_path / "b")
    shards(tmp_path / "b")[1].replace(shards(tmp_path / "a")[1])
    inputs, logits, _ = served(cache(teacher, pipeline(x, y), tmp_path / "a"))
    assert_right(inputs, logits, x, expected)
    assert "checksum" in warnings_of(caplog)


# Readers keep their files.


def test_a_reader_keeps_its_files_when_a_second_call_replaces_them(setup):
    x, y, teacher, expected, tmp_path = setup
    first = cache(teacher, pipeline(x, y), tmp_path)
    changed = x.copy()
    changed[40:] += 1.0  # Its first batch is the same: the same folder.
    second = cache(teacher, pipeline(changed, y), tmp_path)
    for data, dataset in ((x, first), (changed, second)):
        inputs, logits, error = served(dataset)
        assert error is None and len(inputs) == 4
        assert_right(inputs, logits, data, np.asarray(teacher.predict(data, verbose=0)))


def test_files_no_process_holds_go_with_the_next_call(setup):
    x, y, teacher, _, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path)
    old = set(shards(tmp_path))
    changed = x.copy()
    changed[40:] += 1.0
    cache(teacher, pipeline(changed, y), tmp_path)
    stale = old - set(shards(tmp_path))
    assert stale and all(path.exists() for path in stale), "held by this process"
    # This process ends: its lease goes to a dead process id.
    readers = folder_of(tmp_path) / _logit_writer.READERS
    (lease,) = readers.glob("*.json")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = lease.name.rsplit(".", 2)[0]
    lease.rename(readers / f"{host}.{dead.pid}.json")
    cache(teacher, pipeline(changed, y), tmp_path)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in shards(tmp_path))


def test_a_second_writer_with_other_data_leaves_the_first_its_files(setup):
    x, y, teacher, expected, tmp_path = setup
    changed = x.copy()
    changed[40:] += 1.0
    results = {}
    predict = teacher.predict_on_batch

    def interrupted(inputs):
        # While the first writer is on its third batch, a second one writes
        # other data into the same folder and finishes.
        if teacher.batches == 3 and "second" not in results:
            results["second"] = None
            results["second"] = cache(teacher, pipeline(changed, y), tmp_path)
        return predict(inputs)

    teacher.predict_on_batch = interrupted
    results["first"] = cache(teacher, pipeline(x, y), tmp_path)
    for data, name in ((x, "first"), (changed, "second")):
        inputs, logits, error = served(results[name])
        assert error is None and len(inputs) == 4
        assert_right(inputs, logits, data, np.asarray(teacher.predict(data, verbose=0)))


def test_repeated_batches_are_reused_without_a_warning(setup, caplog):
    x, y, teacher, _, tmp_path = setup
    twice = np.concatenate([x[:32], x[:32]])  # Two shards of the same batches.
    labels = np.concatenate([y[:32], y[:32]])
    cache(teacher, pipeline(twice, labels), tmp_path)
    (name,) = {path.name for path in shards(tmp_path)}
    inputs, logits, error = served(cache(teacher, pipeline(twice, labels), tmp_path))
    assert teacher.batches == 4 and warnings_of(caplog) == "" and error is None
    assert_right(inputs, logits, twice, np.asarray(teacher.predict(twice, verbose=0)))


def test_another_live_process_keeps_its_files(setup):
    x, y, teacher, _, tmp_path = setup
    cache(teacher, pipeline(x, y), tmp_path)
    old = set(shards(tmp_path))
    readers = folder_of(tmp_path) / _logit_writer.READERS
    (lease,) = readers.glob("*.json")
    host = lease.name.rsplit(".", 2)[0]
    # Process 1 lives as long as the machine: its lease holds the files.
    lease.rename(readers / f"{host}.1.json")
    changed = x.copy()
    changed[40:] += 1.0
    live = cache(teacher, pipeline(changed, y), tmp_path)
    stale = old - set(shards(tmp_path))
    assert stale and all(path.exists() for path in stale)
    assert served(live)[2] is None


def test_a_second_writer_of_the_same_batches_does_not_replace_their_files(setup):
    x, y, teacher, _, tmp_path = setup
    live = cache(teacher, pipeline(x, y), tmp_path)
    before = {path: path.stat().st_ino for path in shards(tmp_path)}
    index = folder_of(tmp_path) / _logit_files.INDEX
    index.unlink()  # As if a second writer began before the first ended.
    cache(teacher, pipeline(x, y), tmp_path)
    assert teacher.batches == 8
    assert {path: path.stat().st_ino for path in shards(tmp_path)} == before
    assert served(live)[2] is None


def test_arrays_read_their_logits_verified(setup):
    x, y, teacher, expected, tmp_path = setup
    cache(teacher, (x, y), tmp_path)
    folder = folder_of(tmp_path)
    index = _logit_files.read_index(folder)
    flip(folder / index.shards[0]["file"], 7)
    with pytest.raises(ValueError, match=r"batch 1 in .*fail their checksum.*Delete"):
        _logit_files.numpy_records(folder, index)


# A writer killed mid-write.

KILLED = textwrap.dedent("""
    import sys, time
    import numpy as np, tensorflow as tf, keras
    import kd_keras
    from kd_keras import _logit_writer
    _logit_writer.SHARD_BYTES = 2 * 16 * 4 * 4
    keras.utils.set_random_seed(1)
    teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, "relu"),
                                keras.layers.Dense(4)])
    teacher.load_weights(sys.argv[2])
    x = np.load(sys.argv[3])
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x), "int32"))).batch(16)
    predict, seen = teacher.predict_on_batch, []
    def slow(inputs):
        seen.append(1)
        if len(seen) == 4:  # Its second shard begun in a temporary file.
            print("fourth", flush=True)
            time.sleep(60)
        return predict(inputs)
    teacher.predict_on_batch = slow
    kd_keras.cache_teacher_logits(teacher, data, directory=sys.argv[1], shuffle=False)
""")


@pytest.mark.slow
def test_a_writer_killed_mid_write_resumes_and_its_files_go(setup):
    x, _, teacher, expected, tmp_path = setup
    weights = tmp_path / "teacher.weights.h5"
    teacher.save_weights(weights)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED,
            str(tmp_path / "c"),
            str(weights),
            str(tmp_path / "x.npy"),
        ],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert writer.stdout.readline().strip() == "fourth"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    folder = folder_of(tmp_path / "c")
    assert list(folder.glob("*.tmp")), "the killed writer left its shard behind"
    zeros = np.zeros(len(x), "int32")
    inputs, logits, error = served(cache(teacher, pipeline(x, zeros), tmp_path / "c"))
    assert error is None
    assert_right(inputs, logits, x, expected)
    assert teacher.batches == 2, "the finished shard was kept"
    assert not list(folder.glob("*.tmp"))
