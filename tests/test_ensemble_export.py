import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import kd_keras
from kd_keras import data
from kd_keras import export
from kd_keras import models
from kd_keras import training

pytestmark = pytest.mark.all_backends


@pytest.fixture(scope="session")
def members(tiny_mlp):
    def members(count=3):
        return [tiny_mlp(8 + i, seed=10 + i, name="member") for i in range(count)]

    return members


def test_logits_mode_is_the_weighted_mean_of_member_logits(members, tiny_data):
    x, _ = tiny_data
    parts = members()
    ensemble = kd_keras.EnsembleTeacher(parts, weights=[1, 2, 1])
    logits = np.stack([m.predict(x, verbose=0) for m in parts])
    expected = np.tensordot([0.25, 0.5, 0.25], logits, axes=1)
    np.testing.assert_allclose(
        ensemble.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
    )


def test_probs_mode_is_the_log_of_the_mean_probability(members, reference, tiny_data):
    x, _ = tiny_data
    parts = members()
    ensemble = kd_keras.EnsembleTeacher(parts, mode="probs")
    logits = np.stack([m.predict(x, verbose=0) for m in parts]).astype("f8")
    expected = np.log(np.exp(reference.log_softmax(logits)).mean(axis=0))
    got = ensemble.predict(x, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(got).sum(axis=-1), 1.0, rtol=1e-5)


def test_the_ensemble_is_frozen_and_teaches_a_distiller(members, tiny_mlp, tiny_data):
    x, y = tiny_data
    parts = members()
    ensemble = kd_keras.EnsembleTeacher(parts)
    assert ensemble.trainable_weights == []
    before = [w.copy() for w in ensemble.get_weights()]
    distiller = kd_keras.Distiller(ensemble, tiny_mlp(4, seed=3))
    distiller.compile("adam")
    distiller.fit(x, y, epochs=1, verbose=0)
    cached = kd_keras.cache_teacher_logits(
        ensemble, (x, y), batch_size=16, shuffle=False
    )
    inputs, _ = cached[0]
    np.testing.assert_allclose(
        inputs["teacher_logits"], ensemble.predict(x[:16], verbose=0), rtol=1e-5
    )
    distiller.fit(cached, epochs=1, verbose=0)
    for old, new in zip(before, ensemble.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_the_ensemble_round_trips_through_a_keras_file(members, tiny_data, tmp_path):
    x, _ = tiny_data
    ensemble = kd_keras.EnsembleTeacher(members(2), mode="probs", weights=[3, 1])
    ensemble.save(tmp_path / "ensemble.keras")
    loaded = keras.saving.load_model(tmp_path / "ensemble.keras")
    assert isinstance(loaded, kd_keras.EnsembleTeacher)
    assert (loaded.mode, loaded.member_weights) == ("probs", [0.75, 0.25])
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), ensemble.predict(x, verbose=0), rtol=1e-6
    )


def test_members_with_different_class_counts_raise(tiny_mlp):
    with pytest.raises(ValueError, match="same shape"):
        kd_keras.EnsembleTeacher([tiny_mlp(), tiny_mlp(num_classes=3)])


def test_members_with_different_inputs_raise(features, num_classes, tiny_mlp):
    wide = keras.Sequential(
        [keras.Input((features + 1,)), keras.layers.Dense(num_classes)]
    )
    with pytest.raises(ValueError, match="same input shape"):
        kd_keras.EnsembleTeacher([tiny_mlp(), wide])


def test_bad_ensemble_arguments_raise(members, tiny_mlp):
    with pytest.raises(ValueError, match="at least one"):
        kd_keras.EnsembleTeacher([])
    with pytest.raises(ValueError, match="weights"):
        kd_keras.EnsembleTeacher(members(2), weights=[1.0])
    with pytest.raises(ValueError, match="mode"):
        kd_keras.EnsembleTeacher(members(2), mode="votes")
    with pytest.raises(ValueError, match="softmax"):
        kd_keras.EnsembleTeacher([tiny_mlp(activation="softmax")])


# Export.

# Keras' SavedModel export on PyTorch goes through `torch.export`, which
# fails on these models: export_student refuses PyTorch with the fix
# (tests/test_backends.py checks that).
exports = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="export_student refuses PyTorch, with the fix",
)


@pytest.fixture(scope="module")
def trained_student():
    (x, y), (x_test, y_test) = data.sample()
    train = data.pipeline((x[:2000], y[:2000]), batch_size=100, shuffle=True)
    keras.utils.set_random_seed(0)
    student = models.mlp((32,))
    training.train(student, train, epochs=3, verbose=0)
    return student, train, data.pipeline((x_test, y_test), batch_size=500)


# The int8 model may lose at most this much accuracy on the sample's 2,000
# test digits.
INT8_ACCURACY_DROP = 0.01


@exports
def test_every_format_reloads_and_matches_keras(trained_student, tmp_path):
    student, train, test = trained_student
    report = export.export_student(
        student, tmp_path, representative_data=train, test_data=test, latency_repeats=5
    )
    assert set(report) == {"keras", *export.FORMATS}
    for fmt in ("saved_model", "tflite"):
        assert report[fmt]["max_abs_diff"] <= 1e-4
        assert report[fmt]["argmax_agreement_percent"] == 100.0
    for fmt in export.FORMATS:
        assert report[fmt]["bytes"] > 0 and report[fmt]["latency_ms"] > 0
        assert report[fmt]["argmax_agreement_percent"] >= 98.0
    assert report["tflite_int8"]["bytes"] < report["tflite"]["bytes"] / 2
    assert report["keras"]["accuracy"] - report["tflite_int8"]["accuracy"] <= (
        INT8_ACCURACY_DROP
    )
    assert json.loads((tmp_path / "report.json").read_text()) == report
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    assert "serving_default" in served.signatures


@exports
def test_a_distiller_exports_its_student_only(trained_student, tmp_path):
    student, train, test = trained_student
    distiller = kd_keras.Distiller(models.mlp((64,)), student)
    report = export.export_student(
        distiller, tmp_path, formats=("tflite",), test_data=test, latency_repeats=2
    )
    assert report["keras"]["params"] == student.count_params()


@exports
def test_a_float_export_that_differs_raises(trained_student, tmp_path, monkeypatch):
    student, _, test = trained_student
    original = export._TFLiteRunner.__call__
    # A converter that shifts every logit by 1e-3.
    monkeypatch.setattr(
        export._TFLiteRunner, "__call__", lambda self, x: original(self, x) + 1e-3
    )
    with pytest.raises(ValueError, match="differ from the Keras model"):
        export.export_student(
            student, tmp_path, formats=("tflite",), test_data=test, latency_repeats=1
        )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tflite"]["max_abs_diff"] == pytest.approx(1e-3, rel=0.1)


@exports
def test_bad_export_inputs_raise_before_writing(trained_student, tmp_path):
    student, _, test = trained_student
    with pytest.raises(ValueError, match="keras.Model"):
        export.export_student(lambda x: x, tmp_path / "a")
    with pytest.raises(ValueError, match="representative_data"):
        export.export_student(
            student, tmp_path / "b", formats=("tflite_int8",), test_data=test
        )
    with pytest.raises(ValueError, match="formats"):
        export.export_student(
            student, tmp_path / "c", formats=("onnx",), test_data=test
        )
    assert not any((tmp_path / d).exists() for d in "abc")


def test_the_members_stay_as_they_were(members, tiny_mlp, tiny_data):
    x, _ = tiny_data
    parts = members(2)  # Both named "member".
    before = [w.copy() for w in parts[0].get_weights()]
    ensemble = kd_keras.EnsembleTeacher(parts)
    kd_keras.Distiller(ensemble, tiny_mlp(4, seed=3))
    assert [m.name for m in parts] == ["member", "member"]
    assert all(m.trainable for m in parts)
    parts[0].layers[-1].kernel.assign(parts[0].layers[-1].kernel * 0.0)
    # The ensemble holds its own copies.
    assert np.allclose(ensemble.members[0].get_weights()[0], before[0])


@exports
def test_float_formats_need_no_data(trained_student, tmp_path):
    student, _, _ = trained_student
    # The default formats, without data: all but int8.
    report = export.export_student(student, tmp_path, latency_repeats=1)
    assert report["keras"]["compared_on"].startswith("300 random")
    assert report["tflite"]["max_abs_diff"] <= 1e-4
    assert {"saved_model", "tflite", "tflite_dynamic"} <= set(report)
    assert "tflite_int8" not in report


@exports
def test_export_accuracy_reads_one_hot_labels(trained_student, tmp_path):
    student, _, test = trained_student
    x, y = data.to_arrays(test)
    one_hot = keras.utils.to_categorical(y, 10)
    sparse = export.export_student(
        student,
        tmp_path / "a",
        formats=("tflite",),
        test_data=(x, y),
        latency_repeats=1,
    )
    dense = export.export_student(
        student,
        tmp_path / "b",
        formats=("tflite",),
        test_data=(x, one_hot),
        latency_repeats=1,
    )
    assert dense["tflite"]["accuracy"] == sparse["tflite"]["accuracy"] > 0.5


def test_export_takes_inputs_as_nested_lists(trained_student, tmp_path):
    student, _, test = trained_student
    x, y = data.to_arrays(test)
    x, y = x[:20], y[:20]
    report = export.export_student(
        student,
        tmp_path,
        formats=("tflite",),
        test_data=(x.tolist(), y.tolist()),
        latency_repeats=1,
    )
    assert report["tflite"]["max_abs_diff"] < 1e-4
    weighted = export.export_student(
        student,
        tmp_path / "weighted",
        formats=("tflite",),
        test_data=(x, y, (np.arange(20) < 10).astype("float32")),
        latency_repeats=1,
    )
    predicted = np.asarray(student.predict(x[:10], verbose=0)).argmax(-1)
    assert weighted["keras"]["accuracy"] == pytest.approx(np.mean(predicted == y[:10]))
