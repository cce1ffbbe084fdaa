"""Teacher logits stored on disk, for data that do not fit in memory.

Each dataset and setting has a folder in the user's directory,
`data-<first batch digest>-<settings digest>`, holding an index,
`kd_keras_logits.json`, and shards, `logits-<hash>.bin`: raw little-endian
records, one per example, in the order the input pipeline yields its
examples. The inputs are not stored; every epoch re-reads the pipeline and
pairs it with the records.

The index records the teacher (a fingerprint of its architecture and
weights), the record layout, and for every shard the digests of the input
batches its logits were computed from. Writing goes shard by shard, and the
index is rewritten after each new one, so a call that finds an index reuses
every batch whose position and digest are unchanged and runs the teacher
only on the others: that is how a second call reuses a finished cache, and
how an interrupted write resumes.

A record holds the logits (float32 or float16) or, with `top_k`, the k
largest logits, their class ids and one fill value for the other classes.
"""

import dataclasses
import hashlib
import itertools
import os
import pathlib
import socket

from absl import logging
import keras
import numpy as np

from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _fingerprints
from kd_keras import _io

INDEX = "kd_keras_logits.json"
VERSION = 1
DTYPES = ("float32", "float16")
# A shard holds about this many bytes of records: the unit of resumption.
SHARD_BYTES = 64 << 20
# The default shuffle buffer holds about this many bytes of examples.
SHUFFLE_BYTES = 32 << 20
_FLOAT16_MAX = float(np.finfo("float16").max)
# Below this, the rest of the probability mass counts as zero.
_TINY_MASS = 1e-30


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a record holds, for logits of per-example `shape`."""

    shape: tuple
    dtype: str = "float32"
    top_k: int = None

    @property
    def classes(self):
        return self.shape[-1]

    @property
    def record(self):
        """The record as a packed NumPy structured dtype."""
        value = "<f2" if self.dtype == "float16" else "<f4"
        if self.top_k is None:
            return np.dtype([("values", value, self.shape)])
        kept = (*self.shape[:-1], self.top_k)
        # The smallest integer that holds every class id (and that
        # TensorFlow decodes).
        index = next(
            t for t in ("u1", "<u2", "<i4") if self.classes <= np.iinfo(t).max + 1
        )
        return np.dtype(
            [
                ("values", value, kept),
                ("indices", index, kept),
                ("fill", "<f4", self.shape[:-1]),
            ]
        )


def check_arguments(dtype, top_k):
    if dtype not in DTYPES:
        raise ValueError(
            f"Expected `dtype` in {DTYPES}. Received: dtype={dtype!r}. float16 "
            "halves the files; top_k shrinks them further."
        )
    if top_k is not None:
        _checks.check_positive_int(top_k, "top_k")


def check_top_k(top_k, classes):
    if top_k is not None and top_k >= classes:
        raise ValueError(
            f"`top_k` must be below the number of classes: the teacher gives "
            f"{classes} logits per example, and top_k={top_k} would keep them "
            "all. Pass a smaller top_k, or top_k=None to store every logit."
        )


def check_deterministic(dataset):
    """Raises unless re-reading the pipeline yields the same examples in
    the same order, as pairing with stored logits needs."""
    description = _datasets.describe(dataset)
    if description.shuffle:
        raise ValueError(
            "The dataset shuffles (a `.shuffle()`, or `list_files`, which "
            "shuffles by default), so re-reading it would pair examples "
            "with the logits of others. Logits on disk are paired with "
            "the dataset every epoch: remove the shuffle (use "
            "`list_files(..., shuffle=False)`) and let "
            "`cache_teacher_logits(..., shuffle=True)` shuffle after the "
            "pairing, with a buffer of `shuffle_buffer` examples."
        )
    for stage in description.nondeterministic:
        where = (
            "The dataset's options set `deterministic=False`"
            if stage == "Options"
            else f"A stage of the dataset ({stage}) runs with `deterministic=False`"
        )
        raise ValueError(
            f"{where}, so its order may change from one pass to the next, "
            "and examples would be paired with the logits of others. Build "
            "it with `deterministic=True` (the default), and leave "
            "`Options.deterministic` unset or True."
        )


def encode(logits, layout):
    """The records of a batch of float32 logits."""
    records = np.empty(len(logits), layout.record)
    if layout.dtype == "float16" and np.abs(logits).max() > _FLOAT16_MAX:
        raise ValueError(
            f"The teacher gives logits up to {np.abs(logits).max():.4g}, "
            f"beyond float16's range (±{_FLOAT16_MAX:g}), where they would "
            "be stored as infinities. Pass dtype='float32'."
        )
    if layout.top_k is None:
        records["values"] = logits
        return records
    k, classes = layout.top_k, layout.classes
    indices = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    values = np.take_along_axis(logits, indices, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    indices = np.take_along_axis(indices, order, axis=-1)
    values = np.take_along_axis(values, order, axis=-1).astype("float64")
    # The classes left out share the probability mass the k leave (at T=1):
    # each gets the same logit, so that the softmax of the rebuilt logits
    # gives the k classes exactly their probabilities.
    full = logits.astype("float64")
    peak = full.max(axis=-1, keepdims=True)
    total = np.log(np.exp(full - peak).sum(axis=-1)) + peak[..., 0]
    kept = np.log(np.exp(values - peak).sum(axis=-1)) + peak[..., 0]
    rest = np.maximum(-np.expm1(kept - total), _TINY_MASS)
    fill = total + np.log(rest) - np.log(classes - k)
    records["values"] = values
    records["indices"] = indices
    records["fill"] = np.minimum(fill, values[..., -1])
    return records


def decode(records, layout):
    """float32 logits from records (NumPy)."""
    values = records["values"].astype("float32")
    if layout.top_k is None:
        return values
    fill = records["fill"].astype("float32")
    logits = np.repeat(fill[..., None], layout.classes, axis=-1)
    np.put_along_axis(logits, records["indices"].astype("int64"), values, axis=-1)
    return logits


def decode_tf(raw, layout):
    """float32 logits from a batch of raw records (`tf.string`, shape [b])."""
    import tensorflow as tf

    record = layout.record

    def field(name):
        sub, offset = record.fields[name]
        dtype = {
            "<f2": tf.float16,
            "<f4": tf.float32,
            "|u1": tf.uint8,
            "<u2": tf.uint16,
            "<i4": tf.int32,
        }[sub.base.str]
        data = tf.io.decode_raw(
            tf.strings.substr(raw, offset, sub.itemsize), dtype, little_endian=True
        )
        return tf.reshape(data, [-1, *sub.shape])

    values = tf.cast(field("values"), tf.float32)
    if layout.top_k is None:
        return values
    # Every class gets the fill value, then the k kept classes their own
    # (a scatter: memory of the logits, not of k copies of them).
    fill, indices = field("fill"), tf.cast(field("indices"), tf.int64)
    shape = tf.concat([tf.shape(fill, tf.int64), [layout.classes]], axis=0)
    rows = tf.reshape(tf.range(tf.size(fill, tf.int64)), [-1, 1])
    flat_indices = tf.reshape(indices, [-1, layout.top_k])
    positions = tf.stack(
        [tf.broadcast_to(rows, tf.shape(flat_indices)), flat_indices], axis=-1
    )
    logits = tf.repeat(tf.reshape(fill, [-1, 1]), layout.classes, axis=1)
    logits = tf.tensor_scatter_nd_update(
        logits, tf.reshape(positions, [-1, 2]), tf.reshape(values, [-1])
    )
    return tf.reshape(logits, shape)


def _batch_digest(x, y, sample_weight):
    """Identifies a batch's content (strings by their text)."""
    hasher = hashlib.blake2b(digest_size=8)
    for leaf in keras.tree.flatten((x, y, sample_weight)):
        if leaf is None:
            continue
        leaf = np.ascontiguousarray(leaf)
        hasher.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        if leaf.dtype == object:
            for item in leaf.ravel():
                data = item if isinstance(item, bytes) else str(item).encode()
                hasher.update(len(data).to_bytes(8, "little") + data)
        else:
            hasher.update(memoryview(leaf).cast("B"))
    return hasher.hexdigest()


def teacher_batch(teacher, x, position):
    """The teacher's float32 logits on a batch, inputs and logits checked
    finite."""
    for leaf in keras.tree.flatten(x):
        _checks.check_finite(leaf, f"inputs of batch {position + 1}")
    logits = np.asarray(teacher.predict_on_batch(x), "float32")
    _checks.check_finite(logits, f"teacher's logits on batch {position + 1}")
    return logits


def read_index(folder):
    """The index of a cache folder, or None (none there, another version,
    or unreadable: a write cut short on a file system without atomic
    renames)."""
    try:
        index = _io.read_json(pathlib.Path(folder) / INDEX)
    except (ValueError, OSError) as error:
        logging.warning("Ignoring the unreadable %s in %s: %s", INDEX, folder, error)
        return None
    return index if index and index.get("version") == VERSION else None


class _Previous:
    """What an earlier call wrote in the folder, for the same stamp
    (teacher, data spec, dtype and top_k): its shards, and the records of
    each batch by position, to reuse where the batch's digest is
    unchanged."""

    def __init__(self, folder, index, stamp):
        self.folder, self.batches, self.files, self.shards = folder, [], {}, []
        self.layout = None
        if index is None or {k: index.get(k) for k in stamp} != stamp:
            return
        self.layout = layout_of(index)
        self.shards = index["shards"]
        self.by_file = {shard["file"]: shard for shard in self.shards}
        for shard in self.shards:
            start = 0
            for digest, rows in zip(shard["digests"], shard["rows"], strict=True):
                self.batches.append((digest, shard["file"], start, rows))
                start += rows

    def _file(self, name, rows):
        """The shard's records (memory-mapped), or None if the file is
        missing or of the wrong size (cut short)."""
        if name not in self.files:
            path = self.folder / name
            size = rows * self.layout.record.itemsize
            if not path.is_file() or path.stat().st_size != size:
                return None
            self.files[name] = np.memmap(path, self.layout.record, mode="r")
        return self.files[name]

    def matches(self, position, digest):
        """True if the batch at `position` is unchanged and its records are
        in a whole file."""
        if position >= len(self.batches) or self.batches[position][0] != digest:
            return False
        name = self.batches[position][1]
        return self._file(name, sum(self.by_file[name]["rows"])) is not None

    def rows(self, position):
        return self.batches[position][3]

    def records(self, position):
        """The records of an unchanged batch (read from its file)."""
        _, name, start, rows = self.batches[position]
        return np.array(self.files[name][start : start + rows])

    def same_shard(self, number, digests):
        """The earlier shard `number` if it holds exactly these batches and
        its file is whole; else None."""
        if number >= len(self.shards) or self.shards[number]["digests"] != digests:
            return None
        shard = self.shards[number]
        return (
            shard if self._file(shard["file"], sum(shard["rows"])) is not None else None
        )


def _remove_abandoned(folder):
    """Removes the temporary files of writers on this host that died (a
    killed process cannot clean up); other hosts' files are left alone."""
    host = socket.gethostname()
    for path in folder.glob("logits.*.tmp"):
        parts = path.name[len("logits.") : -len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue  # Another host's, or not one of ours.
        pid = parts[1]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # Alive, another user's.


def _example_bytes(x, y, sample_weight):
    """Bytes of one example (strings by their length)."""
    leaves = [
        leaf for leaf in keras.tree.flatten((x, y, sample_weight)) if leaf is not None
    ]
    total = sum(
        sum(len(item) for item in leaf.ravel()) if leaf.dtype == object else leaf.nbytes
        for leaf in leaves
    )
    return max(1, total // len(leaves[0]))


def write(teacher, dataset, directory, dtype, top_k):
    """Writes (or reuses, or resumes) the logits of `dataset`.

    Each dataset and setting gets a folder of its own in `directory`, named
    by the digests of the dataset's first batch and of the settings
    (teacher, dtype, top_k), so that several datasets (train and
    validation) and settings share `directory` without touching each
    other's files.

    Returns `(folder, index, teacher_batches)`: the folder, its finished
    index and how many batches the teacher ran on.
    """
    directory = _io.make_folder(directory, "directory")
    if _checks.num_classes(teacher):  # Else on the first logits.
        check_top_k(top_k, _checks.num_classes(teacher))
    stamp = {
        "teacher": _fingerprints.weights(teacher),
        "spec": _datasets.spec(dataset),
        "dtype": dtype,
        "top_k": top_k,
    }
    batches = _datasets.numpy_batches(dataset)
    head = list(itertools.islice(batches, 2))
    if not head:
        raise ValueError("The dataset is empty: there is nothing to cache.")
    digests = [_batch_digest(*batch) for batch in head]
    if not _datasets.describe(dataset).cache:  # A partial read could truncate it.
        replay = itertools.islice(_datasets.numpy_batches(dataset), 2)
        if [_batch_digest(*batch) for batch in replay] != digests:
            raise ValueError(
                "The dataset's first batches differ from one pass to the next "
                "(the pipeline reorders or draws at random), so examples "
                "cannot be paired with stored logits. Make the pipeline "
                "deterministic: no shuffle, no random ops, "
                "`deterministic=True`; `cache_teacher_logits(..., "
                "shuffle=True)` shuffles after the pairing."
            )
    name = f"data-{digests[0]}-{_fingerprints.digest(stamp)}"
    folder = _io.make_folder(directory / name, "directory")
    _remove_abandoned(folder)
    old_index = read_index(folder)
    previous = _Previous(folder, old_index, stamp)
    writer = _Writer(folder, stamp, previous)
    try:
        for position, (x, y, sample_weight) in enumerate(
            itertools.chain(head, batches)
        ):
            if not position:
                _checks.check_batched(x, teacher, "teacher", "dataset")
                writer.example_bytes = _example_bytes(x, y, sample_weight)
            digest = _batch_digest(x, y, sample_weight)
            if previous.matches(position, digest):
                # Read only if its shard changes: a kept shard is not read.
                writer.add(digest, previous.rows(position), position)
                continue
            logits = teacher_batch(teacher, x, position)
            writer.teacher_batches += 1
            if writer.layout is None:
                check_top_k(top_k, logits.shape[-1])
                writer.layout = Layout(tuple(logits.shape[1:]), dtype, top_k)
            records = encode(logits, writer.layout)
            writer.add(digest, len(records), records)
        writer.close_shard()
    finally:
        writer.abandon()
    finished = writer.summary(complete=True)
    if _io.as_json(finished) != old_index:  # A finished cache may be read-only.
        _io.write_json(folder / INDEX, finished)
        listed = {s["file"] for s in (old_index or {}).get("shards", [])}
        for stale in listed - {s["file"] for s in writer.shards}:
            (folder / stale).unlink(missing_ok=True)
    return folder, finished, writer.teacher_batches


class _Writer:
    """Groups batches into shards of about `SHARD_BYTES` of records.

    A shard whose batches are exactly those of the earlier shard at its
    place is kept as it is, never rewritten; any other is written to a
    temporary file and renamed to a name that hashes what it holds. The
    index is rewritten after each new shard, listing the earlier shards not
    yet reached as well, so a call cut short loses no finished work.
    """

    def __init__(self, folder, stamp, previous):
        self.folder, self.stamp, self.previous = folder, stamp, previous
        self.layout = previous.layout
        self.shards, self.teacher_batches, self.example_bytes = [], 0, None
        self.temporary = folder / f"logits.{_io.unique_token()}.tmp"
        self.handle = None
        self.digests, self.rows, self.reused = [], [], []

    def summary(self, complete, shards=None):
        shards = self.shards if shards is None else shards
        return {
            "version": VERSION,
            **self.stamp,
            "shape": list(self.layout.shape),
            "shards": shards,
            "examples": sum(sum(s["rows"]) for s in shards),
            "example_bytes": self.example_bytes,
            "complete": complete,
        }

    def add(self, digest, rows, records):
        """Adds a batch: its records, or the position of an unchanged
        earlier batch whose records are read only if they must be copied."""
        self.digests.append(digest)
        self.rows.append(rows)
        if self.handle is None and self._as_earlier():
            self.reused.append(records)  # Until the shard diverges.
        else:
            if self.handle is None:
                self._start_file()
            self._write(records)
        # By bytes, so that batches of any size make shards of one size.
        if sum(self.rows) * self.layout.record.itemsize >= SHARD_BYTES:
            self.close_shard()

    def _as_earlier(self):
        """True while the shard so far holds the batches the earlier shard
        at its place began with."""
        earlier = self.previous.shards[len(self.shards) :][:1]
        return bool(earlier) and (
            earlier[0]["digests"][: len(self.digests)] == self.digests
        )

    def _write(self, records):
        if isinstance(records, int):  # An unchanged earlier batch.
            records = self.previous.records(records)
        self.handle.write(records.tobytes())

    def _start_file(self):
        self.handle = open(self.temporary, "wb")  # noqa: SIM115 (closed below)
        for records in self.reused:
            self._write(records)
        self.reused = []

    def close_shard(self):
        if not self.digests:
            return
        kept = None
        if self.handle is None:
            kept = self.previous.same_shard(len(self.shards), self.digests)
            if kept is None:
                self._start_file()
        if kept is not None:
            self.shards.append(kept)
        else:
            name = f"logits-{_fingerprints.digest(self.stamp, self.digests)}.bin"
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None
            os.replace(self.temporary, self.folder / name)
            self.shards.append(
                {"file": name, "digests": self.digests, "rows": self.rows}
            )
            later = self.previous.shards[len(self.shards) :]
            _io.write_json(
                self.folder / INDEX,
                self.summary(complete=False, shards=self.shards + later),
            )
        self.digests, self.rows, self.reused = [], [], []

    def abandon(self):
        """Drops an unfinished shard (after an error or an interruption)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        self.temporary.unlink(missing_ok=True)


def default_buffer(index):
    """Examples in `SHUFFLE_BYTES` of input (10,000 MNIST digits), at least
    one batch."""
    rows = index["shards"][0]["rows"][0]
    return max(rows, SHUFFLE_BYTES // max(1, index.get("example_bytes") or 1))


def layout_of(index):
    return Layout(tuple(index["shape"]), index["dtype"], index["top_k"])


def tf_records(directory, index):
    """The records as a `tf.data.Dataset` of raw strings, one per example."""
    import tensorflow as tf

    files = [str(pathlib.Path(directory) / s["file"]) for s in index["shards"]]
    records = tf.data.FixedLengthRecordDataset(
        files, record_bytes=layout_of(index).record.itemsize
    )
    return records.apply(tf.data.experimental.assert_cardinality(index["examples"]))


def numpy_records(directory, index):
    """The records as one NumPy structured array, read into memory."""
    layout = layout_of(index)
    return np.concatenate(
        [
            np.fromfile(pathlib.Path(directory) / s["file"], layout.record)
            for s in index["shards"]
        ]
    )


def size(directory):
    """Bytes of the logits files in `directory` (every dataset's folder)."""
    return sum(p.stat().st_size for p in pathlib.Path(directory).glob("*/logits-*.bin"))
