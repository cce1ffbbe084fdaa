"""Files that record long work: JSON written atomically, and the stamp that
lets an interrupted run resume only if its settings are unchanged."""

import json
import os
import pathlib
import socket
import uuid

from absl import logging

STAMP = "kd_keras_run.json"
# What a backup folder may hold: Keras' BackupAndRestore files, the
# early-stop state, and the stamp.
BACKUP_FILES = (
    "latest.weights.h5",
    "latest.weights.h5.bkp",
    "training_metadata.json",
    "training_metadata.json.bkp",
    "student_early_stop.json",
    STAMP,
)


def _builtin(value):
    """NumPy scalars and arrays as Python numbers and lists; else str."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def unique_token():
    """`host.pid.random`: part of a temporary file's name that no other
    writer uses, also on other hosts sharing a file system."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def write_whole(path, write):
    """Calls `write(handle)` on a temporary file beside `path`, then moves
    it onto `path`: a reader never sees half a file, even when several
    processes write the same path (each through its own temporary file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{unique_token()}.tmp")
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, path)


def write_json(path, payload):
    """Writes JSON whole (see `write_whole`)."""
    text = json.dumps(payload, indent=2, default=_builtin) + "\n"
    write_whole(path, lambda handle: handle.write(text.encode()))


def as_json(payload):
    """The payload as it reads back from a JSON file (tuples as lists, NumPy
    values as numbers), so that it compares with one read back."""
    return json.loads(json.dumps(payload, default=_builtin))


def read_json(path, default=None):
    """The JSON in `path`, or `default` if there is no such file."""
    path = pathlib.Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def make_folder(path, argument):
    """Creates the folder `path` (given as `argument`), or raises, naming
    the file that stands where it or one of its parents should be."""
    path = pathlib.Path(path)
    blocking = next(
        (p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None
    )
    if blocking is not None:
        where = "is" if blocking == path else f"lies under {str(blocking)!r}, which is"
        raise ValueError(
            f"`{argument}` {str(path)!r} {where} a file, not a folder. Pass "
            "a folder path (new or existing)."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_or_resume(folder, stamp):
    """Prepares `folder` for a run described by `stamp` (a JSON-able dict).

    A folder left by an interrupted run with the same stamp is kept, so the
    run resumes from it; the backup of a run with other settings (or with no
    stamp) is deleted, so that it does not restore work it did not do. A
    folder holding other files is refused rather than emptied.
    """
    folder = pathlib.Path(folder)
    stamp = as_json(stamp)
    if folder.exists() and read_json(folder / STAMP) != stamp:
        ours = [
            p
            for p in folder.iterdir()
            if p.name in BACKUP_FILES or p.name.endswith(".tmp")
        ]
        others = sorted(p.name for p in folder.iterdir() if p not in ours)
        if others:
            raise ValueError(
                f"The backup folder {folder} holds other files "
                f"({', '.join(others[:5])}), which a new run would delete. "
                "Pass an empty or new `backup_dir`."
            )
        logging.warning(
            "%s holds the backup of a run with other settings: starting afresh.", folder
        )
        for path in ours:
            path.unlink()
    write_json(folder / STAMP, stamp)
