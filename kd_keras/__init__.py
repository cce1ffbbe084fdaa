"""kd_keras: knowledge distillation for Keras 3, on TensorFlow, JAX and PyTorch.

Every name loads on first use, so `import kd_keras` loads neither Keras nor
anything else, and costs nothing beside `import keras`. The library's
modules are `losses`, `distiller`, `teachers`, `callbacks`, `metrics`,
`assistants`, `store`, `tuning`, `export`, `models`, `data` and `training`;
the applications (command line, demo, paper reproductions, plots) live in
`kd_keras.apps`.
"""

import importlib

__version__ = "0.1.0"

# Public names of the package, and the module each lives in.
_NAMES = {
    "Distiller": "distiller",
    "EnsembleTeacher": "teachers",
    "cache_teacher_logits": "teachers",
    "distillation_loss": "losses",
    "softmax_with_temperature": "losses",
}
_SUBMODULES = (
    "apps",
    "assistants",
    "callbacks",
    "data",
    "distiller",
    "export",
    "losses",
    "metrics",
    "models",
    "store",
    "teachers",
    "training",
    "tuning",
)
__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        module = importlib.import_module(f"kd_keras.{_NAMES[name]}")
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kd_keras.{name}")
    raise AttributeError(f"module 'kd_keras' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(_SUBMODULES))
