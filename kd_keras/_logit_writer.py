"""Writing teacher logits to disk: reuse, resumption, and files that stay
while a reader needs them.

Writing goes shard by shard, and the index is rewritten after each new one,
so a call that finds an index reuses every batch whose position and input
digest are unchanged and whose records pass their checksum, and runs the
teacher only on the others: that is how a second call reuses a finished
cache, how an interrupted write resumes, and how damaged files are
repaired (with a warning that names them).

Files are named by a hash of what they hold (settings, input digests and
checksums) and never rewritten in place: a file of that name already there,
with the same bytes, is kept as it is.
A process that is given a dataset reading a folder holds a lease on its
files (`readers/<host>.<pid>.json`), and so does a writer on the files it
writes; a call deletes the files that its index no longer lists only when
no live process holds them. So a dataset returned earlier keeps reading its
files whatever later calls or other writers do, and old files go with the
first call made after the processes that read them have ended. (Leases of
processes on other hosts that share the folder cannot be checked; their
files stay until those lease files are deleted.)
"""

import collections
import filecmp
import hashlib
import itertools
import os
import pathlib
import socket
import threading

from absl import logging
import keras
import numpy as np

from kd_keras import _checks
from kd_keras import _datasets
from kd_keras import _fingerprints
from kd_keras import _io
from kd_keras import _logit_files
from kd_keras._logit_files import INDEX
from kd_keras._logit_files import VERSION
from kd_keras._logit_files import Layout

# A shard holds about this many bytes of records: the unit of resumption.
SHARD_BYTES = 16 << 20
READERS = "readers"


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


# Leases: the files each live process may still read.


def _owner(token, fields):
    """`(host, pid)` from `host.pid[.random]` (a host name may hold dots),
    or None for a name that is not one of ours."""
    parts = token.rsplit(".", fields - 1)
    if len(parts) != fields or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _dead(owner):
    """True if `(host, pid)` is a process of this host that has ended."""
    if owner is None or owner[0] != socket.gethostname():
        return False
    try:
        os.kill(owner[1], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # Alive, another user's.
    return False


_LEASING = threading.Lock()  # One process's lease is rewritten by one thread.


def lease(folder, files):
    """Records that this process may read `files` of `folder` until it
    ends. A read-only folder, which no call can change, takes no lease."""
    path = pathlib.Path(folder) / READERS / f"{socket.gethostname()}.{os.getpid()}.json"
    with _LEASING:
        try:
            held = set(_io.read_json(path, {}).get("files", []))
        except (ValueError, OSError, AttributeError, TypeError):
            held = set()  # Damaged: rewritten whole.
        if held >= set(files):
            return
        try:
            _io.write_json(path, {"files": sorted(held | set(files))})
        except OSError:
            pass


def _held(folder):
    """The files that live processes hold; the leases of dead ones go."""
    held = set()
    for path in (pathlib.Path(folder) / READERS).glob("*.json"):
        if _dead(_owner(path.name[: -len(".json")], 2)):
            _remove(path)
            continue
        try:
            held.update(str(name) for name in _io.read_json(path, {})["files"])
        except (ValueError, OSError, AttributeError, TypeError, KeyError):
            continue  # Being written, or not one of ours.
    return held


def _remove(path):
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # A read-only folder.


def _sweep(folder, index):
    """Deletes the shards that `index` does not list and no live process
    holds, and the temporary files of writers that died (a killed process
    cannot clean up)."""
    for path in folder.glob("logits.*.tmp"):
        if _dead(_owner(path.name[len("logits.") : -len(".tmp")], 3)):
            _remove(path)
    listed = {batch.file for batch in index.batches} if index else set()
    stale = [p for p in folder.glob("logits-*.bin") if p.name not in listed]
    if not stale:
        return
    held = _held(folder)  # After listing the files: a writer leases first.
    for path in stale:
        if path.name not in held:
            _remove(path)


# Writing.


def write(teacher, dataset, directory, dtype, top_k):
    """Writes (or reuses, or resumes, or repairs) the logits of `dataset`.

    Each dataset and setting gets a folder of its own in `directory`, named
    by the digests of the dataset's first batch and of the settings
    (teacher, dtype, top_k), so that several datasets (train and
    validation) and settings share `directory` without touching each
    other's files.

    Returns `(folder, index, teacher_batches)`: the folder, its finished
    `Index` (leased by this process for its readers) and how many batches
    the teacher ran on.
    """
    directory = _io.make_folder(directory, "directory")
    if _checks.num_classes(teacher):  # Else on the first logits.
        _logit_files.check_top_k(top_k, _checks.num_classes(teacher))
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
    old_index = _logit_files.read_index(folder)
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
                # Read only if its shard changes: a kept shard is not copied.
                writer.layout = writer.layout or previous.layout
                writer.add(digest, previous.batch(position).rows, position)
                continue
            logits = teacher_batch(teacher, x, position)
            writer.teacher_batches += 1
            _logit_files.check_top_k(top_k, logits.shape[-1])
            layout = Layout(tuple(logits.shape[1:]), dtype, top_k)
            if writer.layout is None:
                writer.layout = layout
            elif layout != writer.layout:
                raise ValueError(
                    f"The teacher gives logits of shape {layout.shape} per "
                    f"example on batch {position + 1}, but {writer.layout.shape} "
                    "on the batches before. Give every example logits of one "
                    "shape (pad sequences to one length)."
                )
            records = _logit_files.encode(logits, writer.layout)
            writer.add(digest, len(records), records)
        writer.close_shard()
    finally:
        writer.abandon()
    finished = writer.summary(complete=True)
    index = _logit_files.Index(finished)
    lease(folder, {batch.file for batch in index.batches})
    if old_index is None or _io.as_json(finished) != old_index.payload:
        _io.write_json(folder / INDEX, finished)  # A finished cache may be read-only.
    _sweep(folder, index)
    return folder, index, writer.teacher_batches


class _Previous:
    """What an earlier call wrote in the folder, for the same stamp
    (teacher, data spec, dtype and top_k): its batches by position, each
    reused only where its input digest is unchanged and its records pass
    their checksums. A shard is leased, then read whole and verified, the
    first time one of its batches is asked for; a shard cut short, or a
    batch that fails a checksum, is recomputed, with a warning that names
    the file."""

    KEPT_SHARDS = 2  # Verified shards held in memory until copied.

    def __init__(self, folder, index, stamp):
        self.folder, self.batches, self.shards = folder, [], []
        self.layout = None
        self._positions = collections.defaultdict(list)  # Of each shard's batches.
        self._checked, self._valid = set(), set()
        self._contents = collections.OrderedDict()  # Verified shards by number.
        if index is None:
            return
        if index.stamp != stamp:  # Its folder is named after the stamp.
            logging.warning(
                "The index in %s is of other settings than its folder's: its "
                "logits are recomputed.",
                folder,
            )
            return
        self.layout, self.batches, self.shards = (
            index.layout,
            index.batches,
            index.shards,
        )
        self._index = index
        for position, batch in enumerate(self.batches):
            self._positions[batch.shard].append(position)

    def batch(self, position):
        return self.batches[position]

    def _content(self, number, warn=True):
        """The bytes of shard `number` if whole, else None."""
        name = self.shards[number]["file"]
        path = self.folder / name
        lease(self.folder, [name])  # Before reading: no other call sweeps it.
        try:
            content = path.read_bytes()
        except OSError:
            return None
        if len(content) != self._index.shard_bytes(self.shards[number]):
            if warn:
                logging.warning(
                    "%s is cut short or was replaced: its logits are recomputed.", path
                )
            return None
        return content

    def _verify(self, number):
        """Reads and verifies shard `number` once, noting its batches that
        pass both checksums."""
        self._checked.add(number)
        content = self._content(number)
        if content is None:
            return
        for position in self._positions[number]:
            if self._passes(position, content):
                self._valid.add(position)
            else:
                logging.warning(
                    "The logits of batch %d in %s fail their checksum: they are "
                    "recomputed.",
                    position + 1,
                    self.folder / self.shards[number]["file"],
                )
        self._keep(number, content)

    def _passes(self, position, content):
        batch = self.batches[position]
        payload = batch.payload(content, self.layout)
        if _logit_files.crc32(self.layout, batch.digest, payload) != batch.crc32:
            return False
        # The reader checks the fingerprint: a wrong one is rewritten too.
        found = _logit_files.fingerprint(payload)
        return found is None or found == batch.fingerprint

    def _keep(self, number, content):
        self._contents[number] = content
        self._contents.move_to_end(number)
        while len(self._contents) > self.KEPT_SHARDS:
            self._contents.popitem(last=False)

    def matches(self, position, digest):
        """True if the batch at `position` is unchanged and its records are
        whole and verified."""
        if position >= len(self.batches) or self.batches[position].digest != digest:
            return False
        if self.batches[position].shard not in self._checked:
            self._verify(self.batches[position].shard)
        return position in self._valid

    def records(self, position):
        """The verified records of an unchanged batch, as bytes; read again
        (and verified again) if its shard was dropped from memory."""
        batch = self.batches[position]
        content = self._contents.get(batch.shard)
        if content is None:
            content = self._content(batch.shard, warn=False)
            if content is None or not self._passes(position, content):
                raise ValueError(
                    f"{self.folder / batch.file} changed while its logits were "
                    "being reused (another process wrote to the folder): call "
                    "`cache_teacher_logits` again."
                )
            self._keep(batch.shard, content)
        return batch.payload(content, self.layout)

    def same_shard(self, number, digests):
        """The earlier shard `number` if it holds exactly these batches, all
        verified; else None."""
        if number >= len(self.shards) or self.shards[number]["digests"] != digests:
            return None
        if all(
            self.matches(p, self.batches[p].digest) for p in self._positions[number]
        ):
            return self.shards[number]
        return None


class _Writer:
    """Groups batches into shards of about `SHARD_BYTES` of records.

    A shard whose batches are exactly those of the earlier shard at its
    place, all verified, is kept as it is, never rewritten; any other is
    written to a temporary file, leased, and renamed to a name that hashes
    what it holds. The index is rewritten after each new shard, listing the
    earlier shards not yet reached as well, so a call cut short loses no
    finished work.
    """

    def __init__(self, folder, stamp, previous):
        self.folder, self.stamp, self.previous = folder, stamp, previous
        self.layout = None  # Of the first batch reused or computed.
        self.shards, self.teacher_batches, self.example_bytes = [], 0, None
        self.temporary = folder / f"logits.{_io.unique_token()}.tmp"
        self.handle = None
        self._new_shard()

    def _new_shard(self):
        self.digests, self.rows, self.reused = [], [], []
        self.crc32, self.fingerprints = [], []

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
        if isinstance(records, int):  # An earlier batch: its checksums too.
            batch = self.previous.batch(records)
            self.crc32.append(batch.crc32)
            self.fingerprints.append(batch.fingerprint)
        else:
            payload = records.tobytes()
            self.crc32.append(_logit_files.crc32(self.layout, digest, payload))
            self.fingerprints.append(_logit_files.fingerprint(payload))
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
            self.handle.write(self.previous.records(records))
        else:
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
            digest = _fingerprints.digest(self.stamp, self.digests, self.crc32)
            name = f"logits-{digest}.bin"
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None
            lease(self.folder, [name])  # Before it appears: no sweep takes it.
            target = self.folder / name
            if target.exists() and filecmp.cmp(self.temporary, target, shallow=False):
                self.temporary.unlink()  # Never replace a file a reader may hold.
            else:
                os.replace(self.temporary, target)
            self.shards.append(
                {
                    "file": name,
                    "digests": self.digests,
                    "rows": self.rows,
                    "crc32": self.crc32,
                    "fingerprints": self.fingerprints,
                }
            )
            later = self.previous.shards[len(self.shards) :]
            _io.write_json(
                self.folder / INDEX,
                self.summary(complete=False, shards=self.shards + later),
            )
        self._new_shard()

    def abandon(self):
        """Drops an unfinished shard (after an error or an interruption)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        self.temporary.unlink(missing_ok=True)
