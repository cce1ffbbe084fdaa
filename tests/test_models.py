import keras
import numpy as np
import pytest

from kd_keras import models


def test_mlp_has_the_requested_hidden_layers_and_emits_logits():
    model = models.mlp((1200, 1200))
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [1200, 1200, 10]
    assert dense[-1].activation.__name__ == "linear"
    assert model.output_shape == (None, 10)
    assert model.count_params() == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 12010


def test_mlp_regularisation_of_hintons_teacher():
    model = models.mlp((64,), dropout=0.5, input_dropout=0.2, max_norm=4.0)
    rates = [
        layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)
    ]
    assert rates == [0.2, 0.5]
    hidden = model.layers[2]
    assert isinstance(hidden.kernel_constraint, keras.constraints.MaxNorm)


def test_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dropout"):
        models.mlp((8,), dropout=1.0)
    with pytest.raises(ValueError, match="hidden"):
        models.mlp((0,))


@pytest.mark.parametrize("depth", models.PLAIN_CNN_DEPTHS)
def test_plain_cnn_has_depth_conv_layers_and_emits_logits(depth):
    model = models.plain_cnn(depth, width=0.25)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == depth
    assert model.output_shape == (None, 10)
    logits = model.predict(np.random.rand(2, 28, 28, 1), verbose=0)
    assert logits.shape == (2, 10)


def test_plain_cnn_widths_follow_the_ladder_and_the_multiplier():
    convs = [
        layer.filters
        for layer in models.plain_cnn(10).layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    assert convs == [32, 32, 64, 64, 128, 128, 256, 256, 256, 256]
    half = [
        layer.filters
        for layer in models.plain_cnn(10, width=0.5).layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    assert half == [c // 2 for c in convs]


def test_larger_plain_cnns_have_more_parameters():
    sizes = [
        models.plain_cnn(d, width=0.25).count_params() for d in models.PLAIN_CNN_DEPTHS
    ]
    assert sizes == sorted(sizes)


def test_plain_cnn_rejects_an_unknown_depth():
    with pytest.raises(ValueError, match="depth"):
        models.plain_cnn(3)
