"""Files that record long work: JSON written atomically, and the stamp that
lets an interrupted run resume only if its settings are unchanged."""

import json
import os
import pathlib
import shutil

from absl import logging

STAMP = "kd_keras_run.json"


def write_json(path, payload):
    """Writes JSON so that a reader never sees half a file, even when
    several processes write the same path (each through its own temporary
    file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def read_json(path, default=None):
    """The JSON in `path`, or `default` if there is no such file."""
    path = pathlib.Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def start_or_resume(folder, stamp):
    """Prepares `folder` for a run described by `stamp` (a JSON-able dict).

    A folder left by an interrupted run with the same stamp is kept, so the
    run resumes from it; one left by a run with other settings (or with no
    stamp) is emptied, so that it does not restore work it did not do.
    """
    folder = pathlib.Path(folder)
    stamp = json.loads(json.dumps(stamp, default=str))
    if folder.exists() and read_json(folder / STAMP) != stamp:
        logging.info("%s holds a run with other settings: starting afresh.", folder)
        shutil.rmtree(folder)
    write_json(folder / STAMP, stamp)
