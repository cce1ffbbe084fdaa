import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras import assistants
from kd_keras import training
from kd_keras.apps import plots

pytestmark = pytest.mark.all_backends


@pytest.fixture
def splits(features):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(192, features)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + 2 * (x[:, 1] > 0).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x[:128], y[:128])).batch(32)
    val = tf.data.Dataset.from_tensor_slices((x[128:], y[128:])).batch(32)
    return train, val


@pytest.fixture(scope="module")
def teacher(features, tiny_mlp):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, features)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + 2 * (x[:, 1] > 0).astype("int32")
    model = tiny_mlp(64, seed=0, name="teacher")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=3, verbose=0)
    return model


@pytest.fixture(scope="session")
def chain(tiny_mlp):
    def chain(teacher, widths=(16, 8), seed=3):
        return [teacher] + [
            tiny_mlp(w, seed=seed + i, name=f"mlp{w}") for i, w in enumerate(widths)
        ]

    return chain


def run_chain(models, splits, workdir, **settings):
    settings = {"temperature": 3.0, "epochs": 2, **settings}
    return assistants.distill_chain(models, *splits, workdir=workdir, **settings)


def test_a_chain_of_tiny_models_trains_every_step(chain, teacher, splits, tmp_path):
    models = chain(teacher)
    before = [w.copy() for w in models[-1].get_weights()]
    student, report = run_chain(models, splits, tmp_path)
    assert student is models[-1]
    assert [(r["step"], r["teacher"], r["student"]) for r in report] == [
        (1, "teacher", "mlp16"),
        (2, "mlp16", "mlp8"),
    ]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in report)
    assert not any(r["reused"] for r in report)
    assert not np.allclose(before[0], student.get_weights()[0])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest) == 2
    for entry in manifest.values():
        assert (tmp_path / entry["path"]).is_file()


# Files and fingerprints: the same on every backend.
@pytest.mark.backend_independent
def test_rerunning_a_chain_skips_its_finished_steps(chain, teacher, splits, tmp_path):
    student, _ = run_chain(chain(teacher), splits, tmp_path)
    again, report = run_chain(chain(teacher, seed=50), splits, tmp_path)
    assert [r["reused"] for r in report] == [True, True]
    for a, b in zip(student.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# Files and fingerprints: the same on every backend.
@pytest.mark.backend_independent
def test_a_longer_chain_resumes_after_its_finished_prefix(
    chain, teacher, splits, tmp_path
):
    run_chain(chain(teacher, widths=(16,)), splits, tmp_path)
    _, report = run_chain(chain(teacher, widths=(16, 8)), splits, tmp_path)
    assert [r["reused"] for r in report] == [True, False]


# Files and fingerprints: the same on every backend.
@pytest.mark.backend_independent
def test_changed_settings_retrain_the_steps_they_affect(
    chain, teacher, splits, tmp_path
):
    run_chain(chain(teacher), splits, tmp_path)
    _, report = run_chain(chain(teacher), splits, tmp_path, temperature=5.0)
    assert [r["reused"] for r in report] == [False, False]
    _, report = run_chain(chain(teacher, widths=(16, 4)), splits, tmp_path)
    assert [r["reused"] for r in report] == [True, False]


def test_a_functional_builder_resumes_too(
    features, num_classes, teacher, splits, tmp_path
):
    def functional(width, seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((features,))
        hidden = keras.layers.Dense(width, activation="relu")(inputs)
        return keras.Model(inputs, keras.layers.Dense(num_classes)(hidden))

    run_chain([teacher, functional(8, 1)], splits, tmp_path)
    _, report = run_chain([teacher, functional(8, 2)], splits, tmp_path)
    assert [r["reused"] for r in report] == [True]


def test_a_reused_step_is_scored_on_the_new_validation_data(
    chain, teacher, splits, tmp_path
):
    train, val = splits
    run_chain(chain(teacher, widths=(8,)), splits, tmp_path)
    smaller = val.take(1)
    student, again = run_chain(chain(teacher, widths=(8,)), (train, smaller), tmp_path)
    assert again[0]["reused"]
    assert again[0]["val_accuracy"] == training.test_accuracy(student, smaller)


# Files and fingerprints: the same on every backend.
@pytest.mark.backend_independent
def test_changed_data_retrains(chain, teacher, splits, tmp_path):
    train, val = splits
    run_chain(chain(teacher, widths=(8,)), splits, tmp_path)
    fewer = train.take(2)
    _, report = run_chain(chain(teacher, widths=(8,)), (fewer, val), tmp_path)
    assert [r["reused"] for r in report] == [False]


# Counts trainings, which no backend changes.
@pytest.mark.backend_independent
def test_path_search_trains_each_shared_prefix_once(
    tiny_mlp, teacher, splits, tmp_path
):
    candidates = {
        "a": lambda: tiny_mlp(32, name="a"),
        "b": lambda: tiny_mlp(16, name="b"),
    }

    def student():
        return tiny_mlp(4, name="student")

    def search():
        return assistants.search_paths(
            teacher,
            candidates,
            student,
            *splits,
            temperature=3.0,
            epochs=1,
            workdir=tmp_path,
        )

    result = search()
    assert sorted(row["path"] for row in result.table) == sorted(
        [
            "teacher → student",
            "teacher → a → student",
            "teacher → b → student",
            "teacher → a → b → student",
        ]
    )
    # Prefixes a, b, a→b once each, plus one student per path.
    assert result.distinct_steps == 3 + 4
    assert result.trainings == 7
    assert result.naive_trainings == 1 + 2 + 2 + 3
    assert set(result.assistant_accuracies) == {("a",), ("b",), ("a", "b")}
    accuracies = [row["student_val_accuracy"] for row in result.table]
    assert accuracies == sorted(accuracies, reverse=True)
    rerun = search()
    assert (rerun.trainings, rerun.reused) == (0, 7)
    assert rerun.table == result.table
    plots.plot_paths(result.table, path=tmp_path / "paths.png")
    assert (tmp_path / "paths.png").stat().st_size > 1000


def test_suggest_assistant_picks_the_accuracy_nearest_the_mean():
    suggestion = assistants.suggest_assistant(
        {"8": 0.7275, "6": 0.7315, "4": 0.7351},
        teacher_accuracy=0.80,
        student_accuracy=0.70,
    )
    assert suggestion["target_accuracy"] == pytest.approx(0.75)
    assert suggestion["assistant"] == "4"
    middle = assistants.suggest_assistant(
        {"big": 0.79, "mid": 0.76, "small": 0.71},
        teacher_accuracy=0.80,
        student_accuracy=0.70,
    )
    assert middle["assistant"] == "mid"


def test_suggest_assistant_estimates_accuracies_by_short_training(
    tiny_mlp, teacher, splits
):
    train, val = splits
    suggestion = assistants.suggest_assistant(
        {"a": lambda: tiny_mlp(32), "b": lambda: tiny_mlp(2)},
        teacher=teacher,
        student=lambda: tiny_mlp(1),
        train_data=train,
        val_data=val,
        epochs=2,
    )
    accuracies = suggestion["accuracies"]
    assert set(accuracies) == {"a", "b"}
    assert all(0.0 <= a <= 1.0 for a in accuracies.values())
    target = suggestion["target_accuracy"]
    assert suggestion["assistant"] == min(
        accuracies, key=lambda n: abs(accuracies[n] - target)
    )
    with pytest.raises(ValueError, match="train_data"):
        assistants.suggest_assistant(
            {"a": lambda: tiny_mlp(8)}, teacher_accuracy=0.9, student_accuracy=0.5
        )


def test_an_empty_or_single_model_chain_raises(teacher, splits, tmp_path):
    for models in ([], [teacher]):
        with pytest.raises(ValueError, match="at least a teacher and a student"):
            run_chain(models, splits, tmp_path)


# Files and fingerprints: the same on every backend.
@pytest.mark.backend_independent
def test_a_student_larger_than_its_teacher_warns(
    tiny_mlp, teacher, splits, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING):
        run_chain([teacher, tiny_mlp(128, name="huge")], splits, tmp_path, epochs=1)
    assert "larger than its teacher" in caplog.text


def test_mismatched_class_counts_raise(
    num_classes, tiny_mlp, teacher, splits, tmp_path
):
    odd = tiny_mlp(8, num_classes=num_classes + 1, name="odd")
    with pytest.raises(ValueError, match="same number of classes"):
        run_chain([teacher, odd], splits, tmp_path)


def test_bad_settings_raise_before_training(chain, teacher, splits, tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        run_chain(chain(teacher), splits, tmp_path, temperature=0.0)
    assert not (tmp_path / "manifest.json").exists()


def test_the_precision_policy_is_part_of_the_architecture(tiny_mlp):
    from kd_keras import _fingerprints

    plain = tiny_mlp(8, name="a")
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = tiny_mlp(8, name="b")
    finally:
        keras.config.set_dtype_policy("float32")
    assert _fingerprints.architecture(plain) != _fingerprints.architecture(mixed)
    assert _fingerprints.architecture(plain) == _fingerprints.architecture(
        tiny_mlp(8, name="c")
    )


def test_a_rerun_in_the_same_session_with_new_models_reuses_the_steps(
    chain, teacher, copy_of, splits, tmp_path
):
    # A notebook rerun: fresh models get new generated names, and the
    # teacher, trainable at first, was frozen by the first run.
    fresh = copy_of(teacher)
    fresh.trainable = True
    run_chain(chain(fresh), splits, tmp_path)
    assert not fresh.trainable
    _, report = run_chain(chain(fresh), splits, tmp_path)
    assert [r["reused"] for r in report] == [True, True]


def test_known_accuracies_may_be_numpy_numbers():
    choice = assistants.suggest_assistant(
        {"8": np.float32(0.78), "6": np.float64(0.76)},
        teacher_accuracy=np.float32(0.80),
        student_accuracy=0.70,
    )
    assert choice["assistant"] == "6"


def test_a_chain_takes_arrays(chain, teacher, tiny_data, tmp_path):
    x, y = tiny_data
    student, report = assistants.distill_chain(
        chain(teacher), (x, y), (x, y), workdir=tmp_path, epochs=1
    )
    assert [r["step"] for r in report] == [1, 2]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in report)
