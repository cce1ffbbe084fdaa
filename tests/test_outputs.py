"""Logits of any rank (sequences) and single-logit (binary) outputs."""

import keras
import numpy as np
import pytest

import kd_keras

pytestmark = pytest.mark.all_backends

TIME, CLASSES = 4, 4  # As many steps as classes: shapes alone cannot tell.
SEQUENCE_FEATURES = 8


def sequence_model(units, seed, classes=CLASSES, masking=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((TIME, SEQUENCE_FEATURES))]
    if masking:
        layers.append(keras.layers.Masking(0.0))
    layers += [
        keras.layers.Dense(units, activation="relu"),
        keras.layers.Dense(classes),
    ]
    return keras.Sequential(layers)


def sequence_data(rows=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, TIME, SEQUENCE_FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=(rows, TIME)).astype("int32")
    return x, y


def distiller_for(teacher, student, **kwargs):
    distiller = kd_keras.Distiller(teacher, student, **kwargs)
    distiller.compile("sgd")
    return distiller


def evaluated(teacher, student, x, y, sample_weight=None, **settings):
    """A Distiller's evaluation logs, and the teacher's and student's
    logits."""
    distiller = distiller_for(teacher, student, **settings)
    logs = evaluate(distiller, x, y, sample_weight=sample_weight)
    return logs, logits_of(teacher, x), logits_of(student, x)


def logits_of(model, x):
    return np.asarray(model.predict(x, verbose=0), "float64")


def evaluate(distiller, x, y, **kwargs):
    return distiller.evaluate(
        x, y, batch_size=len(x), return_dict=True, verbose=0, **kwargs
    )


def assert_logged_terms(logs, label, kd, weight=None, rel=1e-5):
    """The logged terms (and total, given λ) against NumPy references."""
    assert logs["student_loss"] == pytest.approx(label, rel=rel)
    assert logs["distillation_loss"] == pytest.approx(kd, rel=rel)
    if weight is not None:
        assert logs["loss"] == pytest.approx(
            (1 - weight) * label + weight * kd, rel=rel
        )


# Sequences.


def test_integer_sequence_labels_give_per_token_means_of_both_terms(reference):
    x, y = sequence_data()
    logs, t, s = evaluated(
        sequence_model(16, 1),
        sequence_model(8, 2),
        x,
        y,
        temperature=2.0,
        distillation_weight=0.6,
    )
    assert_logged_terms(
        logs,
        reference.token_cross_entropy(s, y).mean(),
        reference.per_position_kd(t, s, 2.0).mean(),
        weight=0.6,
    )


def test_one_hot_sequence_labels_give_the_same_loss():
    x, y = sequence_data()
    sparse = evaluate(distiller_for(sequence_model(16, 1), sequence_model(8, 2)), x, y)
    one_hot = evaluate(
        distiller_for(sequence_model(16, 1), sequence_model(8, 2)),
        x,
        keras.utils.to_categorical(y, CLASSES),
    )
    assert one_hot["loss"] == pytest.approx(sparse["loss"], rel=1e-5)


def test_sample_weights_per_token_weigh_both_terms(reference):
    x, y = sequence_data()
    weights = np.ones((len(x), TIME), "float32")
    weights[:, 2:] = 0.0  # Padding.
    logs, t, s = evaluated(
        sequence_model(16, 1),
        sequence_model(8, 2),
        x,
        y,
        sample_weight=weights,
        temperature=3.0,
        distillation_weight=0.5,
    )
    # Means over the real tokens: weighted sums over the weights' sum.
    real = weights.sum()
    assert_logged_terms(
        logs,
        (reference.token_cross_entropy(s, y) * weights).sum() / real,
        (reference.per_position_kd(t, s, 3.0) * weights).sum() / real,
    )


def test_keras_masking_leaves_padded_tokens_out_of_both_terms(reference):
    x, y = sequence_data()
    x[:, 3:] = 0.0  # The last step is padding, masked by `Masking`.
    logs, t, s = evaluated(
        sequence_model(16, 1, masking=True),
        sequence_model(8, 2, masking=True),
        x,
        y,
        temperature=2.0,
        distillation_weight=0.5,
    )
    assert_logged_terms(
        logs,
        reference.token_cross_entropy(s, y)[:, :3].mean(),
        reference.per_position_kd(t, s, 2.0)[:, :3].mean(),
    )


def test_sequence_distillation_trains_on_cached_logits():
    x, y = sequence_data(32)
    teacher, student = sequence_model(16, 1), sequence_model(8, 2)
    before = [w.copy() for w in student.get_weights()]
    cached = kd_keras.cache_teacher_logits(teacher, (x, y), batch_size=8)
    distiller = distiller_for(teacher, student)
    history = distiller.fit(cached, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert not np.allclose(before[0], student.get_weights()[0])


def test_sequence_labels_of_the_wrong_length_raise():
    x, y = sequence_data()
    distiller = distiller_for(sequence_model(16, 1), sequence_model(8, 2))
    with pytest.raises(ValueError, match=r"labels of shape \(batch, 4\)"):
        distiller.fit(x, y[:, :3], verbose=0)


def test_sequence_labels_out_of_range_raise():
    x, y = sequence_data()
    distiller = distiller_for(sequence_model(16, 1), sequence_model(8, 2))
    with pytest.raises(ValueError, match=r"labels in \[0, 4\)"):
        distiller.fit(x, y + CLASSES, verbose=0)


# One logit: binary classifiers.


@pytest.fixture(scope="session")
def binary_model(tiny_mlp):
    def binary_model(units, seed):
        return tiny_mlp(units, seed=seed, num_classes=1)

    return binary_model


@pytest.fixture(scope="session")
def binary_data(features):
    def binary_data(rows=32):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(rows, features)).astype("float32")
        return x, (x[:, 0] > 0).astype("float32")

    return binary_data


def test_one_logit_distils_binary_soft_targets(binary_data, binary_model, reference):
    x, y = binary_data()
    logs, t, s = evaluated(
        binary_model(16, 1),
        binary_model(8, 2),
        x,
        y,
        temperature=2.0,
        distillation_weight=0.9,
    )
    kd = reference.per_position_kd(t, s, 2.0).mean()
    assert kd > 0.01  # Not the constant 0 of a softmax over one logit.
    assert_logged_terms(
        logs, reference.binary_cross_entropy(s, y).mean(), kd, weight=0.9, rel=1e-4
    )


def test_binary_student_moves_towards_the_teacher(binary_data, binary_model):
    x, y = binary_data(64)
    teacher, student = binary_model(16, 1), binary_model(8, 2)
    distiller = kd_keras.Distiller(
        teacher, student, distillation_weight=1.0, temperature=1.0
    )
    distiller.compile(keras.optimizers.Adam(0.01))
    before = evaluate(distiller, x, y)["distillation_loss"]
    distiller.fit(x, y, batch_size=16, epochs=5, verbose=0)
    assert evaluate(distiller, x, y)["distillation_loss"] < before / 2


def test_binary_labels_outside_zero_one_raise(binary_data, binary_model):
    x, y = binary_data()
    distiller = distiller_for(binary_model(16, 1), binary_model(8, 2))
    with pytest.raises(ValueError, match="binary classifier"):
        distiller.fit(x, y + 1.0, verbose=0)


def test_binary_sequences_weigh_and_mask_tokens_not_examples(reference):
    # As many sequences as steps, so that mixing the axes cannot pass.
    x, y = sequence_data(rows=TIME)
    y = (y % 2).astype("float32")
    x[:, 3:] = 0.0  # Masked by `Masking`.
    weights = np.ones((TIME, TIME), "float32")
    weights[:, 0] = 0.5
    logs, t, s = evaluated(
        sequence_model(16, 1, classes=1, masking=True),
        sequence_model(8, 2, classes=1, masking=True),
        x,
        y,
        sample_weight=weights,
        temperature=2.0,
        distillation_weight=0.5,
    )
    p = 1 / (1 + np.exp(-s[..., 0]))
    label = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    kd = reference.per_position_kd(t, s, 2.0)
    valid = (weights * (np.arange(TIME) < 3))[..., :]
    # A weighted mean over the unmasked tokens.
    count = valid.sum()
    assert_logged_terms(
        logs, (label * valid).sum() / count, (kd * valid).sum() / count, weight=0.5
    )


def test_a_label_loss_that_ignores_a_class_leaves_those_tokens_out_of_both(reference):
    x, y = sequence_data()
    y[:, -1] = -1  # Padding, ignored by the label loss.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    distiller = kd_keras.Distiller(
        sequence_model(16, 1),
        sequence_model(8, 2),
        temperature=2.0,
        distillation_weight=0.5,
        student_loss=loss,
    )
    distiller.compile("sgd")
    logs = evaluate(distiller, x, y)
    t, s = logits_of(distiller.teacher, x), logits_of(distiller.student, x)
    assert_logged_terms(
        logs,
        reference.token_cross_entropy(s[:, :-1], y[:, :-1]).mean(),
        reference.per_position_kd(t, s, 2.0)[:, :-1].mean(),
        weight=0.5,
    )


def test_one_weight_per_sequence_weighs_all_its_tokens(reference):
    x, y = sequence_data(rows=TIME)  # As many sequences as steps.
    weights = np.array([1.0, 0.0, 2.0, 0.5], "float32")
    logs, t, s = evaluated(
        sequence_model(16, 1),
        sequence_model(8, 2),
        x,
        y,
        sample_weight=weights,
        temperature=3.0,
        distillation_weight=0.5,
    )
    per_token = weights[:, None] * np.ones((TIME, TIME))
    assert_logged_terms(
        logs,
        (reference.token_cross_entropy(s, y) * per_token).sum() / per_token.sum(),
        (reference.per_position_kd(t, s, 3.0) * per_token).sum() / per_token.sum(),
    )


def test_accuracy_of_a_binary_student_reads_its_logits(binary_data, binary_model):
    x, y = binary_data()
    distiller = kd_keras.Distiller(binary_model(16, 1), binary_model(8, 2))
    distiller.compile("sgd", metrics=["accuracy"])
    logs = evaluate(distiller, x, y)
    s = logits_of(distiller.student, x)[:, 0]
    expected = np.mean((s > 0) == (y > 0.5))
    assert logs["accuracy"] == pytest.approx(expected)
    batches = kd_keras.data.ArrayBatches(x, y.astype("int32"), batch_size=8)
    assert kd_keras.training.test_accuracy(distiller.student, batches) == (
        pytest.approx(expected)
    )


def test_one_weight_per_sequence_with_masking(reference):
    x, y = sequence_data(rows=TIME)
    x[:, 3:] = 0.0
    weights = np.array([1.0, 0.0, 2.0, 0.5], "float32")
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    distiller = kd_keras.Distiller(
        sequence_model(16, 1, masking=True),
        sequence_model(8, 2, masking=True),
        temperature=2.0,
        distillation_weight=0.5,
        student_loss=loss,
    )
    distiller.compile("sgd")
    for shape in ((TIME,), (TIME, 1)):
        logs = evaluate(distiller, x, y, sample_weight=weights.reshape(shape))
        t, s = logits_of(distiller.teacher, x), logits_of(distiller.student, x)
        per_token = weights[:, None] * (np.arange(TIME) < 3)
        # A weighted mean over the unmasked tokens.
        assert_logged_terms(
            logs,
            (reference.token_cross_entropy(s, y) * per_token).sum() / per_token.sum(),
            (reference.per_position_kd(t, s, 2.0) * per_token).sum() / per_token.sum(),
        )


def test_sample_weights_that_fit_no_position_raise():
    x, y = sequence_data()
    distiller = distiller_for(sequence_model(16, 1), sequence_model(8, 2))
    with pytest.raises(ValueError, match="one weight per example"):
        evaluate(distiller, x, y, sample_weight=np.ones((len(x), TIME + 1)))


class SubclassedBinary(keras.Model):
    def __init__(self, units):
        super().__init__()
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.out = keras.layers.Dense(1)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def test_accuracy_of_a_subclassed_binary_student_reads_its_logits(
    binary_data, binary_model
):
    x, y = binary_data()
    keras.utils.set_random_seed(2)
    student = SubclassedBinary(8)
    student(x[:2])
    distiller = kd_keras.Distiller(binary_model(16, 1), student)
    distiller.compile("sgd", metrics=["Accuracy"])
    logs = evaluate(distiller, x, y)
    s = logits_of(student, x)[:, 0]
    assert logs["Accuracy"] == pytest.approx(np.mean((s > 0) == (y > 0.5)))
