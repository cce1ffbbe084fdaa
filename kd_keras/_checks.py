"""Validation helpers shared by the Distiller, teachers and assistants.

Each raises `ValueError` naming the value it received and the fix.
"""

import keras


def check_keras_model(model, role):
    """Raises unless `model` is a built `keras.Model`."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected the {role} to be a `keras.Model`. Received: "
            f"{role}={model!r} of type {type(model).__name__}. Wrap a layer "
            f"with `keras.Sequential([keras.Input(shape=...), layer])`."
        )
    if not model.built:
        raise ValueError(
            f"The {role} `{model.name}` is not built, so its output shape is "
            "unknown. Start it with `keras.Input(shape=...)`, or call "
            f"`{role}.build((None, ...))` with its input shape."
        )


def output_shape(model):
    """Returns the model's output shape `(None, ..., num_classes)`, or None."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    if outputs:
        if len(outputs) != 1:
            raise ValueError(
                f"Expected a model with one output of logits. Received: model "
                f"`{model.name}` with {len(outputs)} outputs. Build a model "
                "that returns only the class logits."
            )
        return tuple(outputs[0].shape)
    spec = getattr(model, "output_spec", None)
    return tuple(spec.shape) if spec is not None else None


def num_classes(model):
    """Returns the size of the model's last output axis, or None."""
    shape = output_shape(model)
    return shape[-1] if shape else None


def _layer_activation_name(layer):
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", str(activation))


def output_layers(model):
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return []
    layers = []
    for tensor in outputs or []:
        history = getattr(tensor, "_keras_history", None)
        if history is not None:
            layers.append(history[0])
    return layers


def check_emits_logits(model, role):
    """Raises if the model's output layer applies softmax (or sigmoid)."""
    for layer in output_layers(model):
        name = _layer_activation_name(layer)
        if name in ("softmax", "log_softmax", "sigmoid"):
            raise ValueError(
                f"The {role} `{model.name}` ends in `{name}` (layer "
                f"`{layer.name}`), so it outputs probabilities, but "
                "distillation needs logits. Remove the final activation (e.g. "
                "`Dense(num_classes)` with no activation), or cut the model "
                "before it: `keras.Model(model.input, model.layers[-2].output)`."
            )
