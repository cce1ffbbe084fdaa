"""Fingerprints that decide when saved work may be reused.

Long work (assistant chains, sweeps, command-line runs) is keyed by a
fingerprint of everything it depends on, so that rerunning the same work
resumes it and changed settings start it afresh.
"""

import hashlib
import json

import numpy as np


def digest(*parts):
    """A short hash of JSON-serialisable parts."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(json.dumps(part, sort_keys=True, default=str).encode())
    return hasher.hexdigest()[:16]


def _names(config, found):
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "dtype":
                continue  # A policy's "name" (e.g. mixed_float16) matters.
            if key == "name" and isinstance(value, str) and value not in found:
                found[value] = f"<{len(found)}>"
            _names(value, found)
    elif isinstance(config, (list, tuple)):
        for value in config:
            _names(value, found)
    return found


# Config keys that say nothing about what a model computes: Keras' class
# registration, and the `trainable` flag that a Distiller flips on teachers.
_IGNORED_KEYS = ("registered_name", "trainable")


def _renamed(config, names):
    if isinstance(config, dict):
        return {
            key: _renamed(value, names)
            for key, value in config.items()
            if key not in _IGNORED_KEYS
        }
    if isinstance(config, (list, tuple)):
        return [_renamed(value, names) for value in config]
    if isinstance(config, str):
        return names.get(config, config)
    return config


def architecture(model):
    """Identifies a model's architecture, whatever its layers are named.

    Names are replaced by their order of appearance, also where a functional
    model's config refers to them (inbound nodes, inputs and outputs), and
    `trainable` flags are left out.
    """
    config = model.get_config()
    return digest(type(model).__name__, _renamed(config, _names(config, {})))


def weights(model):
    """Identifies a trained model by its architecture and weights (by its
    class and weights where it has no config: a subclassed model, whose
    constructor arguments are then not seen)."""
    try:
        identity = architecture(model)
    except NotImplementedError:
        identity = f"{type(model).__module__}.{type(model).__qualname__}"
    hasher = hashlib.sha256(identity.encode())
    for weight in model.get_weights():
        hasher.update(np.ascontiguousarray(weight).tobytes())
    return hasher.hexdigest()[:16]
