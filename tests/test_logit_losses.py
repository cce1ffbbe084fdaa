"""The logit losses against NumPy references, values and gradients, and the
Distiller that combines them."""

import keras
import numpy as np
import pytest

import kd_keras
from kd_keras import losses

pytestmark = pytest.mark.all_backends

T = 3.0


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def soft_targets(t, s, labels=None, temperature=T):
    return temperature**2 * kl(softmax(t / temperature), softmax(s / temperature))


def standardized(z):
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)


def logit_standardization(t, s, labels=None, temperature=T):
    return soft_targets(standardized(t), standardized(s), temperature=temperature)


def decoupled_kd(t, s, labels, temperature=T, alpha=1.0, beta=8.0):
    """Zhao et al.'s formulas written out, as mdistiller computes them."""
    p, q = softmax(t / temperature), softmax(s / temperature)
    target = np.eye(t.shape[-1], dtype=bool)[labels]
    binary_p = np.stack([p[target], p[~target].reshape(len(t), -1).sum(-1)], -1)
    binary_q = np.stack([q[target], q[~target].reshape(len(t), -1).sum(-1)], -1)
    rest_t = t[~target].reshape(len(t), -1)
    rest_s = s[~target].reshape(len(t), -1)
    nckd = kl(softmax(rest_t / temperature), softmax(rest_s / temperature))
    return temperature**2 * (alpha * kl(binary_p, binary_q) + beta * nckd)


def pearson(a, b, axis):
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    return (a * b).sum(axis) / (
        np.sqrt((a * a).sum(axis)) * np.sqrt((b * b).sum(axis)) + 1e-8
    )


def dist(t, s, labels=None, temperature=T, beta=1.0, gamma=1.0):
    """Huang et al.'s loss: returns the batch's value, repeated per row."""
    y_t, y_s = softmax(t / temperature), softmax(s / temperature)
    inter = 1 - pearson(y_s, y_t, axis=1)
    intra = 1 - pearson(y_s, y_t, axis=0).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def reverse_kl(t, s, labels=None, temperature=T):
    return temperature**2 * kl(softmax(s / temperature), softmax(t / temperature))


def generalized_jsd(beta):
    """GKD's divergence as the paper writes it (TRL's endpoints)."""

    def loss(t, s, labels=None, temperature=T):
        p, q = softmax(t / temperature), softmax(s / temperature)
        if beta == 0:
            return temperature**2 * kl(p, q)
        if beta == 1:
            return temperature**2 * kl(q, p)
        m = beta * p + (1 - beta) * q
        return temperature**2 * (beta * kl(p, m) + (1 - beta) * kl(q, m))

    return loss


def skew_kl(alpha):
    def loss(t, s, labels=None, temperature=T):
        p, q = softmax(t / temperature), softmax(s / temperature)
        return temperature**2 * kl(p, alpha * p + (1 - alpha) * q)

    return loss


def skew_reverse_kl(alpha):
    def loss(t, s, labels=None, temperature=T):
        p, q = softmax(t / temperature), softmax(s / temperature)
        return temperature**2 * kl(q, (1 - alpha) * p + alpha * q)

    return loss


REFERENCES = {
    "SoftTargets": (losses.SoftTargets(), soft_targets),
    "LogitStandardization": (losses.LogitStandardization(), logit_standardization),
    "DecoupledKD": (losses.DecoupledKD(), decoupled_kd),
    "DIST": (losses.DIST(), dist),
    "ReverseKL": (losses.ReverseKL(), reverse_kl),
    "GeneralizedJSD": (losses.GeneralizedJSD(), generalized_jsd(0.5)),
    "GeneralizedJSD(0.9)": (losses.GeneralizedJSD(0.9), generalized_jsd(0.9)),
    "GeneralizedJSD(0)": (losses.GeneralizedJSD(0.0), generalized_jsd(0.0)),
    "GeneralizedJSD(1)": (losses.GeneralizedJSD(1.0), generalized_jsd(1.0)),
    "SkewKL": (losses.SkewKL(), skew_kl(0.1)),
    "SkewKL(0)": (losses.SkewKL(0.0), skew_kl(0.0)),
    "SkewReverseKL": (losses.SkewReverseKL(), skew_reverse_kl(0.1)),
    "SkewReverseKL(0.5)": (losses.SkewReverseKL(0.5), skew_reverse_kl(0.5)),
}


@pytest.fixture
def logits():
    rng = np.random.default_rng(3)
    t = rng.normal(scale=3.0, size=(6, 5))
    s = rng.normal(scale=2.0, size=(6, 5))
    labels = rng.integers(0, 5, size=6)
    return t, s, labels


def values_of(loss, t, s, labels):
    return keras.ops.convert_to_numpy(
        loss.per_position(
            t.astype("float32"), s.astype("float32"), T, labels=labels, epoch=0.0
        )
    )


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_each_loss_matches_numpy_per_position(name, logits):
    loss, reference = REFERENCES[name]
    t, s, labels = logits
    np.testing.assert_allclose(
        values_of(loss, t, s, labels), reference(t, s, labels), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_each_loss_gradient_matches_numpy(name, logits, gradient, central_differences):
    loss, reference = REFERENCES[name]
    t, s, labels = logits

    def mean_loss(student):
        values = loss.per_position(
            keras.ops.convert_to_tensor(t.astype("float32")),
            student,
            T,
            labels=labels,
            epoch=0.0,
        )
        return keras.ops.mean(values)

    got = gradient(mean_loss, s)
    expected = central_differences(lambda v: reference(t, v, labels).mean(), s)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-5)


def test_decoupled_kd_rebuilds_kd(logits):
    # Zhao et al.'s identity: KD = TCKD + (1 − p_target)·NCKD, with p the
    # teacher's probability of the target class at temperature T.
    t, s, labels = logits
    tckd = values_of(losses.DecoupledKD(alpha=1.0, beta=0.0), t, s, labels)
    nckd = values_of(losses.DecoupledKD(alpha=0.0, beta=1.0), t, s, labels)
    p_target = softmax(t / T)[np.arange(len(t)), labels]
    np.testing.assert_allclose(
        tckd + (1.0 - p_target) * nckd, soft_targets(t, s), rtol=1e-4
    )


def test_decoupled_kd_takes_one_hot_and_sequence_labels(tiny_mlp, reference):
    rng = np.random.default_rng(5)
    t = rng.normal(size=(2, 3, 4)).astype("float32")
    s = rng.normal(size=(2, 3, 4)).astype("float32")
    ids = rng.integers(0, 4, size=(2, 3))
    flat = decoupled_kd(t.reshape(6, 4), s.reshape(6, 4), ids.reshape(6))
    from kd_keras._loss_terms import class_ids as _class_ids

    for labels in (ids, np.eye(4)[ids]):
        got = values_of(losses.DecoupledKD(), t, s, _class_ids(labels, t))
        np.testing.assert_allclose(got.reshape(6), flat, rtol=1e-4)


@pytest.mark.parametrize("rows", ["one_row", "a_uniform_student"])
def test_dist_gradient_stays_finite_on_constant_vectors(rows, gradient):
    rng = np.random.default_rng(1)
    if rows == "one_row":  # The batch's correlation is over one position.
        t, s = rng.normal(size=(1, 5)), rng.normal(size=(1, 5))
    else:  # A zero-initialised head: every class alike.
        t, s = rng.normal(size=(4, 5)), np.zeros((4, 5))

    def mean_loss(student):
        values = losses.DIST().per_position(
            keras.ops.convert_to_tensor(t.astype("float32")), student, T
        )
        return keras.ops.mean(values)

    assert np.isfinite(gradient(mean_loss, s)).all()


def test_decoupled_kd_warms_up_linearly(logits):
    t, s, labels = logits
    loss = losses.DecoupledKD(warmup_epochs=4)
    full = decoupled_kd(t, s, labels)
    for epoch, share in ((0.0, 0.25), (2.0, 0.75), (5.0, 1.0)):
        got = keras.ops.convert_to_numpy(
            loss.per_position(
                t.astype("float32"), s.astype("float32"), T, labels=labels, epoch=epoch
            )
        )
        np.testing.assert_allclose(got, share * full, rtol=1e-4)


def test_the_default_is_soft_targets_as_before(tiny_mlp, tiny_data, copy_of):
    x, y = tiny_data
    teacher, student = tiny_mlp(seed=1), tiny_mlp(8, seed=2)
    results = []
    for chosen in (None, losses.SoftTargets()):
        distiller = kd_keras.Distiller(teacher, copy_of(student), losses=chosen)
        distiller.compile(optimizer="adam")
        results.append(distiller.evaluate(x, y, verbose=0, return_dict=True))
    assert results[0] == results[1]


def test_two_losses_log_each_term_and_their_weighted_sum(tiny_mlp, tiny_data):
    x, y = tiny_data
    distiller = kd_keras.Distiller(
        tiny_mlp(seed=1),
        tiny_mlp(8, seed=2),
        losses=[(losses.SoftTargets(), 0.5), (losses.DIST(), 2.0)],
    )
    distiller.compile(optimizer="adam")
    logs = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    assert logs["distillation_loss"] == pytest.approx(
        0.5 * logs["soft_targets_loss"] + 2.0 * logs["dist_loss"], rel=1e-5
    )
    history = distiller.fit(x, y, epochs=1, verbose=0)
    assert {"soft_targets_loss", "dist_loss"} <= set(history.history)


def test_the_distillers_temperature_drives_losses_without_their_own(
    tiny_mlp, tiny_data, reference
):
    x, y = tiny_data
    teacher, student = tiny_mlp(seed=1), tiny_mlp(8, seed=2)
    distiller = kd_keras.Distiller(
        teacher, student, temperature=2.0, losses=losses.LogitStandardization()
    )
    distiller.compile(optimizer="adam")
    distiller.temperature = 5.0  # As a ParameterSchedule would.
    logs = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    t = keras.ops.convert_to_numpy(teacher(x))
    s = keras.ops.convert_to_numpy(student(x))
    expected = logit_standardization(t, s, temperature=5.0).mean()
    assert logs["distillation_loss"] == pytest.approx(expected, rel=1e-4)


def test_losses_survive_save_and_load(tiny_mlp, tiny_data, tmp_path):
    x, y = tiny_data
    distiller = kd_keras.Distiller(
        tiny_mlp(seed=1),
        tiny_mlp(8, seed=2),
        losses=[(losses.DecoupledKD(beta=4.0, warmup_epochs=2), 1.0), losses.DIST()],
    )
    distiller.compile(optimizer="adam")
    distiller.fit(x, y, epochs=1, verbose=0)
    before = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    distiller.save(tmp_path / "d.keras")
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    assert [(repr(a), w) for a, w in loaded._terms.weighted] == [
        (repr(a), w) for a, w in distiller._terms.weighted
    ]
    after = loaded.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    assert after["distillation_loss"] == pytest.approx(
        before["distillation_loss"], rel=1e-5
    )


LANGUAGE_MODEL_LOSSES = [
    losses.ReverseKL(temperature=2.0),
    losses.GeneralizedJSD(beta=0.3),
    losses.SkewKL(alpha=0.2),
    losses.SkewReverseKL(alpha=0.05, name="srkl"),
]


@pytest.mark.parametrize("loss", LANGUAGE_MODEL_LOSSES, ids=repr)
def test_language_model_losses_round_trip_through_their_config(loss):
    config = keras.saving.serialize_keras_object(loss)
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is type(loss) and repr(again) == repr(loss)


def test_language_model_losses_are_saved_with_the_distiller(
    tiny_mlp, tiny_data, tmp_path
):
    x, y = tiny_data
    distiller = kd_keras.Distiller(
        tiny_mlp(seed=1), tiny_mlp(8, seed=2), losses=LANGUAGE_MODEL_LOSSES
    )
    distiller.compile(optimizer="adam")
    before = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    distiller.save(tmp_path / "d.keras")
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    after = loaded.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    assert [repr(loss) for loss, _ in loaded._terms.weighted] == [
        repr(loss) for loss in LANGUAGE_MODEL_LOSSES
    ]
    for name in ("reverse_kl", "generalized_jsd", "skew_kl", "srkl"):
        assert after[f"{name}_loss"] == pytest.approx(before[f"{name}_loss"], rel=1e-5)


def test_language_model_losses_take_sequences_and_their_endpoints_agree():
    rng = np.random.default_rng(5)
    t = rng.normal(scale=3.0, size=(2, 7, 11)).astype("float32")
    s = rng.normal(scale=3.0, size=(2, 7, 11)).astype("float32")

    def value(loss):
        return values_of(loss, t, s, None)

    forward, reverse = value(losses.SoftTargets()), value(losses.ReverseKL())
    assert forward.shape == (2, 7)
    np.testing.assert_allclose(value(losses.GeneralizedJSD(0.0)), forward, rtol=1e-6)
    np.testing.assert_allclose(value(losses.GeneralizedJSD(1.0)), reverse, rtol=1e-6)
    np.testing.assert_allclose(value(losses.SkewKL(0.0)), forward, rtol=1e-6)
    np.testing.assert_allclose(value(losses.SkewReverseKL(0.0)), reverse, rtol=1e-6)
    # Skewing bounds the divergence: never above the plain one.
    assert (value(losses.SkewKL(0.1)) <= forward + 1e-6).all()
    assert (value(losses.SkewReverseKL(0.1)) <= reverse + 1e-6).all()


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: losses.GeneralizedJSD(beta=1.5), r"`beta` in \[0, 1\]. .*beta=1.5"),
        (lambda: losses.GeneralizedJSD(beta="0.5"), r"beta='0.5'"),
        (lambda: losses.SkewKL(alpha=1.0), r"`alpha` in \[0, 1\). .*alpha=1.0"),
        (lambda: losses.SkewReverseKL(alpha=-0.1), r"alpha=-0.1"),
        (lambda: losses.ReverseKL(temperature=0), r"temperature"),
    ],
)
def test_language_model_losses_refuse_bad_arguments(make, error):
    with pytest.raises(ValueError, match=error):
        make()


def test_language_model_losses_need_two_classes(tiny_mlp):
    with pytest.raises(ValueError, match="ReverseKL needs at least 2 classes"):
        kd_keras.Distiller(
            tiny_mlp(num_classes=1),
            tiny_mlp(8, num_classes=1),
            losses=losses.ReverseKL(),
        )


def test_decoupled_kd_warmup_follows_fit_epochs(tiny_mlp, tiny_data):
    x, y = tiny_data
    distiller = kd_keras.Distiller(
        tiny_mlp(seed=1),
        tiny_mlp(8, seed=2),
        losses=losses.DecoupledKD(warmup_epochs=3),
    )
    distiller.compile(optimizer="adam")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(
            float(keras.ops.convert_to_numpy(distiller._epoch))
        )
    )
    distiller.fit(x, y, epochs=3, verbose=0, callbacks=[record])
    assert seen == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda m: kd_keras.Distiller(m(), m(8), losses="dkd"), r"losses='dkd'"),
        (
            lambda m: kd_keras.Distiller(m(), m(8), losses=[(losses.DIST(), -1.0)]),
            r"weight of DIST.*Received: .*=-1\.0",
        ),
        (
            lambda m: kd_keras.Distiller(
                m(), m(8), losses=[losses.DIST(), losses.DIST()]
            ),
            r"own name.*\['dist', 'dist'\].*name=",
        ),
        (
            lambda m: kd_keras.Distiller(
                m(num_classes=1), m(8, num_classes=1), losses=losses.DecoupledKD()
            ),
            r"DecoupledKD needs at least 2 classes.*SoftTargets",
        ),
        (lambda m: losses.DecoupledKD(warmup_epochs=0), r"warmup_epochs=0"),
        (
            lambda m: losses.DIST(beta=-1),
            r"`beta` to be a finite number >= 0. Received: beta=-1",
        ),
        (lambda m: losses.SoftTargets(temperature=0), r"temperature"),
        (lambda m: losses.DecoupledKD(alpha=float("nan")), r"alpha=nan"),
        (
            lambda m: kd_keras.Distiller(
                m(), m(8), losses=losses.DIST(name="distillation")
            ),
            r"named 'distillation'.*another `name=`",
        ),
    ],
    ids=[
        "a_string",
        "a_negative_weight",
        "two_losses_of_one_name",
        "dkd_on_one_logit",
        "zero_warmup",
        "negative_beta",
        "zero_temperature",
        "nan_alpha",
        "a_name_the_distiller_logs",
    ],
)
def test_bad_losses_raise_with_the_fix(make, error, tiny_mlp):
    with pytest.raises(ValueError, match=error):
        make(tiny_mlp)


def test_a_loss_that_needs_labels_refuses_unlabeled_data(tiny_mlp, tiny_data):
    x, _ = tiny_data
    distiller = kd_keras.Distiller(
        tiny_mlp(seed=1),
        tiny_mlp(8, seed=2),
        distillation_weight=1.0,
        losses=losses.DecoupledKD(),
    )
    distiller.compile(optimizer="adam")
    with pytest.raises(ValueError, match=r"DecoupledKD needs the labels"):
        distiller.fit(x, epochs=1, verbose=0)


def test_logit_losses_train_on_cached_teacher_logits(tiny_mlp, tiny_data):
    x, y = tiny_data
    teacher = tiny_mlp(seed=1)
    cached = kd_keras.cache_teacher_logits(teacher, (x, y), batch_size=16)
    distiller = kd_keras.Distiller(
        teacher, tiny_mlp(8, seed=2), losses=[losses.DecoupledKD(), losses.DIST()]
    )
    distiller.compile(optimizer="adam")
    history = distiller.fit(cached, epochs=1, verbose=0)
    assert np.isfinite(history.history["decoupled_kd_loss"]).all()


def test_a_tuple_of_losses_is_a_list_not_a_pair():
    pairs = losses.as_weighted_losses((losses.SoftTargets(), losses.DIST()))
    assert [(type(loss).__name__, w) for loss, w in pairs] == [
        ("SoftTargets", 1.0),
        ("DIST", 1.0),
    ]
    pairs = losses.as_weighted_losses((losses.DIST(), 0.5))
    assert [(type(loss).__name__, w) for loss, w in pairs] == [("DIST", 0.5)]


@pytest.mark.parametrize("student_loss_weight", [None, 0.25])
def test_keras_distillation_arguments_switch_by_one_import(
    student_loss_weight, tiny_mlp, tiny_data, keras_and_kd_keras_totals
):
    # The same arguments as `keras.distillation.Distiller` (its default
    # student_loss_weight too), the same loss. T = 2, not the Distiller's 4,
    # so that the Keras loss object must be the one used.
    x, y = tiny_data
    teacher, student = tiny_mlp(seed=1), tiny_mlp(8, seed=2)
    arguments = dict(
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=2.0, loss=keras.losses.KLDivergence()
        )
    )
    if student_loss_weight is not None:
        arguments["student_loss_weight"] = student_loss_weight
    totals = keras_and_kd_keras_totals(teacher, student, arguments, x, y)
    assert totals[1] == pytest.approx(totals[0], rel=1e-5)


def test_keras_and_kd_keras_arguments_do_not_mix(tiny_mlp):
    keras_loss = keras.distillation.LogitsDistillation(temperature=2.0)
    with pytest.raises(ValueError, match="not a mix"):
        kd_keras.Distiller(
            tiny_mlp(),
            tiny_mlp(8),
            distillation_losses=keras_loss,
            distillation_weight=0.5,
        )
    with pytest.raises(ValueError, match="go with Keras' `distillation_losses`"):
        kd_keras.Distiller(tiny_mlp(), tiny_mlp(8), student_loss_weight=0.5)
    two = kd_keras.Distiller(
        tiny_mlp(),
        tiny_mlp(8),
        distillation_losses=[keras_loss, keras.distillation.LogitsDistillation(4.0)],
        distillation_loss_weights=[0.5, 0.5],
    )
    assert [loss.name for loss, _ in two._terms.weighted] == [
        "keras_logits_distillation_1",
        "keras_logits_distillation_2",
    ]


def test_a_keras_logits_loss_is_saved_with_the_distiller(tiny_mlp, tiny_data, tmp_path):
    x, y = tiny_data
    distiller = kd_keras.Distiller(
        tiny_mlp(seed=1),
        tiny_mlp(8, seed=2),
        losses=[(keras.distillation.LogitsDistillation(temperature=2.0), 0.5)],
    )
    distiller.compile(optimizer="adam")
    before = distiller.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    distiller.save(tmp_path / "d.keras")
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    after = loaded.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    assert after["distillation_loss"] == pytest.approx(
        before["distillation_loss"], rel=1e-5
    )
    ((wrapped, weight),) = loaded._terms.weighted
    assert isinstance(wrapped, losses.KerasLogitsDistillation) and weight == 0.5
    assert wrapped.loss.temperature == 2.0


def test_keras_default_kl_string_warns_that_it_is_not_soft_targets(tiny_mlp, recwarn):
    # Keras resolves its default loss "kl_divergence" to a function that it
    # applies to logits / T (clipped to [1e-7, 1]), not to softmaxes.
    t = np.array([[2.0, 0.5, -1.0]], "float32")
    s = np.array([[0.1, 0.3, 0.2]], "float32")
    default = keras.distillation.LogitsDistillation(temperature=2.0)
    with pytest.warns(UserWarning, match=r"not to their softmaxes.*KLDivergence\(\)"):
        kd_keras.Distiller(tiny_mlp(), tiny_mlp(8), distillation_losses=default)
    recwarn.clear()
    kd_keras.Distiller(tiny_mlp(), tiny_mlp(8), losses=[(default, 0.5)])
    assert len([w for w in recwarn if "softmaxes" in str(w.message)]) == 1  # Once.
    proper = keras.distillation.LogitsDistillation(
        temperature=2.0, loss=keras.losses.KLDivergence()
    )
    recwarn.clear()
    kd_keras.Distiller(tiny_mlp(), tiny_mlp(8), distillation_losses=proper)
    assert not [w for w in recwarn if "softmaxes" in str(w.message)]
    assert float(keras.ops.convert_to_numpy(proper.compute_loss(t, s))) == (
        pytest.approx(soft_targets(t, s, temperature=2.0).mean(), rel=1e-5)
    )
    assert float(keras.ops.convert_to_numpy(default.compute_loss(t, s))) != (
        pytest.approx(soft_targets(t, s, temperature=2.0).mean(), rel=0.1)
    )
