import keras
import numpy as np
import pytest

import kd_keras

pytestmark = pytest.mark.all_backends


def random_logits(seed, shape=(5, 7), scale=3.0):
    return np.random.default_rng(seed).normal(scale=scale, size=shape)


def test_softmax_with_temperature_matches_numpy(reference):
    logits = random_logits(0)
    expected = np.exp(reference.log_softmax(logits / 2.5))
    got = kd_keras.softmax_with_temperature(logits.astype("float32"), 2.5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_higher_temperature_gives_softer_distribution():
    logits = np.array([[4.0, 1.0, -2.0]], "float32")
    sharp = np.asarray(kd_keras.softmax_with_temperature(logits, 1.0))
    soft = np.asarray(kd_keras.softmax_with_temperature(logits, 10.0))
    assert soft.max() < sharp.max()


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_distillation_loss_matches_numpy_reference(reference, temperature):
    t, s = random_logits(1), random_logits(2)
    got = kd_keras.distillation_loss(
        t.astype("float32"), s.astype("float32"), temperature
    )
    assert float(got) == pytest.approx(
        reference.distillation_loss(t, s, temperature), rel=1e-5
    )


def test_distillation_loss_gives_true_kl_on_the_reference_example():
    # keras.distillation's default returns 0.9025 here (KL on raw logits).
    got = kd_keras.distillation_loss([[2.0, 1.0, 0.1]], [[0.5, 1.5, -1.0]], 4.0)
    assert float(got) == pytest.approx(0.4023, abs=1e-4)


def test_distillation_loss_gradient_is_t_times_q_minus_p_over_batch(
    gradient, reference
):
    temperature, t, s = 3.0, random_logits(3), random_logits(4)
    got = gradient(
        lambda student: kd_keras.distillation_loss(
            t.astype("float32"), student, temperature
        ),
        s,
    )
    p = np.exp(reference.log_softmax(t / temperature))
    q = np.exp(reference.log_softmax(s / temperature))
    expected = temperature * (q - p) / len(s)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_high_temperature_limit_is_logit_matching(gradient):
    # With zero-mean logits, T²·KL → mean over the batch of ‖s − t‖² / (2N),
    # and its gradient → (s − t) / (N · batch).
    temperature = 1000.0
    t, s = random_logits(5), random_logits(6)
    t -= t.mean(axis=-1, keepdims=True)
    s -= s.mean(axis=-1, keepdims=True)
    batch, classes = s.shape

    def loss(student):
        return kd_keras.distillation_loss(t.astype("float32"), student, temperature)

    matching = ((s - t) ** 2).sum(axis=-1).mean() / (2 * classes)
    assert float(loss(s.astype("float32"))) == pytest.approx(matching, rel=2e-2)
    np.testing.assert_allclose(
        gradient(loss, s), (s - t) / (classes * batch), rtol=2e-2, atol=1e-5
    )


def test_distillation_loss_is_finite_for_huge_logits():
    t = np.array([[1e4, -1e4, 0.0]], "float32")
    s = np.array([[-1e4, 1e4, 0.0]], "float32")
    loss = float(kd_keras.distillation_loss(t, s, 1.0))
    assert np.isfinite(loss)
    assert loss == pytest.approx(2e4, rel=1e-3)


def test_distillation_loss_is_float32_for_float16_logits(reference):
    t, s = random_logits(7, scale=2.0), random_logits(8, scale=2.0)
    got = kd_keras.distillation_loss(
        keras.ops.convert_to_tensor(t, "float16"),
        keras.ops.convert_to_tensor(s, "float16"),
        4.0,
    )
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    expected = reference.distillation_loss(
        t.astype("float16").astype("float64"),
        s.astype("float16").astype("float64"),
        4.0,
    )
    assert float(got) == pytest.approx(expected, rel=1e-4)


def test_distillation_loss_weights_examples_and_divides_by_batch_size(reference):
    t, s = random_logits(9, (4, 3)), random_logits(10, (4, 3))
    weights = np.array([1.0, 0.0, 2.0, 0.5], "float32")
    per_example = [
        reference.distillation_loss(t[i : i + 1], s[i : i + 1], 2.0) for i in range(4)
    ]
    got = kd_keras.distillation_loss(
        t.astype("float32"), s.astype("float32"), 2.0, sample_weight=weights
    )
    assert float(got) == pytest.approx(np.dot(weights, per_example) / 4, rel=1e-5)


@pytest.mark.parametrize("temperature", [0, -1.0, "4"])
def test_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        kd_keras.distillation_loss([[1.0, 0.0]], [[0.0, 1.0]], temperature)


def test_logits_of_different_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        kd_keras.distillation_loss([[1.0, 0.0]], [[0.0, 1.0, 2.0]], 2.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.ops.convert_to_tensor(0.0),
        lambda: keras.Variable(0.0),
        lambda: np.float32(-1.0),
    ],
)
def test_a_zero_temperature_tensor_or_variable_raises(make):
    with pytest.raises(ValueError, match="temperature"):
        kd_keras.distillation_loss([[1.0, 0.0]], [[0.0, 1.0]], make())
    with pytest.raises(ValueError, match="temperature"):
        kd_keras.softmax_with_temperature([[1.0, 0.0]], make())


def test_a_temperature_variable_is_read_at_every_call(reference):
    temperature = keras.Variable(2.0)
    t, s = random_logits(11), random_logits(12)
    first = float(kd_keras.distillation_loss(t, s, temperature))
    temperature.assign(5.0)
    second = float(kd_keras.distillation_loss(t, s, temperature))
    assert first == pytest.approx(reference.distillation_loss(t, s, 2.0), rel=1e-5)
    assert second == pytest.approx(reference.distillation_loss(t, s, 5.0), rel=1e-5)


def test_sequence_loss_is_the_mean_over_every_token(reference):
    t, s = random_logits(13, (3, 5, 4)), random_logits(14, (3, 5, 4))
    got = float(kd_keras.distillation_loss(t, s, 2.0))
    per_token = reference.per_position_kd(t, s, 2.0)
    assert per_token.shape == (3, 5)
    assert got == pytest.approx(per_token.mean(), rel=1e-5)


def test_sequence_sample_weights_weigh_each_token(reference):
    t, s = random_logits(15, (2, 4, 3)), random_logits(16, (2, 4, 3))
    weights = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], "float32")
    got = float(kd_keras.distillation_loss(t, s, 3.0, sample_weight=weights))
    per_token = reference.per_position_kd(t, s, 3.0)
    # A mean over the real tokens: the weighted sum over the weights' sum.
    assert got == pytest.approx((per_token * weights).sum() / 5, rel=1e-5)


def test_one_logit_is_a_binary_classifier(reference):
    t, s = random_logits(17, (6, 1)), random_logits(18, (6, 1))
    got = float(kd_keras.distillation_loss(t, s, 2.0))
    assert got > 0.0
    assert got == pytest.approx(reference.distillation_loss(t, s, 2.0), rel=1e-5)
    probabilities = kd_keras.softmax_with_temperature(t.astype("float32"), 2.0)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-t / 2.0)), rtol=1e-5)


def test_binary_gradient_is_t_times_q_minus_p_over_batch(gradient):
    temperature, t, s = (2.0, random_logits(19, (5, 1)), random_logits(20, (5, 1)))
    got = gradient(
        lambda student: kd_keras.distillation_loss(
            t.astype("float32"), student, temperature
        ),
        s,
    )
    p = 1 / (1 + np.exp(-t / temperature))
    q = 1 / (1 + np.exp(-s / temperature))
    np.testing.assert_allclose(
        got, temperature * (q - p) / len(s), rtol=1e-4, atol=1e-7
    )
