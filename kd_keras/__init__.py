"""kd_keras: knowledge distillation for Keras 3, on TensorFlow, JAX and PyTorch.

Importing kd_keras imports Keras and the modules whose classes Keras must
know to load saved models (the Distiller, teacher ensembles, logit
metrics), and `data`, which teachers use; it has no side effects. The other
modules (callbacks, assistants, store, tuning, export, language, models,
training)
load the first time they are used; keras-tuner only with `tuning`. The
applications (command line, demo, paper reproductions, plots) live in
`kd_keras.apps`.
"""

import importlib as _importlib

# Registered with Keras on import, so that `keras.saving.load_model` finds
# them after `import kd_keras`.
from kd_keras.distiller import Distiller
from kd_keras.losses import distillation_loss
from kd_keras.losses import softmax_with_temperature
from kd_keras.teachers import EnsembleTeacher
from kd_keras.teachers import cache_teacher_logits

__version__ = "0.1.0"
__all__ = [
    "Distiller",
    "EnsembleTeacher",
    "cache_teacher_logits",
    "distillation_loss",
    "softmax_with_temperature",
]

_LAZY_SUBMODULES = (
    "apps",
    "assistants",
    "callbacks",
    "data",
    "export",
    "language",
    "models",
    "store",
    "training",
    "tuning",
)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"kd_keras.{name}")
    raise AttributeError(f"module 'kd_keras' has no attribute {name!r}")


def __dir__():
    public = [n for n in globals() if not n.startswith("_")]
    return sorted({*public, *_LAZY_SUBMODULES})
