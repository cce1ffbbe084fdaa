"""Teacher logits stored on disk: the record layout, the index, the
checksums, and the verified readers.

Each dataset and setting has a folder in the user's directory,
`data-<first batch digest>-<settings digest>`, holding an index,
`kd_keras_logits.json`, and shards, `logits-<hash>.bin`: the raw
little-endian records of consecutive input batches, one record per example,
in the order the input pipeline yields its examples. The inputs are not
stored; every epoch re-reads the pipeline and pairs each input batch with
its logits. (`_logit_writer` writes the folder.)

A record holds the logits (float32 or float16) or, with `top_k`, the k
largest logits, their class ids and one fill value for the other classes.

Nothing is served that was not verified. The index lists, for every batch,
the digest of the input batch its logits were computed from and two
checksums of its records: a CRC-32 (`zlib`), which a call that reuses the
folder and the NumPy reader verify, and a FarmHash fingerprint
(`tf.fingerprint`), which the `tf.data` reader verifies in the pipeline,
batch by batch, before it decodes the logits. The CRC-32 covers the record
layout and the input digest as well as the bytes, so an index whose shape,
dtype, rows or file names disagree with the files fails it too. An index
that cannot be read, or that is not of this form, is no index: its folder
is rebuilt.
"""

import dataclasses
import pathlib
import re
import sys
import zlib

from absl import logging
import numpy as np

from kd_keras import _backend
from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _io

INDEX = "kd_keras_logits.json"
VERSION = 2
DTYPES = ("float32", "float16")
# The default shuffle buffer holds about this many bytes of examples.
SHUFFLE_BYTES = 32 << 20
SHARD_NAME = re.compile(r"^logits-[0-9a-f]{16}\.bin$")
FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
_FLOAT16_MAX = float(np.finfo("float16").max)
# Below this, the rest of the probability mass counts as zero.
_TINY_MASS = 1e-30
_FIX = (
    "Delete the folder {folder} and call `cache_teacher_logits` again, which "
    "recomputes what is damaged."
)


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

    def checksum_prefix(self, digest):
        """What a batch's checksums cover besides its bytes: the layout that
        reads them and the input batch they were computed from."""
        return f"{list(self.shape)}|{self.dtype}|{self.top_k}|{digest}|".encode()


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


# Records.


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
    """float32 logits from verified records (NumPy)."""
    values = records["values"].astype("float32")
    if layout.top_k is None:
        return values
    fill = records["fill"].astype("float32")
    logits = np.repeat(fill[..., None], layout.classes, axis=-1)
    np.put_along_axis(logits, records["indices"].astype("int64"), values, axis=-1)
    return logits


_TF_TYPES = {"<f2": "float16", "<f4": "float32", "|u1": "uint8", "<u2": "uint16"}


def rows_tf(raw, layout):
    """The raw records of a batch (one `tf.string`) as bytes, one row per
    record."""
    import tensorflow as tf

    return tf.reshape(tf.io.decode_raw(raw, tf.uint8), [-1, layout.record.itemsize])


def decode_tf(raw, layout):
    """float32 logits from the raw records of a batch (one `tf.string`)."""
    return decode_rows_tf(rows_tf(raw, layout), layout)


def decode_rows_tf(data, layout):
    """float32 logits from records as bytes, one row per record."""
    import tensorflow as tf

    record = layout.record

    def field(name):
        sub, offset = record.fields[name]
        width = sub.base.itemsize
        part = tf.reshape(data[:, offset : offset + sub.itemsize], [-1, width])
        if width == 1:
            values = part[:, 0]
        else:
            if sys.byteorder != "little":  # The records are little-endian.
                part = tf.reverse(part, axis=[-1])
            values = tf.bitcast(part, tf.as_dtype(_TF_TYPES.get(sub.base.str, "int32")))
        return tf.reshape(values, [-1, *sub.shape])

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


# Checksums.


def crc32(layout, digest, payload):
    """The CRC-32 of a batch's records (with its layout and input digest)."""
    return zlib.crc32(payload, zlib.crc32(layout.checksum_prefix(digest)))


def fingerprint(payload):
    """The FarmHash fingerprint (`tf.fingerprint`) of a batch's records, as
    hex text; None without TensorFlow (the `tf.data` reader, the only one
    that checks it, needs it anyway). The reader takes its layout and its
    batches' places from the index of the call that made it, not from the
    files, so the fingerprint covers the bytes alone."""
    tf = _backend.tf_if_loaded()
    if tf is None:
        return None
    return bytes(tf.fingerprint(tf.constant([payload])).numpy()[0]).hex()


# The index.


@dataclasses.dataclass(frozen=True)
class Batch:
    """A batch's place in the folder: its shard (file and place in the
    index), its records' byte range in the shard, its input digest and its
    checksums."""

    file: str
    shard: int
    start: int
    rows: int
    digest: str
    crc32: int
    fingerprint: str

    def payload(self, content, layout):
        """The batch's records in the bytes of its shard."""
        return content[self.start : self.start + self.rows * layout.record.itemsize]


class Index:
    """A folder's index, checked for its form: every field of the right
    type, shard names of the folder's own, as many digests, row counts and
    checksums as batches. Its agreement with the files is checked by the
    checksums, when a batch is read.

    Attributes:
        stamp: the settings (teacher, data spec, dtype, top_k).
        layout: the record layout.
        shards: `[{"file", "digests", "rows", "crc32", "fingerprints"}]`.
        batches: a `Batch` per input batch, in order.
        complete: False while a write is under way (or was cut short).
    """

    def __init__(self, payload):
        self.payload = payload
        self.stamp = {
            key: payload[key] for key in ("teacher", "spec", "dtype", "top_k")
        }
        shape = payload["shape"]
        if not (
            isinstance(shape, list)
            and shape
            and all(isinstance(d, int) and d > 0 for d in shape)
            and payload["dtype"] in DTYPES
            and (payload["top_k"] is None or 0 < payload["top_k"] < shape[-1])
        ):
            raise ValueError(f"no record layout in shape={shape!r}")
        self.layout = Layout(tuple(shape), payload["dtype"], payload["top_k"])
        self.shards = payload["shards"]
        self.complete = payload["complete"] is True
        example_bytes = payload.get("example_bytes")
        self.example_bytes = example_bytes if isinstance(example_bytes, int) else 1
        self.batches = []
        if not isinstance(self.shards, list):
            raise ValueError(f"shards of another form: {self.shards!r:.200}")
        for number, shard in enumerate(self.shards):
            if not isinstance(shard, dict):
                raise ValueError(f"a shard entry of another form: {shard!r:.200}")
            fields = [shard[k] for k in ("digests", "rows", "crc32", "fingerprints")]
            if not all(isinstance(f, list) for f in fields) or (
                not SHARD_NAME.match(str(shard["file"]))
                or len({len(f) for f in fields}) != 1
            ):
                raise ValueError(f"a shard entry of another form: {shard!r:.200}")
            start = 0
            for digest, rows, crc, fingerprint in zip(*fields, strict=True):
                if not (
                    isinstance(rows, int)
                    and rows > 0
                    and isinstance(crc, int)
                    and (fingerprint is None or FINGERPRINT.match(str(fingerprint)))
                ):
                    raise ValueError(
                        f"rows={rows!r}, crc32={crc!r}, fingerprint={fingerprint!r}"
                    )
                self.batches.append(
                    Batch(
                        shard["file"],
                        number,
                        start,
                        rows,
                        str(digest),
                        crc,
                        fingerprint,
                    )
                )
                start += rows * self.layout.record.itemsize
        if not self.batches:
            raise ValueError("no batches")

    @property
    def examples(self):
        return sum(batch.rows for batch in self.batches)

    def shard_bytes(self, shard):
        return sum(shard["rows"]) * self.layout.record.itemsize


def read_index(folder):
    """The index of a cache folder, or None: none there, another version,
    or one that is unreadable or of another form (a write cut short on a
    file system without atomic renames, a hand edit), with a warning."""
    path = pathlib.Path(folder) / INDEX
    try:
        payload = _io.read_json(path)
        if payload is None or payload.get("version") != VERSION:
            return None
        return Index(payload)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as error:
        logging.warning(
            "Ignoring the index %s, which cannot be used (%s): the logits it "
            "lists are recomputed.",
            path,
            error,
        )
        return None


# Readers.


def numpy_records(folder, index):
    """The records of every batch, verified, as one NumPy structured array
    read into memory. Raises, naming the file, the batch and the fix, on a
    file that is cut short or a batch that fails its CRC-32."""
    layout, item = index.layout, index.layout.record.itemsize
    files, parts = {}, []
    for position, batch in enumerate(index.batches):
        if batch.file not in files:
            files[batch.file] = memoryview(_read_whole(folder, batch.file))
        payload = batch.payload(files[batch.file], layout)
        if (
            len(payload) != batch.rows * item
            or crc32(layout, batch.digest, payload) != batch.crc32
        ):
            raise ValueError(
                f"The teacher logits of batch {position + 1} in "
                f"{pathlib.Path(folder) / batch.file} fail their checksum: the "
                "file changed since it was written. " + _FIX.format(folder=folder)
            )
        parts.append(np.frombuffer(payload, layout.record))
    records = np.concatenate(parts)
    check_indices(records, layout, folder)
    return records


def check_indices(records, layout, where):
    """Raises if a top-k record holds a class id out of range (a bound
    check behind the checksums)."""
    if layout.top_k is not None and records.size:
        if int(records["indices"].max()) >= layout.classes:
            raise ValueError(
                f"The top-k logits in {where} hold class ids beyond the "
                f"{layout.classes} classes. " + _FIX.format(folder=where)
            )


def _read_whole(folder, name):
    path = pathlib.Path(folder) / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(
            f"The teacher logits file {path} is missing. " + _FIX.format(folder=folder)
        ) from None


def tf_batches(folder, index):
    """The raw records of every batch, in order, as a `tf.data.Dataset` of
    `(raw, position)`, and the function `(raw, position) -> rows` that
    verifies a batch against its fingerprint and splits it into its records
    (bytes, for `decode_rows_tf`), which a shuffle moves about more cheaply
    than the logits they decode to.

    A shard is read whole (about 16 MB: `_logit_writer.SHARD_BYTES`) and
    cut into its batches, so that the pipeline handles a batch, not an
    example, at a time. A shard cut short, or a batch whose bytes changed
    since they were written, fails the read at once with an error that
    names the file, the batch and the fix.
    """
    import tensorflow as tf

    layout, item = index.layout, index.layout.record.itemsize
    folder = pathlib.Path(folder)
    if any(batch.fingerprint is None for batch in index.batches):
        raise ValueError(
            f"The index in {folder} has no fingerprints (written without "
            "TensorFlow), which a `tf.data` reader checks. "
            + _FIX.format(folder=folder)
        )
    paths, sizes, starts, lengths, positions = [], [], [], [], []
    first = 0  # The position of the shard's first batch.
    for shard in index.shards:
        count = len(shard["rows"])
        paths.append(str(folder / shard["file"]))
        sizes.append(index.shard_bytes(shard))
        batches = index.batches[first : first + count]
        starts.append([batch.start for batch in batches])
        lengths.append([batch.rows * item for batch in batches])
        positions.append(list(range(first, first + count)))
        first += count
    expected = tf.constant(
        np.stack(
            [
                np.frombuffer(bytes.fromhex(b.fingerprint), np.uint8)
                for b in index.batches
            ]
        ),
        tf.uint8,
    )
    names = tf.constant([batch.file for batch in index.batches])
    fix = _FIX.format(folder=folder)

    def split(path, size, start, length, position):
        content = tf.io.read_file(path)
        whole = tf.debugging.Assert(
            tf.equal(tf.cast(tf.strings.length(content), tf.int64), size),
            ["The teacher logits file", path, "is cut short or was replaced. " + fix],
        )
        with tf.control_dependencies([whole]):
            return tf.strings.substr(content, start, length), position

    def verified(raw, position):
        fingerprint = tf.fingerprint(tf.reshape(raw, [1]))[0]
        check = tf.debugging.Assert(
            tf.reduce_all(tf.equal(fingerprint, tf.gather(expected, position))),
            [
                "The teacher logits of batch",
                position + 1,
                "in",
                tf.gather(names, position),
                "fail their checksum: the file changed since it was written. " + fix,
            ],
        )
        with tf.control_dependencies([check]):
            return rows_tf(tf.identity(raw), layout)

    shards = tf.data.Dataset.from_tensor_slices(
        (
            paths,
            tf.constant(sizes, tf.int64),
            tf.ragged.constant(starts, tf.int64),
            tf.ragged.constant(lengths, tf.int64),
            tf.ragged.constant(positions, tf.int64),
        )
    )
    return shards.map(split).unbatch(), verified


def default_buffer(index):
    """Examples in `SHUFFLE_BYTES` of input (10,000 MNIST digits), at least
    one batch."""
    rows = max(batch.rows for batch in index.batches)
    return max(rows, SHUFFLE_BYTES // max(1, index.example_bytes))


def size(directory):
    """Bytes of the logits files in `directory` (every dataset's folder)."""
    return sum(p.stat().st_size for p in pathlib.Path(directory).glob("*/logits-*.bin"))
