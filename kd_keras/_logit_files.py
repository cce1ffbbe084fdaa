"""Teacher logits stored on disk, for data that do not fit in memory.

A directory holds an index, `kd_keras_logits.json`, and shards,
`logits-<hash>.bin`: raw little-endian records, one per example, in the
order the input pipeline yields its examples. The inputs are not stored;
every epoch re-reads the pipeline and pairs it with the records.

The index records the teacher (a fingerprint of its architecture and
weights), the record layout, and for every shard the digests of the input
batches its logits were computed from. Writing goes shard by shard, and the
index is rewritten after each one, so a call that finds an index reuses
every batch whose position and digest are unchanged (the same teacher, the
same layout) and runs the teacher only on the others: that is how a second
call reuses a finished cache, and how an interrupted write resumes.

A record holds the logits (float32 or float16) or, with `top_k`, the k
largest logits, their class ids and one fill value for the other classes.
"""

import dataclasses
import hashlib
import os
import pathlib
import socket
import uuid

import keras
import numpy as np

from kd_keras import _backend
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
    if not _backend.is_tf_dataset(dataset):
        return
    for stage in _datasets.stages(dataset):
        kind = type(stage).__name__
        if "Shuffle" in kind:
            raise ValueError(
                "The dataset shuffles (a `.shuffle()`, or `list_files`, which "
                "shuffles by default), so re-reading it would pair examples "
                "with the logits of others. Logits on disk are paired with "
                "the dataset every epoch: remove the shuffle (use "
                "`list_files(..., shuffle=False)`) and let "
                "`cache_teacher_logits(..., shuffle=True)` shuffle after the "
                "pairing, with a buffer of `shuffle_buffer` examples."
            )
        if getattr(stage, "_deterministic", None) == "false":
            raise ValueError(
                f"A stage of the dataset ({kind}) runs with "
                "`deterministic=False`, so its order may change from one "
                "pass to the next, and examples would be paired with the "
                "logits of others. Build it with `deterministic=True` (the "
                "default)."
            )
    if dataset.options().deterministic is False:
        raise ValueError(
            "The dataset's options set `deterministic=False`, so its order "
            "may change from one pass to the next, and examples would be "
            "paired with the logits of others. Leave `Options.deterministic` "
            "unset or True."
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
    fill = field("fill")[..., None]
    indices = tf.cast(field("indices"), tf.int32)
    spread = tf.one_hot(indices, layout.classes, dtype=tf.float32)
    return fill + tf.reduce_sum(spread * (values - fill)[..., None], axis=-2)


def _batch_digest(x, y, sample_weight):
    hasher = hashlib.blake2b(digest_size=8)
    for leaf in keras.tree.flatten((x, y, sample_weight)):
        if leaf is None:
            continue
        leaf = np.ascontiguousarray(leaf)
        hasher.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        hasher.update(memoryview(leaf).cast("B"))
    return hasher.hexdigest()


def teacher_fingerprint(teacher):
    try:
        return _fingerprints.weights(teacher)
    except (NotImplementedError, TypeError, ValueError):
        # A subclassed model without a config: its class and weights.
        hasher = hashlib.sha256(type(teacher).__qualname__.encode())
        for weight in teacher.get_weights():
            hasher.update(np.ascontiguousarray(weight).tobytes())
        return hasher.hexdigest()[:16]


def read_index(directory):
    index = _io.read_json(pathlib.Path(directory) / INDEX)
    return index if index and index.get("version") == VERSION else None


class _Previous:
    """Records of an earlier write, by batch position, to reuse where the
    batch's digest is unchanged (for the same stamp: teacher, data spec,
    dtype and top_k)."""

    def __init__(self, directory, index, stamp):
        self.directory, self.batches, self.files = directory, [], {}
        self.layout = None
        if index is None or {k: index.get(k) for k in stamp} != stamp:
            return
        self.layout = layout_of(index)
        for shard in index["shards"]:
            start = 0
            for digest, rows in zip(shard["digests"], shard["rows"], strict=True):
                self.batches.append((digest, shard["file"], start, rows))
                start += rows

    def records(self, position, digest):
        if position >= len(self.batches) or self.batches[position][0] != digest:
            return None
        _, name, start, rows = self.batches[position]
        if name not in self.files:
            path = self.directory / name
            if not path.is_file():
                return None
            self.files[name] = np.memmap(path, self.layout.record, mode="r")
        records = self.files[name][start : start + rows]
        return np.array(records) if len(records) == rows else None


def _temporary_name():
    """A name no other writer uses: this host, this process, a random part."""
    return f"logits.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def _remove_abandoned(directory):
    """Removes the temporary files of writers on this host that died (a
    killed process cannot clean up); other hosts' files are left alone."""
    host = socket.gethostname()
    for path in directory.glob("logits.*.tmp"):
        parts = path.name.split(".")
        if len(parts) != 5 or parts[1] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # Alive, another user's.


def write(teacher, dataset, directory, dtype, top_k):
    """Writes (or reuses, or resumes) the logits of `dataset` in `directory`.

    Returns `(index, teacher_batches)`: the finished index and how many
    batches the teacher ran on.
    """
    directory = _io.make_folder(directory, "directory")
    _remove_abandoned(directory)
    stamp = {
        "teacher": teacher_fingerprint(teacher),
        "spec": _datasets.spec(dataset),
        "dtype": dtype,
        "top_k": top_k,
    }
    previous = _Previous(directory, read_index(directory), stamp)
    writer = _Writer(directory, stamp, previous.layout)
    try:
        for position, (x, y, sample_weight) in enumerate(
            _datasets.numpy_batches(dataset)
        ):
            if not position:
                _checks.check_batched(x, teacher, "teacher", "dataset")
            digest = _batch_digest(x, y, sample_weight)
            records = previous.records(position, digest)
            if records is None:
                logits = _teacher_logits(teacher, x, position)
                writer.teacher_batches += 1
                if writer.layout is None:
                    check_top_k(top_k, logits.shape[-1])
                    writer.layout = Layout(tuple(logits.shape[1:]), dtype, top_k)
                records = encode(logits, writer.layout)
            if not position:
                leaves = keras.tree.flatten((x, y, sample_weight))
                writer.example_bytes = sum(
                    leaf.nbytes for leaf in leaves if leaf is not None
                ) // max(1, len(records))
            writer.add(records, digest)
        if writer.layout is None:
            raise ValueError("The dataset is empty: there is nothing to cache.")
        writer.close_shard()
    finally:
        writer.abandon()
    finished = writer.summary(complete=True)
    _io.write_json(directory / INDEX, finished)
    kept = {s["file"] for s in writer.shards}
    for path in directory.glob("logits-*.bin"):
        if path.name not in kept:
            path.unlink(missing_ok=True)
    return finished, writer.teacher_batches


class _Writer:
    """Appends records to a temporary file and turns it into a shard (named
    by what it holds) every `SHARD_BYTES`, rewriting the index after each."""

    def __init__(self, directory, stamp, layout):
        self.directory, self.stamp, self.layout = directory, stamp, layout
        self.shards, self.teacher_batches, self.example_bytes = [], 0, None
        self.temporary = directory / _temporary_name()
        self.handle = None

    def summary(self, complete):
        return {
            "version": VERSION,
            **self.stamp,
            "shape": list(self.layout.shape),
            "shards": self.shards,
            "examples": sum(sum(s["rows"]) for s in self.shards),
            "example_bytes": self.example_bytes,
            "complete": complete,
        }

    def add(self, records, digest):
        if self.handle is None:
            if not self.shards:
                size = len(records) * self.layout.record.itemsize
                self.batches_per_shard = max(1, SHARD_BYTES // size)
            self.handle = open(self.temporary, "wb")  # noqa: SIM115 (closed below)
            self.digests, self.rows = [], []
        self.handle.write(records.tobytes())
        self.digests.append(digest)
        self.rows.append(len(records))
        if len(self.digests) == self.batches_per_shard:
            self.close_shard()

    def close_shard(self):
        if self.handle is None:
            return
        # A shard's name hashes what it holds, so an unchanged shard keeps
        # its name and a changed one never overwrites a file being read.
        name = f"logits-{_fingerprints.digest(self.stamp, self.digests)}.bin"
        self.handle.close()
        self.handle = None
        os.replace(self.temporary, self.directory / name)
        self.shards.append({"file": name, "digests": self.digests, "rows": self.rows})
        _io.write_json(self.directory / INDEX, self.summary(complete=False))

    def abandon(self):
        """Drops an unfinished shard (after an error or an interruption)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        self.temporary.unlink(missing_ok=True)


def _teacher_logits(teacher, x, position):
    for leaf in keras.tree.flatten(x):
        _checks.check_finite(leaf, f"inputs of batch {position + 1}")
    logits = np.asarray(teacher.predict_on_batch(x), "float32")
    _checks.check_finite(logits, f"teacher's logits on batch {position + 1}")
    return logits


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


def size(directory, index):
    """Bytes of the shards."""
    return sum(
        (pathlib.Path(directory) / s["file"]).stat().st_size for s in index["shards"]
    )
