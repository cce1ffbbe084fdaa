"""Tiny, randomly initialised KerasHub models built from their configs (no
presets, no network), for the tests that need them."""

import keras


def gpt2(hidden, *, vocabulary, length, layers=1, seed=0):
    """A GPT-2 causal LM without preprocessor, its backbone named
    "gpt2_backbone" so that feature paths name teacher and student alike."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary,
        num_layers=layers,
        num_heads=2,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
        max_sequence_length=length,
        name="gpt2_backbone",
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
