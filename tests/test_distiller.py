import keras
from keras import ops
import numpy as np
import pytest

import kd_keras

pytestmark = pytest.mark.all_backends


@pytest.fixture(scope="session")
def make_distiller(tiny_mlp):
    def make_distiller(teacher=None, student=None, optimizer="sgd", **kwargs):
        distiller = kd_keras.Distiller(
            teacher or tiny_mlp(32, seed=1), student or tiny_mlp(8, seed=2), **kwargs
        )
        distiller.compile(optimizer, metrics=["accuracy"])
        return distiller

    return make_distiller


def weights_of(model):
    return [w.copy() for w in model.get_weights()]


def assert_same_weights(a, b, **tolerance):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, **tolerance)


# The loss.


def test_total_loss_matches_numpy_reference(make_distiller, reference, tiny_data):
    x, y = tiny_data
    distiller = make_distiller(temperature=3.0, distillation_weight=0.7)
    logs = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    t = distiller.teacher.predict(x, verbose=0).astype("float64")
    s = distiller.student.predict(x, verbose=0).astype("float64")
    label = reference.cross_entropy(s, y)
    kd = reference.distillation_loss(t, s, 3.0)
    assert logs["student_loss"] == pytest.approx(label, rel=1e-5)
    assert logs["distillation_loss"] == pytest.approx(kd, rel=1e-5)
    assert logs["loss"] == pytest.approx(0.3 * label + 0.7 * kd, rel=1e-5)


def test_weight_zero_step_equals_student_only_step(
    copy_of, make_distiller, tiny_mlp, tiny_data
):
    x, y = tiny_data
    student = tiny_mlp(8, seed=2)
    alone = copy_of(student)
    alone.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    distiller = make_distiller(
        student=student, distillation_weight=0.0, optimizer=keras.optimizers.SGD(0.1)
    )
    alone_loss = alone.train_on_batch(x, y)
    logs = distiller.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(alone_loss, rel=1e-6)
    assert logs["distillation_loss"] == 0.0
    assert_same_weights(
        student.get_weights(), alone.get_weights(), rtol=1e-6, atol=1e-7
    )


def test_teacher_is_not_run_when_weight_is_zero(
    counting_teacher, make_distiller, tiny_data
):
    x, y = tiny_data
    teacher = counting_teacher()
    distiller = make_distiller(teacher=teacher, distillation_weight=0.0)
    before = teacher.count()
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert teacher.count() == before


def test_teacher_runs_once_per_training_batch(
    counting_teacher, make_distiller, tiny_data
):
    x, y = tiny_data
    teacher = counting_teacher()
    distiller = make_distiller(teacher=teacher)
    before = teacher.count()
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert teacher.count() - before == len(x) // 16


def test_one_hot_labels_give_the_same_loss_as_integer_labels(
    make_distiller, num_classes, tiny_data
):
    x, y = tiny_data
    sparse = make_distiller().evaluate(x, y, return_dict=True, verbose=0)
    # A new Distiller: Keras resolves "accuracy" for the first labels it sees.
    one_hot = make_distiller().evaluate(
        x, keras.utils.to_categorical(y, num_classes), return_dict=True, verbose=0
    )
    assert one_hot["loss"] == pytest.approx(sparse["loss"], rel=1e-6)
    assert one_hot["accuracy"] == pytest.approx(sparse["accuracy"])


def test_sample_weight_is_honoured(make_distiller, reference, tiny_data):
    x, y = tiny_data
    distiller = make_distiller(temperature=2.0, distillation_weight=0.5)
    weights = np.zeros(len(x), "float32")
    weights[:10] = 1.0
    logs = distiller.evaluate(
        x, y, sample_weight=weights, batch_size=len(x), return_dict=True, verbose=0
    )
    t = distiller.teacher.predict(x[:10], verbose=0).astype("float64")
    s = distiller.student.predict(x[:10], verbose=0).astype("float64")
    # Keras' "sum_over_batch_size": the weighted sum over the whole batch.
    scale = 10 / len(x)
    expected = 0.5 * scale * reference.cross_entropy(s, y[:10]) + (
        0.5 * scale * reference.distillation_loss(t, s, 2.0)
    )
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)


# Training.


def test_teacher_weights_do_not_change_during_fit(make_distiller, tiny_data):
    x, y = tiny_data
    distiller = make_distiller(optimizer="adam")
    before = weights_of(distiller.teacher)
    distiller.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert_same_weights(distiller.teacher.get_weights(), before, rtol=0, atol=0)


def test_student_weights_change_during_fit(make_distiller, tiny_data):
    x, y = tiny_data
    distiller = make_distiller(optimizer="adam")
    before = weights_of(distiller.student)
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for old, new in zip(before, distiller.student.get_weights(), strict=True):
        assert not np.allclose(old, new)


def test_only_student_weights_are_trainable(make_distiller):
    distiller = make_distiller()
    assert {id(v) for v in distiller.trainable_variables} == {
        id(v) for v in distiller.student.trainable_variables
    }
    assert distiller.teacher.trainable is False


def test_fit_and_evaluate_log_losses_and_compiled_metrics(make_distiller, tiny_data):
    x, y = tiny_data
    distiller = make_distiller()
    history = distiller.fit(x, y, validation_data=(x, y), epochs=1, verbose=0)
    for key in ("loss", "student_loss", "distillation_loss", "accuracy"):
        assert key in history.history
        assert "val_" + key in history.history
    assert history.history["temperature"] == [pytest.approx(4.0)]
    assert history.history["distillation_weight"] == [pytest.approx(0.9)]
    logs = distiller.evaluate(x, y, return_dict=True, verbose=0)
    assert {"loss", "student_loss", "distillation_loss", "accuracy"} <= set(logs)


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="PyTorch steps run eagerly"
)
def test_new_temperature_takes_effect_on_the_next_step_without_retrace(
    tiny_mlp, reference, tiny_data
):
    class CountingTraces(kd_keras.Distiller):
        traces = 0

        def call(self, *args, **kwargs):
            CountingTraces.traces += 1  # Python runs only while tracing.
            return super().call(*args, **kwargs)

    x, y = tiny_data
    distiller = CountingTraces(tiny_mlp(32, seed=1), tiny_mlp(8, seed=2))
    distiller.compile("sgd")
    distiller.train_on_batch(x, y)
    traced = CountingTraces.traces
    distiller.temperature.assign(2.0)
    distiller.distillation_weight.assign(1.0)
    t = distiller.teacher.predict(x, verbose=0).astype("float64")
    s = distiller.student.predict(x, verbose=0).astype("float64")
    logs = distiller.train_on_batch(x, y, return_dict=True)
    assert CountingTraces.traces == traced
    assert logs["distillation_loss"] == pytest.approx(
        reference.distillation_loss(t, s, 2.0), rel=1e-5
    )
    assert logs["loss"] == pytest.approx(logs["distillation_loss"], rel=1e-6)


def test_switching_the_teacher_off_and_on_traces_the_step_again(
    counting_teacher, make_distiller, tiny_data
):
    x, y = tiny_data
    teacher = counting_teacher()
    distiller = make_distiller(teacher=teacher)
    traces = []
    distiller._teacher_outputs = lambda *args, **kwargs: (
        traces.append(distiller._hyperparameters.teacher_on)
        or type(distiller)._teacher_outputs(distiller, *args, **kwargs)
    )
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert teacher.count() == 4
    distiller.distillation_weight = 0.0
    logs = distiller.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert teacher.count() == 4 and logs["distillation_loss"] == [0.0]
    distiller.distillation_weight = 0.5
    logs = distiller.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert teacher.count() == 8 and logs["distillation_loss"][0] > 0.0
    if keras.backend.backend() != "torch":  # PyTorch runs eagerly: nothing is traced.
        # Traced with the teacher, then without it, then with it again.
        assert [on for i, on in enumerate(traces) if i == 0 or on != traces[i - 1]] == [
            True,
            False,
            True,
        ]


@pytest.fixture(scope="session")
def regularised(features, num_classes):
    def regularised(seed, **regularizer):
        """One Dense layer with a regulariser, e.g. kernel_regularizer=..."""
        keras.utils.set_random_seed(seed)
        dense = keras.layers.Dense(num_classes, **regularizer)
        return keras.Sequential([keras.Input((features,)), dense])

    return regularised


def test_a_teacher_activity_regulariser_is_not_in_the_loss(
    make_distiller, regularised, tiny_data
):
    x, y = tiny_data
    teacher = regularised(1, activity_regularizer=keras.regularizers.L2(10.0))
    distiller = make_distiller(teacher=teacher, distillation_weight=0.5)
    history = distiller.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    logs = history.history
    assert logs["loss"][0] == pytest.approx(
        0.5 * logs["student_loss"][0] + 0.5 * logs["distillation_loss"][0], rel=1e-5
    )


def test_temperature_setter_validates(make_distiller):
    distiller = make_distiller()
    distiller.temperature = 7
    assert float(distiller.temperature.numpy()) == 7.0
    with pytest.raises(ValueError, match="temperature"):
        distiller.temperature = 0.0
    with pytest.raises(ValueError, match="distillation_weight"):
        distiller.distillation_weight = 2.0


def test_call_and_predict_return_student_logits(make_distiller, tiny_data):
    x, _ = tiny_data
    distiller = make_distiller()
    expected = distiller.student.predict(x, verbose=0)
    np.testing.assert_allclose(distiller.predict(x, verbose=0), expected, rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(distiller(x)), expected, rtol=1e-6)


def test_labels_are_optional_when_only_the_teacher_teaches(make_distiller, tiny_data):
    x, _ = tiny_data
    distiller = make_distiller(distillation_weight=1.0)
    history = distiller.fit(x, epochs=1, batch_size=16, verbose=0)
    assert history.history["student_loss"] == [0.0]


# Saving.


def test_saved_student_does_not_contain_the_teacher(
    make_distiller, tiny_data, tmp_path
):
    x, y = tiny_data
    distiller = make_distiller()
    distiller.fit(x, y, epochs=1, verbose=0)
    distiller.student.save(tmp_path / "student.keras")
    loaded = keras.saving.load_model(tmp_path / "student.keras")
    assert loaded.count_params() == distiller.student.count_params()
    assert loaded.count_params() < distiller.count_params()
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), distiller.predict(x, verbose=0), rtol=1e-6
    )


def test_distiller_round_trips_through_a_keras_file(
    make_distiller, tiny_data, tmp_path
):
    x, y = tiny_data
    distiller = make_distiller(
        temperature=3.0, distillation_weight=0.6, optimizer="adam"
    )
    distiller.fit(x, y, epochs=1, verbose=0)
    distiller.temperature.assign(5.0)
    distiller.save(tmp_path / "distiller.keras")
    loaded = keras.saving.load_model(tmp_path / "distiller.keras")
    assert isinstance(loaded, kd_keras.Distiller)
    assert float(loaded.temperature.numpy()) == 5.0
    assert float(loaded.distillation_weight.numpy()) == pytest.approx(0.6)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), distiller.predict(x, verbose=0), rtol=1e-6
    )
    assert loaded.evaluate(x, y, return_dict=True, verbose=0)["loss"] == (
        pytest.approx(
            distiller.evaluate(x, y, return_dict=True, verbose=0)["loss"], rel=1e-5
        )
    )
    loaded.fit(x, y, epochs=1, verbose=0)


def test_custom_student_loss_round_trips(make_distiller, tmp_path):
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    distiller = make_distiller(student_loss=loss)
    distiller.save(tmp_path / "d.keras")
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    assert loaded.get_config()["student_loss"]["config"]["label_smoothing"] == (
        pytest.approx(0.1)
    )


# Validation.


def test_output_shapes_that_differ_raise(tiny_mlp):
    with pytest.raises(ValueError, match="same shape"):
        kd_keras.Distiller(tiny_mlp(seed=1), tiny_mlp(seed=2, num_classes=3))


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_model_ending_in_softmax_raises(tiny_mlp, role):
    models = {"teacher": tiny_mlp(seed=1), "student": tiny_mlp(seed=2)}
    models[role] = tiny_mlp(seed=3, activation="softmax")
    with pytest.raises(ValueError, match=f"{role}.*softmax.*logits"):
        kd_keras.Distiller(**models)


def test_a_subclassed_model_returning_probabilities_raises_on_first_batch(
    features, make_distiller, num_classes, tiny_data
):
    class Probabilities(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(num_classes)

        def call(self, x):
            return ops.softmax(self.dense(x))

    x, y = tiny_data
    student = Probabilities()
    student.build((None, features))
    distiller = make_distiller(student=student)
    with pytest.raises(ValueError, match="probabilities"):
        distiller.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("temperature", [0.0, -2.0, None])
def test_bad_temperature_raises(make_distiller, temperature):
    with pytest.raises(ValueError, match="temperature"):
        make_distiller(temperature=temperature)


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_distillation_weight_outside_unit_interval_raises(make_distiller, weight):
    with pytest.raises(ValueError, match=r"distillation_weight.*\[0, 1\]"):
        make_distiller(distillation_weight=weight)


def test_integer_labels_out_of_range_raise_before_training(
    make_distiller, num_classes, tiny_data
):
    x, y = tiny_data
    distiller = make_distiller()
    before = weights_of(distiller.student)
    with pytest.raises(ValueError, match=rf"labels in \[0, {num_classes}\)"):
        distiller.fit(x, y + num_classes, epochs=1, verbose=0)
    assert_same_weights(distiller.student.get_weights(), before, rtol=0, atol=0)


def test_one_hot_labels_of_the_wrong_width_raise(make_distiller, tiny_data):
    x, y = tiny_data
    distiller = make_distiller()
    with pytest.raises(ValueError, match="labels have 7 classes"):
        distiller.fit(x, keras.utils.to_categorical(y, 7), verbose=0)


def test_labels_out_of_range_in_a_dataset_raise(make_distiller, tiny_data):
    import tensorflow as tf

    x, y = tiny_data
    dataset = tf.data.Dataset.from_tensor_slices((x, y * 3)).batch(16)
    with pytest.raises(ValueError, match="Relabel"):
        make_distiller().fit(dataset, verbose=0)


def test_labels_out_of_range_in_array_batches_raise(make_distiller, tiny_data):
    x, y = tiny_data
    batches = kd_keras.data.ArrayBatches(x, y * 3, batch_size=16)
    with pytest.raises(ValueError, match="Relabel"):
        make_distiller().fit(batches, verbose=0)


def test_a_model_that_is_not_built_raises(num_classes, tiny_mlp):
    unbuilt = keras.Sequential([keras.layers.Dense(num_classes)])
    with pytest.raises(ValueError, match=r"not built.*keras\.Input"):
        kd_keras.Distiller(tiny_mlp(seed=1), unbuilt)


def test_a_teacher_that_is_not_a_model_raises(tiny_mlp):
    with pytest.raises(ValueError, match="keras.Model"):
        kd_keras.Distiller(lambda x: x, tiny_mlp())


def test_a_student_loss_expecting_probabilities_raises(make_distiller):
    with pytest.raises(ValueError, match="from_logits"):
        make_distiller(student_loss=keras.losses.SparseCategoricalCrossentropy())
    with pytest.raises(ValueError, match="from_logits"):
        make_distiller(student_loss="sparse_categorical_crossentropy")


def test_missing_labels_with_a_label_term_raise(make_distiller, tiny_data):
    x, _ = tiny_data
    with pytest.raises(ValueError, match="no labels"):
        make_distiller(distillation_weight=0.5).fit(x, verbose=0)


def test_student_loss_given_to_compile_is_used(
    num_classes, tiny_mlp, reference, tiny_data
):
    x, y = tiny_data
    distiller = kd_keras.Distiller(
        tiny_mlp(seed=1), tiny_mlp(seed=2), distillation_weight=0.0
    )
    distiller.compile(
        "sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True)
    )
    one_hot = keras.utils.to_categorical(y, num_classes)
    logs = distiller.evaluate(
        x, one_hot, batch_size=len(x), return_dict=True, verbose=0
    )
    s = distiller.student.predict(x, verbose=0).astype("float64")
    assert logs["loss"] == pytest.approx(reference.cross_entropy(s, y), rel=1e-5)


def test_a_plain_function_works_as_student_loss(make_distiller, tiny_data):
    def squared_logit_of_true_class(y, logits):
        ids = ops.expand_dims(ops.cast(y, "int32"), -1)
        return ops.square(ops.take_along_axis(logits, ids, axis=-1)[:, 0])

    x, y = tiny_data
    distiller = make_distiller(
        student_loss=squared_logit_of_true_class, distillation_weight=0.0
    )
    logs = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    s = distiller.student.predict(x, verbose=0)
    assert logs["loss"] == pytest.approx(
        np.mean(s[np.arange(len(y)), y] ** 2), rel=1e-5
    )


def test_a_probability_loss_function_is_refused(make_distiller):
    with pytest.raises(ValueError, match="from_logits"):
        make_distiller(student_loss=keras.losses.sparse_categorical_crossentropy)


def test_a_loss_that_does_not_average_over_the_batch_is_refused(make_distiller):
    with pytest.raises(ValueError, match="reduction"):
        make_distiller(
            student_loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="sum"
            )
        )


def test_an_infinite_temperature_is_refused(make_distiller):
    with pytest.raises(ValueError, match="finite"):
        make_distiller(temperature=float("inf"))


def test_the_same_loss_given_twice_still_loads(tiny_mlp, tmp_path):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distiller = kd_keras.Distiller(
        tiny_mlp(seed=1), tiny_mlp(seed=2), student_loss=loss
    )
    distiller.compile("sgd", loss=loss)
    distiller.save(tmp_path / "d.keras")
    assert isinstance(keras.saving.load_model(tmp_path / "d.keras"), kd_keras.Distiller)


def test_regularisation_is_in_the_logged_loss(make_distiller, regularised, tiny_data):
    x, y = tiny_data
    student = regularised(2, kernel_regularizer=keras.regularizers.L2(1.0))
    distiller = make_distiller(student=student, distillation_weight=0.0)
    logs = distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    penalty = float(np.sum(student.layers[0].kernel.numpy() ** 2))
    assert logs["loss"] == pytest.approx(logs["student_loss"] + penalty, rel=1e-5)


def test_validation_data_is_checked_once_per_fit(
    make_distiller, tiny_data, monkeypatch
):
    x, y = tiny_data
    distiller = make_distiller()
    checks = []
    original = kd_keras.Distiller._check_data
    monkeypatch.setattr(
        kd_keras.Distiller,
        "_check_data",
        lambda self, *a: checks.append(1) or original(self, *a),
    )
    distiller.fit(x, y, validation_data=(x, y), epochs=3, verbose=0)
    assert len(checks) == 2
    with pytest.raises(ValueError, match="Relabel"):
        distiller.fit(x, y, validation_data=(x, y + 9), epochs=1, verbose=0)


# The scenarios of Keras' own distiller tests, with subclassed models.


@keras.saving.register_keras_serializable(package="kd_keras_tests")
class Subclassed(keras.Model):
    def __init__(self, hidden, classes, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.classes = hidden, classes
        self.dense1 = keras.layers.Dense(hidden, activation="relu")
        self.dense2 = keras.layers.Dense(classes)

    def call(self, inputs, training=None):
        return self.dense2(self.dense1(inputs))

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "classes": self.classes}


@pytest.fixture(scope="session")
def subclassed(num_classes):
    def subclassed(hidden, seed, x):
        keras.utils.set_random_seed(seed)
        model = Subclassed(hidden, num_classes)
        model(x[:2])
        return model

    return subclassed


def test_subclassed_models_train_validate_and_round_trip(
    num_classes, subclassed, tiny_data, tmp_path
):
    x, y = tiny_data
    one_hot = keras.utils.to_categorical(y, num_classes)
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    teacher, student = subclassed(32, 1, x), subclassed(8, 2, x)
    before = weights_of(student)
    distiller = kd_keras.Distiller(
        teacher, student, temperature=2.0, distillation_weight=0.5
    )
    distiller.compile("adam", metrics=["accuracy"])
    history = distiller.fit(
        x,
        one_hot,
        sample_weight=weights,
        batch_size=16,
        epochs=2,
        validation_data=(x, one_hot),
        verbose=0,
    )
    for key in (
        "loss",
        "student_loss",
        "distillation_loss",
        "val_loss",
        "val_accuracy",
    ):
        assert np.all(np.isfinite(history.history[key]))
    assert not np.allclose(before[0], student.get_weights()[0])
    assert distiller.predict(x, verbose=0).shape == (len(x), num_classes)
    distiller.save(tmp_path / "distiller.keras")
    loaded = keras.saving.load_model(tmp_path / "distiller.keras")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), distiller.predict(x, verbose=0), rtol=1e-5
    )
    assert evaluate_loss(loaded, x, one_hot) == pytest.approx(
        evaluate_loss(distiller, x, one_hot), rel=1e-5
    )


def evaluate_loss(distiller, x, y):
    return distiller.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)[
        "loss"
    ]


# Regressions of defects found on main.


def test_recompiling_without_a_loss_returns_to_the_default_and_saves_so(
    make_distiller, num_classes, reference, tiny_data, tmp_path
):
    x, y = tiny_data
    one_hot = keras.utils.to_categorical(y, num_classes)
    distiller = make_distiller(temperature=2.0, distillation_weight=0.0)
    distiller.compile(
        "sgd",
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=0.3
        ),
    )
    smoothed = evaluate_loss(distiller, x, one_hot)
    distiller.compile("sgd")
    in_memory = evaluate_loss(distiller, x, one_hot)
    s = distiller.student.predict(x, verbose=0).astype("float64")
    assert in_memory == pytest.approx(reference.cross_entropy(s, y), rel=1e-5)
    assert in_memory != pytest.approx(smoothed, rel=1e-3)
    distiller.save(tmp_path / "d.keras")
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    assert evaluate_loss(loaded, x, one_hot) == pytest.approx(in_memory, rel=1e-6)


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", np.inf),
        ("distillation_weight", 1.7),
        ("distillation_weight", -0.1),
    ],
)
def test_assigning_an_out_of_range_value_to_a_variable_raises(
    make_distiller, tiny_data, name, value
):
    x, y = tiny_data
    distiller = make_distiller()
    variable = getattr(distiller, name)
    before = float(variable.numpy())
    with pytest.raises(ValueError, match=name):
        variable.assign(value)
    with pytest.raises(ValueError, match=name):
        variable.assign(ops.convert_to_tensor(value))
    assert float(variable.numpy()) == before
    history = distiller.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_assign_add_past_the_range_raises(make_distiller):
    distiller = make_distiller(distillation_weight=0.9)
    with pytest.raises(ValueError, match=r"distillation_weight.*\[0, 1\]"):
        distiller.distillation_weight.assign_add(0.5)


def test_mean_with_sample_weight_reduction_applies_to_both_terms(
    make_distiller, reference, tiny_data
):
    x, y = tiny_data
    weights = np.zeros(len(x), "float32")
    weights[:10] = 2.0
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    distiller = make_distiller(
        student_loss=loss, temperature=2.0, distillation_weight=0.5
    )
    logs = distiller.evaluate(
        x, y, sample_weight=weights, batch_size=len(x), return_dict=True, verbose=0
    )
    t = distiller.teacher.predict(x[:10], verbose=0).astype("float64")
    s = distiller.student.predict(x[:10], verbose=0).astype("float64")
    # Both are weighted means: the weighted sum over the sum of weights.
    assert logs["student_loss"] == pytest.approx(
        reference.cross_entropy(s, y[:10]), rel=1e-5
    )
    assert logs["distillation_loss"] == pytest.approx(
        reference.distillation_loss(t, s, 2.0), rel=1e-5
    )


def test_a_student_loss_that_only_overrides_call_dunder_is_refused(make_distiller):
    class Opaque(keras.losses.Loss):
        def __call__(self, y_true, y_pred, sample_weight=None):
            return ops.mean(ops.square(y_pred))

    with pytest.raises(ValueError, match="implement `call`"):
        make_distiller(student_loss=Opaque())


def test_a_distiller_saved_by_an_earlier_version_loads():
    # Saved at 764628c, before the Distiller's jobs moved into collaborators
    # (tests/data/make_saved_distiller.py): the config keys and the weights'
    # places in the file must still match.
    import pathlib

    folder = pathlib.Path(__file__).parent / "data"
    expected = np.load(folder / "distiller_764628c.npz")
    loaded = keras.saving.load_model(folder / "distiller_764628c.keras")
    x, y = expected["x"], expected["y"]
    np.testing.assert_allclose(
        loaded.student.predict(x, verbose=0), expected["student"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        loaded.teacher.predict(x, verbose=0), expected["teacher"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        loaded.adapters[0].get_weights()[0], expected["adapter"], rtol=0, atol=0
    )
    assert float(loaded.temperature.numpy()) == 3.0
    assert float(loaded.distillation_weight.numpy()) == pytest.approx(0.7)
    logs = loaded.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    assert logs["loss"] == pytest.approx(float(expected["loss"]), rel=1e-5)
    assert logs["distillation_loss"] == pytest.approx(
        float(expected["distillation_loss"]), rel=1e-5
    )
    # Its optimizer's state came back too: one more step trains on.
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)
