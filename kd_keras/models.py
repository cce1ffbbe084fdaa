"""The model families of the papers, all emitting logits."""

import numbers

import keras
from keras import layers

from kd_keras import _checks

MNIST_SHAPE = (28, 28, 1)

# The plain CNN ladder of Mirzadeh et al. (2020), by depth: conv widths with
# "P" for a 2×2 max-pool, then the hidden fully connected widths.
_PLAIN_CNN = {
    2: ([16, "P", 16, "P"], []),
    4: ([16, 16, "P", 32, 32, "P"], []),
    6: ([16, 16, "P", 32, 32, "P", 64, 64, "P"], []),
    8: ([16, 16, "P", 32, 32, "P", 64, 64, "P", 128, 128, "P"], [64]),
    10: ([32, 32, "P", 64, 64, "P", 128, 128, "P", 256, 256, 256, 256, "P"], [128]),
}
PLAIN_CNN_DEPTHS = tuple(sorted(_PLAIN_CNN))


def _iterable(value):
    try:
        return list(value)
    except TypeError:
        return [None]


def _widths_example(hidden):
    """`(800, 800)` for "800,800", `(800,)` for 800: what the user meant."""
    try:
        parts = str(hidden).replace(" ", "").strip("()[]").split(",")
        widths = tuple(int(part) for part in parts if part)
    except ValueError:
        return "(800, 800)"
    return repr(widths) if widths else "(800, 800)"


def mlp(
    hidden=(1200, 1200),
    dropout=0.0,
    input_dropout=0.0,
    max_norm=None,
    input_shape=MNIST_SHAPE,
    num_classes=10,
    activation="relu",
    name=None,
):
    """Returns a multilayer perceptron that outputs logits.

    Hinton et al. (2015) used this family on MNIST: the teacher is
    784-1200-1200-10 with dropout (0.2 on the inputs, 0.5 on hidden units) and
    a max-norm constraint on each unit's incoming weights; the student is
    784-800-800-10 with no regularisation. Inputs are flattened first, so
    images can be fed as they are.

    Args:
        hidden: widths of the hidden layers.
        dropout: dropout rate after each hidden layer.
        input_dropout: dropout rate on the inputs.
        max_norm: if set, the largest L2 norm of each unit's incoming weights.
        input_shape: shape of one example.
        num_classes: number of logits.
        activation: hidden activation.
        name: model name; defaults to e.g. `"mlp_800x800"`.

    Returns:
        A built `keras.Sequential`.

    Example:

        >>> teacher = mlp((1200, 1200), dropout=0.5, input_dropout=0.2, max_norm=4.0)
        >>> student = mlp((800, 800))
    """
    widths = _iterable(hidden)
    if isinstance(hidden, (str, numbers.Number)) or not all(
        isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 1
        for w in widths
    ):
        example = _widths_example(hidden)
        raise ValueError(
            "Expected `hidden` to be a sequence of layer widths, positive "
            f"integers such as {example}. Received: hidden={hidden!r}"
        )
    hidden = tuple(int(w) for w in widths)
    _checks.check_positive_int(num_classes, "num_classes")
    for rate, label in ((dropout, "dropout"), (input_dropout, "input_dropout")):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Expected `{label}` in [0, 1). Received: {label}={rate}")
    constraint = keras.constraints.MaxNorm(max_norm) if max_norm else None
    stack = [keras.Input(shape=tuple(input_shape)), layers.Flatten()]
    if input_dropout:
        stack.append(layers.Dropout(input_dropout))
    for width in hidden:
        stack.append(
            layers.Dense(width, activation=activation, kernel_constraint=constraint)
        )
        if dropout:
            stack.append(layers.Dropout(dropout))
    stack.append(layers.Dense(num_classes, name="logits"))
    default = "mlp_" + ("x".join(map(str, hidden)) if hidden else "linear")
    return keras.Sequential(stack, name=name or default)


def hinton_teacher(input_shape=MNIST_SHAPE, num_classes=10, name="teacher"):
    """Returns Hinton et al.'s MNIST teacher: 2×1200 ReLU with dropout.

    Dropout 0.2 on the inputs and 0.5 on the hidden units, and a max-norm
    constraint (4.0) on each unit's incoming weights; train it on inputs
    jittered by up to 2 pixels (`kd_keras.data.jitter`).
    """
    return mlp(
        (1200, 1200),
        dropout=0.5,
        input_dropout=0.2,
        max_norm=4.0,
        input_shape=input_shape,
        num_classes=num_classes,
        name=name,
    )


def plain_cnn(depth, width=1.0, input_shape=MNIST_SHAPE, num_classes=10, name=None):
    """Returns a plain CNN of the teacher-assistant ladder, emitting logits.

    Mirzadeh et al. (2020) distil along a ladder of plain CNNs of depth 10,
    8, 6, 4 and 2, where each conv is 3×3 with BatchNorm and ReLU and each
    pool is a 2×2 max-pool:

    - depth 2: C16 P C16 P FC10
    - depth 4: C16 C16 P C32 C32 P FC10
    - depth 6: … C64 C64 P FC10
    - depth 8: … C128 C128 P FC64 FC10
    - depth 10: C32 C32 P C64 C64 P C128 C128 P C256×4 P FC128 FC10

    Args:
        depth: one of 2, 4, 6, 8, 10: the number of conv layers.
        width: multiplier of every conv and hidden width, so the ladder fits a
            CPU (e.g. 0.25).
        input_shape: shape of one image, `(height, width, channels)`.
        num_classes: number of logits.
        name: model name; defaults to e.g. `"plain_cnn_4"`.

    Returns:
        A built `keras.Sequential`.

    Example:

        >>> ladder = {d: plain_cnn(d, width=0.25) for d in (10, 8, 6, 4, 2)}
    """
    if depth not in _PLAIN_CNN:
        raise ValueError(
            f"Expected `depth` in {PLAIN_CNN_DEPTHS}. Received: depth={depth!r}"
        )
    if not width > 0:
        raise ValueError(f"Expected `width` > 0. Received: width={width}")
    _checks.check_positive_int(num_classes, "num_classes")
    if len(tuple(input_shape)) != 3:
        raise ValueError(
            "A plain CNN takes images, of shape (height, width, channels) such "
            f"as {MNIST_SHAPE}. Received: input_shape={tuple(input_shape)}. "
            "Reshape flat inputs to images, or use `mlp` for vectors."
        )
    convs, dense = _PLAIN_CNN[depth]
    stack = [keras.Input(shape=tuple(input_shape))]
    for item in convs:
        if item == "P":
            stack.append(layers.MaxPooling2D(2, padding="same"))
            continue
        stack += [
            layers.Conv2D(
                max(1, round(item * width)), 3, padding="same", use_bias=False
            ),
            # PyTorch's default momentum, as in the paper's code; Keras'
            # 0.99 leaves the inference statistics stale after short runs.
            layers.BatchNormalization(momentum=0.9),
            layers.ReLU(),
        ]
    stack.append(layers.Flatten())
    for units in dense:
        stack.append(layers.Dense(max(1, round(units * width)), activation="relu"))
    stack.append(layers.Dense(num_classes, name="logits"))
    return keras.Sequential(stack, name=name or f"plain_cnn_{depth}")
