"""Every private Keras and TensorFlow API that kd_keras uses, fenced here.

Keras and TensorFlow do not promise to keep these names. Each hook below is
the only place that touches one of them, and `tests/test_internals.py` has
one test per hook, named after it, so that an upgrade that removes or
changes one breaks one clearly named test instead of code nobody can find.
tf.data's internals are in `_tfdata_internals`.
"""

import keras

# Keras: tensors and layers.


def keras_mask(tensor):
    """The Keras mask a layer attached to `tensor` (e.g. padded tokens), or
    None."""
    from keras.src.backend.common.masking import get_keras_mask

    return get_keras_mask(tensor)


def in_stateless_scope():
    """True inside a JAX training step, where variables are read and written
    through Keras' `StatelessScope`."""
    from keras.src.backend.common.stateless_scope import in_stateless_scope as inside

    return inside()


def reduce_weighted_values(values, sample_weight, mask, reduction, dtype):
    """Keras' own reduction of per-position loss values (the one its
    `keras.losses.Loss` objects apply), so that a term reduced by kd_keras
    and a Keras loss agree."""
    from keras.src.losses.loss import reduce_weighted_values as reduce

    return reduce(
        values, sample_weight=sample_weight, mask=mask, reduction=reduction, dtype=dtype
    )


def output_layer(tensor):
    """The layer that made a functional model's output tensor, or None."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history[0]


def child_layers(layer):
    """The layers directly inside `layer` (nested models, a subclassed
    model's attributes), in the order Keras tracks them."""
    return layer._flatten_layers(include_self=False, recursive=False)


def all_layers(model):
    """`model` and every layer inside it, at any depth."""
    return model._flatten_layers()


def held_by_training_state(variable):
    """True while Keras' JAX trainer holds the variable's value in its
    training state (mid-epoch), so that the variable has none of its own."""
    return variable._value is None


# Keras: the trainer.


def compute_loss(model, **arguments):
    """`model.compute_loss(...)` as Keras' own steps call it (with or
    without `training`, whichever the override takes)."""
    return model._compute_loss(**arguments)


def loss_tracker(model):
    """The metric behind the `loss` that Keras logs."""
    return model._loss_tracker


def unbuilt_compiled_metrics(model):
    """The model's compiled metrics while they wait for a first labeled
    batch to build them, else None."""
    compiled = getattr(model, "_compile_metrics", None)
    return compiled if compiled is not None and not compiled.built else None


def jax_state_synced(model):
    """False while Keras' JAX trainer holds the model's training state
    outside its variables (mid-epoch)."""
    return getattr(model, "_jax_state_synced", True)


def validation_during_fit(evaluate_arguments):
    """True for the `evaluate` call that Keras' `fit` makes on the
    validation data every epoch (it passes a private argument)."""
    return bool(evaluate_arguments.get("_use_cached_eval_dataset"))


def callback_model(callback):
    """The model a callback was given, read without `Callback.model`, which
    on JAX first writes the training state back to the variables."""
    return callback._model


class SymbolicBuildFromFirstReplica:
    """A mixin for a `keras.Model` that Keras 3 on TensorFlow builds from
    the first replica's batch under several workers.

    Keras builds the model from the mean of a distributed batch, which an
    eager collective cannot take under `MultiWorkerMirroredStrategy`; only
    shapes matter for the build, so the first replica's batch serves.
    `_build_from_first_replica(strategy)` decides.
    """

    def _build_from_first_replica(self, strategy):
        return False

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self.distribute_strategy
        if iterator is not None and self._build_from_first_replica(strategy):
            for _, _, batches in iterator:
                data_batch = first_replica(strategy, next(batches))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


# TensorFlow: tf.distribute.


def in_multi_worker_mode(strategy):
    """True for a `tf.distribute.MultiWorkerMirroredStrategy` that spans
    several workers."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def first_replica(strategy, values):
    """The first local replica's part of each `tf.distribute` distributed
    value in a structure (other values as they are)."""
    import tensorflow as tf

    return keras.tree.map_structure(
        lambda v: (
            strategy.experimental_local_results(v)[0]
            if isinstance(v, tf.distribute.DistributedValues)
            else v
        ),
        values,
    )
