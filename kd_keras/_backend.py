"""What differs between Keras backends, in one place.

TensorFlow is imported here only when the backend is TensorFlow or when the
caller already holds a TensorFlow object, so `import kd_keras` works on a
machine without TensorFlow.
"""

import contextlib
import numbers
import sys

import keras
import numpy as np


def name():
    """The Keras backend: "tensorflow", "jax" or "torch"."""
    return keras.backend.backend()


def tf_if_loaded():
    """The `tensorflow` module if something has imported it, else None."""
    return sys.modules.get("tensorflow")


def require_tensorflow(purpose):
    """Imports TensorFlow, or raises an error that says how to get it."""
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs TensorFlow, which could not be imported "
            f"({error}). Install it with `pip install tensorflow`: it works "
            "beside JAX or PyTorch, and Keras keeps training on the backend "
            "you chose."
        ) from error
    return tf


def is_tf_dataset(data):
    """True for a `tf.data.Dataset`, without importing TensorFlow."""
    tf = tf_if_loaded()
    return tf is not None and isinstance(data, tf.data.Dataset)


def is_symbolic(value):
    """True while `value` is a placeholder of a traced or compiled function."""
    if isinstance(value, keras.KerasTensor):
        return True
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.is_tensor(value) and tf.is_symbolic_tensor(value)
    if backend == "jax":
        import jax

        return isinstance(value, jax.core.Tracer)
    return False


def concrete_scalar(value):
    """`value` as a Python float, or None while it is symbolic.

    Accepts numbers, NumPy values, eager tensors of any backend and Keras
    variables. Raises `ValueError` for values with more than one element.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, keras.Variable):
        value = value.value
    if is_symbolic(value):
        return None
    array = np.asarray(keras.ops.convert_to_numpy(value))
    if array.size != 1:
        raise ValueError(f"Expected a scalar. Received a value of shape {array.shape}.")
    return float(array.reshape(()))


def num_replicas():
    """Replicas of the current `tf.distribute` strategy (1 off TensorFlow).

    Keras' own losses divide by it on TensorFlow, so that the gradients,
    summed over replicas, are those of the global batch.
    """
    if name() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def strategy_scope(model):
    """The scope of the `tf.distribute` strategy `model` was made under, in
    which its variables are created (no scope off TensorFlow)."""
    if name() != "tensorflow":
        return contextlib.nullcontext()
    return model.distribute_strategy.scope()


def devices():
    """The devices Keras trains on, e.g. ["gpu:0"], or [] where the backend
    (PyTorch) has no `keras.distribution` support."""
    try:
        return [str(d) for d in keras.distribution.list_devices()]
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return []
