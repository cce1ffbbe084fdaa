"""Intermediate features of a teacher or a student, read in the same forward
pass that computes the logits, on every backend.

Keras has no forward hooks, so a watched layer's `call` is wrapped, once,
by a function that hands its output to the active `capture()`; outside a
capture the wrapper only passes the output through. This reaches any layer
that runs in the forward pass: top-level, inside nested models, or an
attribute of a subclassed model. A tap is either such a layer or a function
`fn(model, inputs)` that computes the feature itself.
"""

import contextlib
import difflib
import functools
import inspect
import threading

import keras
from keras import ops

from kd_keras import _keras_internals

_STATE = threading.local()
_WATCHING = threading.Lock()
_WATCHED = "_kd_keras_watched"


def _recording(original, key):
    @functools.wraps(original)
    def call(*args, **kwargs):
        outputs = original(*args, **kwargs)
        recorded = getattr(_STATE, "recorded", None)
        if recorded is not None and key in recorded:
            recorded[key].append(outputs)
        return outputs

    return call


def _watch(layer):
    """Wraps `layer.call` (and `quantized_call`, which Keras runs instead
    for a quantized layer) so that a capture can record its output."""
    with _WATCHING:
        if getattr(layer, _WATCHED, False):
            return
        for method in ("call", "quantized_call"):
            if hasattr(layer, method):
                # Past Keras' attribute tracking: nothing to track here.
                object.__setattr__(
                    layer, method, _recording(getattr(layer, method), id(layer))
                )
        object.__setattr__(layer, _WATCHED, True)


@contextlib.contextmanager
def capture(layers):
    """Records the outputs of `layers` (a list) while the block runs; yields
    a dict from `id(layer)` to the list of that layer's outputs."""
    recorded = {id(layer): [] for layer in layers}
    previous = getattr(_STATE, "recorded", None)
    _STATE.recorded = recorded
    try:
        yield recorded
    finally:
        _STATE.recorded = previous


def _paths(layer, prefix=""):
    """Every path "outer/inner/name" below `layer`."""
    paths = []
    for child in _keras_internals.child_layers(layer):
        path = f"{prefix}{child.name}"
        paths.append(path)
        paths.extend(_paths(child, f"{path}/"))
    return paths


def describe(spec):
    """A layer given as a name, path, layer or function, as the same text in
    every process: the name, or a function's module and qualified name."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, keras.layers.Layer):
        return spec.name
    name = getattr(spec, "__qualname__", None)
    return f"{spec.__module__}.{name}" if name else repr(spec)


class Tap:
    """Where a feature comes from: a layer of `model` (watched) or a function
    `fn(model, inputs)`."""

    def __init__(self, model, spec, role):
        self.model = model
        self.role = role
        self.spec = spec
        self.layer = None
        self.function = None
        if spec is None:
            self.layer = model
        elif isinstance(spec, str):
            self.layer = find_layer(model, spec, role)
        elif isinstance(spec, keras.layers.Layer):
            if spec is not model and spec not in _keras_internals.all_layers(model):
                raise ValueError(
                    f"The layer `{spec.name}` given for the {role} is not a "
                    f"layer of the {role} `{model.name}`. Pass one of its "
                    "layers, or its name."
                )
            self.layer = spec
        elif callable(spec):
            self.function = spec
            parameters = _positional_parameters(spec)
            if parameters is not None and parameters != 2:
                raise ValueError(
                    f"Expected the {role}'s feature function to take "
                    "`(model, inputs)` and return the feature. Received "
                    f"{describe(spec)} with {parameters} positional "
                    "parameters. For a layer of a subclassed model, pass the "
                    f"layer itself, e.g. `{role}.encoder.conv`."
                )
        else:
            raise ValueError(
                f"Expected the {role}'s layer as a name, a path through nested "
                'models such as "block2/conv", a layer, or a function '
                f"`fn(model, inputs)`. Received: {spec!r}"
            )
        if self.layer is not None:
            _watch(self.layer)

    @property
    def name(self):
        return describe(self.spec) or self.model.name

    def feature(self, recorded, inputs, check=False):
        """The feature, from a capture's records or from the function."""
        if self.function is not None:
            return self.function(self.model, inputs)
        outputs = recorded[id(self.layer)]
        if check:
            self.check_outputs(outputs)
        return outputs[-1]

    def check_outputs(self, outputs):
        where = f"The {self.role}'s layer `{self.name}`"
        if not outputs:
            raise ValueError(
                f"{where} did not run in the {self.role}'s forward pass. Pick "
                "a layer that computes the output, or pass a function "
                "`fn(model, inputs)` that returns the feature."
            )
        if len(outputs) > 1:
            raise ValueError(
                f"{where} runs {len(outputs)} times in one forward pass (a "
                "shared layer), so its feature is ambiguous. Pick a layer "
                "that runs once, or pass a function `fn(model, inputs)`."
            )
        if not ops.is_tensor(outputs[0]) and not hasattr(outputs[0], "shape"):
            raise ValueError(
                f"{where} returns {type(outputs[0]).__name__}, not one tensor. "
                "Pick a layer with one output, or pass a function "
                "`fn(model, inputs)` that returns the feature."
            )


def _positional_parameters(fn):
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    return sum(p.kind in kinds and p.default is p.empty for p in parameters)


def find_layer(model, path, role):
    """The layer at `path` ("name" or "outer/inner/name") inside `model`;
    raises, listing close matches, if there is none."""
    layer = model
    for part in path.split("/"):
        children = {child.name: child for child in _keras_internals.child_layers(layer)}
        if part in children:
            layer = children[part]
            continue
        paths = _paths(model)
        close = difflib.get_close_matches(path, paths, n=5, cutoff=0.5)
        close += [p for p in paths if p.split("/")[-1] == path and p not in close]
        hint = (
            f"Close matches: {', '.join(close)}."
            if close
            else f"Its layers: {', '.join(paths[:20])}"
            + (" ..." if len(paths) > 20 else ".")
        )
        raise ValueError(
            f"The {role} `{model.name}` has no layer {path!r}. {hint} Give a "
            'name, or a path through nested models such as "block2/conv".'
        )
    return layer


@keras.saving.register_keras_serializable(package="kd_keras")
class Adapter(keras.layers.Layer):
    """A learnable map from the student's feature to the teacher's width: a
    Dense layer on the channel axis, which for a convolutional feature is a
    1×1 convolution. It trains with the student and is kept by the
    Distiller, never by the student.

    Args:
        units: the teacher's channels.
        channel_axis: the features' channel axis (-1, or 1 for
            "channels_first" images).
    """

    def __init__(self, units, channel_axis=-1, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.units = int(units)
        self.channel_axis = int(channel_axis)

    def build(self, input_shape):
        channels = input_shape[self.channel_axis]
        self.kernel = self.add_weight(
            shape=(channels, self.units), initializer="glorot_uniform", name="kernel"
        )
        self.bias = self.add_weight(
            shape=(self.units,), initializer="zeros", name="bias"
        )

    def call(self, features):
        if self.channel_axis == -1:
            return ops.matmul(features, self.kernel) + self.bias
        features = ops.moveaxis(features, self.channel_axis, -1)
        outputs = ops.matmul(features, self.kernel) + self.bias
        return ops.moveaxis(outputs, -1, self.channel_axis)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        shape[self.channel_axis] = self.units
        return tuple(shape)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "channel_axis": self.channel_axis,
        }


def channel_axis(rank):
    """The channel axis of a feature of `rank`: 1 for "channels_first"
    images, else the last."""
    if rank >= 4 and keras.config.image_data_format() == "channels_first":
        return 1
    return -1


def positions(shape):
    """A feature's shape without its batch and channel axes."""
    axis = channel_axis(len(shape)) % len(shape)
    return tuple(size for index, size in enumerate(shape) if index not in (0, axis))
