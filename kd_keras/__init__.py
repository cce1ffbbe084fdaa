"""kd_keras: knowledge distillation for Keras 3, on TensorFlow, JAX and PyTorch."""

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "kd-keras":
    # The command line prints its own results; TensorFlow's start-up notices
    # would bury them. A user's own setting wins.
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kd_keras.losses import distillation_loss
from kd_keras.losses import softmax_with_temperature
from kd_keras.distiller import Distiller
from kd_keras.teachers import EnsembleTeacher
from kd_keras.teachers import cache_teacher_logits
from kd_keras import assistants
from kd_keras import callbacks
from kd_keras import data
from kd_keras import export
from kd_keras import models
from kd_keras import plots
from kd_keras import training
from kd_keras import tuning

__version__ = "0.1.0"
