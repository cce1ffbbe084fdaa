"""KerasHub task models, first-class: tiny, randomly initialised models built
from their configs (no presets, no network), on their own input dicts with
padding, distilled over their real tokens; cached, exported, and across
padded vocabularies."""

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import hub_models  # noqa: E402 (after the skip)
import tensorflow as tf  # noqa: E402

import kd_keras  # noqa: E402
from kd_keras import losses  # noqa: E402
from kd_keras.distiller import TEACHER_LOGITS_KEY  # noqa: E402

pytestmark = pytest.mark.all_backends

VOCABULARY, LENGTH, T = 64, 10, 2.0


def causal_lm(hidden, layers=1, vocabulary=VOCABULARY, seed=0):
    return hub_models.gpt2(
        hidden, vocabulary=vocabulary, length=LENGTH, layers=layers, seed=seed
    )


def text_classifier(hidden, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=2,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
        max_sequence_length=LENGTH,
        name="bert_backbone",
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )


def token_batch(rows=8, seed=0, vocabulary=VOCABULARY):
    """Token ids padded after a random length, and their padding mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, LENGTH + 1, rows)
    ids = rng.integers(1, vocabulary, (rows, LENGTH)).astype("int32")
    mask = np.arange(LENGTH) < lengths[:, None]
    ids[~mask] = 0
    return ids, mask


def lm_data(rows=8, seed=0, vocabulary=VOCABULARY):
    """`(x, y, sample_weight)` as KerasHub's causal LM preprocessor gives
    them: the next token is the label, weighed by whether it is real."""
    ids, mask = token_batch(rows, seed, vocabulary)
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return x, ids[:, 1:], mask[:, 1:].astype("float32")


def with_other_padding(x, seed=1):
    """The same inputs, other token ids where they are padding."""
    ids = x["token_ids"].copy()
    noise = np.random.default_rng(seed).integers(1, VOCABULARY, ids.shape)
    ids[~x["padding_mask"].astype(bool)] = noise[~x["padding_mask"].astype(bool)]
    return {**x, "token_ids": ids.astype("int32")}


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kd_per_token(t, s, temperature=T):
    log_p, log_q = log_softmax(t / temperature), log_softmax(s / temperature)
    return temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(-1)


def masked_mean(values, weights):
    return float((values * weights).sum() / weights.sum())


def numpy_logits(model, x):
    return keras.ops.convert_to_numpy(model(x)).astype("float64")


def evaluated(distiller, x, y, sample_weight=None):
    return distiller.evaluate(
        x, y, sample_weight=sample_weight, batch_size=64, verbose=0, return_dict=True
    )


def test_token_level_terms_are_means_over_the_real_tokens():
    teacher, student = causal_lm(16, layers=2, seed=1), causal_lm(8, seed=2)
    x, y, weights = lm_data()
    distiller = kd_keras.Distiller(
        teacher, student, temperature=T, distillation_weight=0.5
    )
    distiller.compile(optimizer="adam")
    t, s = numpy_logits(teacher, x), numpy_logits(student, x)
    cross_entropy = -np.take_along_axis(log_softmax(s), y[..., None], -1)[..., 0]
    logs = evaluated(distiller, x, y, weights)
    assert logs["distillation_loss"] == pytest.approx(
        masked_mean(kd_per_token(t, s), weights), rel=1e-4
    )
    assert logs["student_loss"] == pytest.approx(
        masked_mean(cross_entropy, weights), rel=1e-4
    )
    # Without sample weights, the inputs' padding mask weighs the tokens.
    unweighted = evaluated(distiller, x, y)
    assert unweighted["distillation_loss"] == pytest.approx(
        masked_mean(kd_per_token(t, s), x["padding_mask"]), rel=1e-4
    )


def test_padding_tokens_change_no_term_not_even_the_features():
    teacher, student = causal_lm(16, layers=2, seed=1), causal_lm(8, seed=2)
    layer = "gpt2_backbone/transformer_layer_0"
    distiller = kd_keras.Distiller(
        teacher,
        student,
        temperature=T,
        distillation_weight=0.5,
        losses=[losses.SoftTargets(), losses.FeatureHint(layer, layer)],
    )
    distiller.compile(optimizer="adam")
    x, y, weights = lm_data()
    before = evaluated(distiller, x, y, weights)
    after = evaluated(distiller, with_other_padding(x), y, weights)
    assert before["feature_hint_loss"] > 0
    for name in ("student_loss", "soft_targets_loss", "feature_hint_loss"):
        assert after[name] == pytest.approx(before[name], rel=1e-5), name


def test_a_text_classifiers_features_are_averaged_over_real_tokens():
    teacher, student = text_classifier(16, seed=1), text_classifier(8, seed=2)
    layer = "bert_backbone/transformer_layer_0"
    distiller = kd_keras.Distiller(
        teacher,
        student,
        losses=[losses.SoftTargets(), losses.FeatureHint(layer, layer)],
    )
    distiller.compile(optimizer="adam")
    ids, mask = token_batch()
    x = {"token_ids": ids, "padding_mask": mask, "segment_ids": np.zeros_like(ids)}
    y = np.arange(len(ids)) % 3
    before = evaluated(distiller, x, y)
    after = evaluated(distiller, with_other_padding(x), y)
    assert after["feature_hint_loss"] == pytest.approx(
        before["feature_hint_loss"], rel=1e-5
    )
    weights_before = [w.copy() for w in distiller.student.get_weights()]
    distiller.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert any(
        not np.allclose(a, b)
        for a, b in zip(weights_before, distiller.student.get_weights(), strict=True)
    )


def test_a_causal_lm_distils_with_the_language_model_losses_and_generates():
    teacher, student = causal_lm(16, layers=2, seed=1), causal_lm(8, seed=2)
    chosen = [
        losses.ReverseKL(),
        losses.GeneralizedJSD(beta=0.5),
        losses.SkewKL(alpha=0.1),
        losses.SkewReverseKL(alpha=0.1),
    ]
    distiller = kd_keras.Distiller(
        teacher, student, temperature=1.0, distillation_weight=1.0, losses=chosen
    )
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
    x, y, weights = lm_data(rows=16)
    t, s = numpy_logits(teacher, x), numpy_logits(student, x)
    log_p, log_q = log_softmax(t), log_softmax(s)
    reverse = (np.exp(log_q) * (log_q - log_p)).sum(-1)
    logs = evaluated(distiller, x, y, weights)
    assert logs["reverse_kl_loss"] == pytest.approx(
        masked_mean(reverse, weights), rel=1e-4
    )
    distiller.fit(x, y, sample_weight=weights, batch_size=8, epochs=5, verbose=0)
    after = evaluated(distiller, x, y, weights)
    assert after["distillation_loss"] < logs["distillation_loss"]
    prompt = {"token_ids": x["token_ids"][:2], "padding_mask": x["padding_mask"][:2]}
    generated = student.generate(prompt, max_length=LENGTH - 1, stop_token_ids=None)
    assert generated["token_ids"].shape == (2, LENGTH - 1)


def test_top_k_logits_of_a_large_vocabulary_cache_on_disk(tmp_path):
    vocabulary = 32_000
    teacher = causal_lm(8, vocabulary=vocabulary, seed=1)
    student = causal_lm(8, vocabulary=vocabulary, seed=2)
    x, y, weights = lm_data(rows=6, vocabulary=vocabulary)
    data = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(3)
    cached = kd_keras.cache_teacher_logits(
        teacher, data, directory=tmp_path, top_k=8, dtype="float16", shuffle=False
    )
    expected = numpy_logits(teacher, x)
    rows = 0
    for inputs, _, _ in cached:
        logits = np.asarray(inputs[TEACHER_LOGITS_KEY])
        want = expected[rows : rows + len(logits)]
        top = np.argsort(-want, axis=-1)[..., :8]
        np.testing.assert_allclose(
            np.take_along_axis(logits, top, -1),
            np.take_along_axis(want, top, -1),
            rtol=2e-3,
            atol=2e-3,
        )
        rows += len(logits)
    assert rows == 6
    stored = sum(path.stat().st_size for path in tmp_path.glob("*/logits-*.bin"))
    assert stored < expected.nbytes / 500  # 8 of 32,000 logits, and ids.
    distiller = kd_keras.Distiller(teacher, student, distillation_weight=1.0)
    distiller.compile(optimizer="adam")
    distiller.fit(cached, epochs=1, verbose=0)


@pytest.mark.tensorflow_only
def test_a_causal_lm_with_dict_inputs_exports_with_its_parity_check(tmp_path):
    student = causal_lm(8, seed=2)
    x, y, weights = lm_data(rows=12)
    report = kd_keras.export.export_student(
        student,
        tmp_path,
        formats=["saved_model", "tflite"],
        test_data=(x, y, weights),
        latency_repeats=2,
    )
    for fmt in ("saved_model", "tflite"):
        assert report[fmt]["max_abs_diff"] < 1e-4
        assert report[fmt]["argmax_agreement_percent"] == 100.0
    assert (tmp_path / "student.tflite").exists()
    # Accuracy over the real next tokens: the sample weights'.
    predicted = numpy_logits(student, x).argmax(-1)
    assert report["keras"]["accuracy"] == pytest.approx(
        float(((predicted == y) * weights).sum() / weights.sum())
    )


@pytest.mark.tensorflow_only
def test_a_text_classifier_with_three_named_inputs_exports(tmp_path):
    student = text_classifier(8, seed=2)
    ids, mask = token_batch()
    x = {"token_ids": ids, "padding_mask": mask, "segment_ids": np.zeros_like(ids)}
    report = kd_keras.export.export_student(
        student,
        tmp_path,
        formats=["saved_model", "tflite"],
        test_data=(x, np.arange(len(ids)) % 3),
        latency_repeats=2,
    )
    assert report["tflite"]["max_abs_diff"] < 1e-4


def test_a_step_traced_with_the_teacher_off_takes_a_padded_vocabulary(caplog):
    teacher = causal_lm(16, vocabulary=60, seed=1)
    student = causal_lm(8, vocabulary=64, seed=2)
    x, y, weights = lm_data(vocabulary=60)
    distiller = kd_keras.Distiller(teacher, student, distillation_weight=0.0)
    distiller.compile(optimizer="adam")
    distiller.distillation_weight = 0.5  # The step was traced with λ = 0.
    logs = evaluated(distiller, x, y, weights)
    t, s = numpy_logits(teacher, x), numpy_logits(student, x)
    assert logs["distillation_loss"] == pytest.approx(
        masked_mean(kd_per_token(t, s[..., :60]), weights), rel=1e-3
    )


def test_a_per_sequence_label_loss_takes_no_token_weights():
    def per_sequence(y, logits):
        losses = keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True
        )
        return keras.ops.mean(losses, axis=-1)

    teacher, student = causal_lm(16, seed=1), causal_lm(8, seed=2)
    x, y, _ = lm_data()
    distiller = kd_keras.Distiller(teacher, student, student_loss=per_sequence)
    distiller.compile(optimizer="adam")
    logs = evaluated(distiller, x, y)
    s = numpy_logits(student, x)
    cross_entropy = -np.take_along_axis(log_softmax(s), y[..., None], -1)[..., 0]
    assert logs["student_loss"] == pytest.approx(cross_entropy.mean(), rel=1e-4)


def test_vocabularies_that_differ_by_padding_distil_over_the_shared_ids():
    teacher = causal_lm(16, vocabulary=60, seed=1)  # 60 ids ...
    student = causal_lm(8, vocabulary=64, seed=2)  # ... padded to 64 logits.
    x, y, weights = lm_data(vocabulary=60)
    # The KD term of two untrained models is small (about 1e-3): float32's
    # rounding of their log-softmaxes is 1e-4 of it.
    t, s = numpy_logits(teacher, x), numpy_logits(student, x)
    expected = masked_mean(kd_per_token(t, s[..., :60]), weights)
    for shared in (None, 60):
        distiller = kd_keras.Distiller(
            teacher, student, temperature=T, shared_vocabulary=shared
        )
        distiller.compile(optimizer="adam")
        logs = evaluated(distiller, x, y, weights)
        assert logs["distillation_loss"] == pytest.approx(expected, rel=1e-3)
    # Fewer shared ids, by the argument: the logits beyond them are left out.
    distiller = kd_keras.Distiller(
        teacher, student, temperature=T, shared_vocabulary=50
    )
    distiller.compile(optimizer="adam")
    logs = evaluated(distiller, x, y, weights)
    assert logs["distillation_loss"] == pytest.approx(
        masked_mean(kd_per_token(t[..., :50], s[..., :50]), weights), rel=1e-3
    )


@pytest.mark.parametrize(
    "vocabularies, shared, error",
    [
        ((64, 100), None, r"teacher gives 64 logits per token and the student 100"),
        ((64, 100), None, r"shared_vocabulary=N.*different tokenizers"),
        ((60, 64), 62, r"shared_vocabulary=62.*more than the logits hold"),
        ((60, 64), 0, r"shared_vocabulary=0"),
    ],
)
def test_other_vocabulary_mismatches_are_refused_before_work(
    vocabularies, shared, error
):
    teacher = causal_lm(8, vocabulary=vocabularies[0], seed=1)
    student = causal_lm(8, vocabulary=vocabularies[1], seed=2)
    with pytest.raises(ValueError, match=error):
        kd_keras.Distiller(teacher, student, shared_vocabulary=shared)
