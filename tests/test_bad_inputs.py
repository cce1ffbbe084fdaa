"""Bad inputs a user could plausibly give, and the clear error each gets.

Every case must raise before any work is done, naming the argument, the
value received and the fix: each row gives the exception and a pattern of
its message. Cases that are harmless but probably a mistake log a warning
instead (see the tests below the table).
"""

import gzip
import logging
import re

import keras
import numpy as np
import pytest

import kd_keras
from kd_keras import assistants
from kd_keras import callbacks
from kd_keras import data
from kd_keras import losses
from kd_keras import models
from kd_keras import teachers
from kd_keras import training

pytestmark = pytest.mark.all_backends
BACKEND = keras.backend.backend()
needs_tf = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tf.data and export run with TensorFlow"
)


class Case:
    """One bad input: `run(env)` must raise `error` matching `match`, before
    any training step (unless `after_an_epoch`: checked when an epoch's logs
    exist)."""

    def __init__(self, name, run, error, match, marks=(), after_an_epoch=False):
        self.name, self.run, self.error, self.match = name, run, error, match
        self.marks, self.after_an_epoch = marks, after_an_epoch

    def param(self):
        return pytest.param(self, id=self.name, marks=self.marks)


class Env:
    """What the cases build their inputs from."""

    def __init__(self, tiny_mlp, tiny_data, tmp_path, features, num_classes):
        self.tiny_mlp, self.tmp_path = tiny_mlp, tmp_path
        self.x, self.y = tiny_data
        self.features, self.num_classes = features, num_classes
        self.steps = 0  # Training steps traced or run by `distiller()`s.

    def distiller(self, **kwargs):
        distiller = kd_keras.Distiller(
            teacher=self.tiny_mlp(seed=1), student=self.tiny_mlp(8, seed=2), **kwargs
        )
        distiller.compile(optimizer="adam", metrics=["accuracy"])
        step = distiller.train_step

        def counting_step(*args, **kwargs):
            self.steps += 1
            return step(*args, **kwargs)

        distiller.train_step = counting_step
        return distiller

    def fit(self, x=None, y=None, **kwargs):
        x = self.x if x is None else x
        y = self.y if y is None and not hasattr(x, "element_spec") else y
        return self.distiller().fit(x, y, epochs=1, verbose=0, **kwargs)

    def with_nan(self, array, row=3):
        array = np.array(array, dtype="float32")
        array.flat[row] = np.nan
        return array

    def dataset(self, rows=None, batch=16):
        import tensorflow as tf

        x, y = self.x, self.y
        if rows is not None:
            x, y = x[:rows], y[:rows]
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
        return dataset if batch is None else dataset.batch(batch)


def _one_hot_rank_3(env):
    return env.fit(y=keras.utils.to_categorical(env.y, env.num_classes)[:, None, :])


def _wrong_input_shapes(env):
    student = keras.Sequential(
        [keras.Input((env.features + 3,)), keras.layers.Dense(env.num_classes)]
    )
    return kd_keras.Distiller(teacher=env.tiny_mlp(), student=student)


def _categorical_loss_on_ids(env):
    distiller = kd_keras.Distiller(
        teacher=env.tiny_mlp(seed=1),
        student=env.tiny_mlp(8, seed=2),
        student_loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    distiller.compile(optimizer="adam")
    return distiller.fit(env.x, env.y, epochs=1, verbose=0)


def _schedule_returning_none(env):
    schedule = callbacks.ParameterSchedule(lambda epoch: None)
    return env.fit(callbacks=[schedule])


def _snapshots_past_the_end(env):
    snapshots = callbacks.TeacherSnapshots(env.tmp_path / "s", epochs=[10])
    model = env.tiny_mlp()
    model.compile("adam", training.label_loss())
    return model.fit(env.x, env.y, epochs=2, verbose=0, callbacks=[snapshots])


def _early_stop_on_an_unlogged_metric(env):
    stop = callbacks.StudentEarlyStop(monitor="val_acc", mode="max", patience=1)
    return env.distiller().fit(
        env.x,
        env.y,
        validation_data=(env.x, env.y),
        epochs=3,
        verbose=0,
        callbacks=[stop],
    )


def _idx_set(folder, rows=20):
    """Writes a small MNIST-format set of the four gzipped IDX files."""
    folder.mkdir()
    images = np.zeros((rows, 28, 28), "uint8")
    labels = np.arange(rows, dtype="uint8") % 10
    for split in ("train", "t10k"):
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
                d.to_bytes(4, "big") for d in array.shape
            )
            with gzip.open(folder / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.tobytes())
    return folder


def _corrupt_gzip(env):
    source = _idx_set(env.tmp_path / "idx")
    path = source / "train-images-idx3-ubyte.gz"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return data.import_mnist(source, env.tmp_path / "tfds")


def _garbage_gzip(env):
    source = _idx_set(env.tmp_path / "idx")
    path = source / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"not an IDX file"))
    return data.import_mnist(source, env.tmp_path / "tfds")


def _export_into_a_file(env):
    target = env.tmp_path / "student"
    target.write_text("")
    return kd_keras.export.export_student(env.tiny_mlp(), target, formats=("tflite",))


def _export_test_data_too_wide(env):
    x = np.zeros((8, env.features + 2), "float32")
    return kd_keras.export.export_student(
        env.tiny_mlp(),
        env.tmp_path / "out",
        formats=("tflite",),
        test_data=(x, np.zeros(8, "int32")),
    )


def _hypermodel_with_a_model(env):
    from kd_keras import tuning

    return tuning.DistillationHyperModel(env.tiny_mlp(), env.tiny_mlp(8))


def _tune(env, **kwargs):
    from kd_keras import tuning

    hypermodel = tuning.DistillationHyperModel(
        env.tiny_mlp(seed=1),
        lambda: env.tiny_mlp(8, seed=None),
        temperatures=(2.0,),
        distillation_weights=(0.5, 0.5, 0.1),
    )
    arguments = dict(
        max_trials=1, epochs=1, directory=env.tmp_path, project_name="sweep", verbose=0
    )
    return tuning.tune(
        hypermodel, (env.x, env.y), (env.x, env.y), **{**arguments, **kwargs}
    )


def _tune_with_failing_trials(env):
    from kd_keras import tuning

    class Failing(tuning.DistillationHyperModel):
        def fit(self, *args, **kwargs):
            raise ValueError("boom: the trial fails")

    hypermodel = Failing(
        env.tiny_mlp(seed=1),
        lambda: env.tiny_mlp(8, seed=None),
        temperatures=(2.0,),
        distillation_weights=(0.5, 0.5, 0.1),
    )
    return tuning.tune(
        hypermodel,
        (env.x, env.y),
        (env.x, env.y),
        max_trials=1,
        epochs=1,
        directory=env.tmp_path,
        project_name="sweep",
    )


def _store_under_a_file(env):
    from kd_keras import store

    (env.tmp_path / "taken").write_text("")
    return store.ModelStore(env.tmp_path / "taken" / "models")


def _chain_of_other_input_shapes(env):
    other = keras.Sequential(
        [keras.Input((env.features + 1,)), keras.layers.Dense(env.num_classes)]
    )
    return assistants.distill_chain(
        [env.tiny_mlp(), other], (env.x, env.y), (env.x, env.y), workdir=env.tmp_path
    )


CASES = [
    # The Distiller and its data.
    Case(
        "nan_in_x",
        lambda env: env.fit(x=env.with_nan(env.x)),
        ValueError,
        r"inputs of the training data hold NaN or infinite.*row 0",
    ),
    Case(
        "inf_in_float_labels",
        lambda env: env.fit(y=np.where(env.y == 1, np.inf, env.y).astype("float32")),
        ValueError,
        r"labels hold NaN or infinite",
    ),
    Case(
        "nan_in_validation_inputs",
        lambda env: env.fit(validation_data=(env.with_nan(env.x), env.y)),
        ValueError,
        r"inputs of the validation data hold NaN or infinite",
    ),
    Case(
        "fractional_labels",
        lambda env: env.fit(y=env.y.astype("float32") + 0.11),
        ValueError,
        r"whole numbers.*\d\.11",
    ),
    Case(
        "zero_rows",
        lambda env: env.fit(x=env.x[:0], y=env.y[:0]),
        ValueError,
        r"no examples",
    ),
    Case(
        "teacher_and_student_inputs_differ",
        _wrong_input_shapes,
        ValueError,
        r"inputs of shape \(None, 8\).*\(None, 11\)",
    ),
    Case(
        "one_hot_labels_of_rank_3",
        _one_hot_rank_3,
        ValueError,
        r"Expected labels of shape \(batch\).*Received labels of shape \(64, 1, 4\)",
    ),
    Case(
        "string_labels",
        lambda env: env.fit(y=np.array(["cat", "dog"] * 32)),
        ValueError,
        r"strings.*integer class ids",
    ),
    Case(
        "categorical_loss_on_class_ids",
        _categorical_loss_on_ids,
        ValueError,
        r"CategoricalCrossentropy.*one-hot.*SparseCategoricalCrossentropy",
    ),
    Case(
        "labels_for_fewer_rows_than_inputs",
        lambda env: env.fit(y=env.y[:10]),
        ValueError,
        r"'x' sizes: 64\s+'y' sizes: 10",  # Keras' own check.
    ),
    Case(
        "empty_dataset",
        lambda env: env.fit(x=env.dataset(rows=0)),
        ValueError,
        r"training data is empty: it yields no batches",
        marks=needs_tf,
    ),
    Case(
        "unbatched_dataset",
        lambda env: env.fit(x=env.dataset(batch=None)),
        ValueError,
        r"not batched.*\.batch\(",
        marks=needs_tf,
    ),
    Case(
        "temperature_as_a_string",
        lambda env: env.distiller(temperature="4"),
        ValueError,
        r"temperature='4'",
    ),
    Case(
        "distillation_weight_as_a_percentage",
        lambda env: env.distiller(distillation_weight=90),
        ValueError,
        r"distillation_weight.*\[0, 1\].*90",
    ),
    Case(
        "a_layer_as_the_student",
        lambda env: kd_keras.Distiller(
            teacher=env.tiny_mlp(), student=keras.layers.Dense(4)
        ),
        ValueError,
        r"student to be a `keras.Model`",
    ),
    Case(
        "fit_before_compile",
        lambda env: kd_keras.Distiller(
            teacher=env.tiny_mlp(), student=env.tiny_mlp(8)
        ).fit(env.x, env.y, verbose=0),
        ValueError,
        r"call `compile\(\)`",  # Keras' own check.
    ),
    Case(
        "inputs_of_another_width",
        lambda env: env.fit(x=np.ones((64, env.features + 2), "float32")),
        ValueError,
        r"inputs of shape \(64, 10\).*takes \(batch, 8\)",
    ),
    Case(
        "nan_in_cached_teacher_logits",
        lambda env: env.fit(
            x={
                "inputs": env.x,
                "teacher_logits": env.with_nan(np.ones((64, env.num_classes))),
            }
        ),
        ValueError,
        r"cached teacher logits.*NaN or infinite",
    ),
    # The losses.
    Case(
        "zero_temperature_as_a_tensor",
        lambda env: losses.softmax_with_temperature(
            [[1.0, 2.0]], keras.ops.convert_to_tensor(0.0)
        ),
        ValueError,
        r"temperature.*> 0.*Received: temperature=0",
    ),
    Case(
        "zero_temperature_as_a_variable",
        lambda env: losses.distillation_loss(
            [[1.0, 2.0]], [[2.0, 1.0]], keras.Variable(0.0)
        ),
        ValueError,
        r"temperature.*> 0",
    ),
    Case(
        "sample_weight_of_the_wrong_length",
        lambda env: losses.distillation_loss(
            np.ones((4, 3)), np.zeros((4, 3)), 2.0, sample_weight=np.ones(5)
        ),
        ValueError,
        r"sample_weight` of shape \(4,\).*Received: sample_weight of shape \(5,\)",
    ),
    Case(
        "logits_of_different_classes",
        lambda env: losses.distillation_loss(np.ones((4, 3)), np.zeros((4, 5)), 2.0),
        ValueError,
        r"same shape",
    ),
    # Caching and ensembles.
    Case(
        "caching_an_unbatched_dataset",
        lambda env: teachers.cache_teacher_logits(
            env.tiny_mlp(), env.dataset(batch=None)
        ),
        ValueError,
        r"not batched.*\.batch\(",
        marks=needs_tf,
    ),
    Case(
        "caching_an_empty_dataset",
        lambda env: teachers.cache_teacher_logits(env.tiny_mlp(), env.dataset(rows=0)),
        ValueError,
        r"dataset is empty: there is nothing to cache",
        marks=needs_tf,
    ),
    Case(
        "caching_inputs_that_hold_nan",
        lambda env: teachers.cache_teacher_logits(
            env.tiny_mlp(), (env.with_nan(env.x), env.y)
        ),
        ValueError,
        r"inputs of batch 1 hold NaN or infinite",
    ),
    Case(
        "array_batches_of_size_zero",
        lambda env: data.ArrayBatches(env.x, env.y, batch_size=0),
        ValueError,
        r"batch_size=0",
    ),
    Case(
        "ensemble_of_no_models",
        lambda env: teachers.EnsembleTeacher([]),
        ValueError,
        r"at least one",
    ),
    Case(
        "ensemble_of_different_class_counts",
        lambda env: teachers.EnsembleTeacher(
            [env.tiny_mlp(), env.tiny_mlp(num_classes=env.num_classes + 1)]
        ),
        ValueError,
        r"same shape.*\(None, 4\).*\(None, 5\)",
    ),
    # Callbacks.
    Case(
        "schedule_returning_none",
        _schedule_returning_none,
        ValueError,
        r"schedule.*returned None.*epoch 0",
    ),
    Case(
        "snapshot_epochs_as_an_int",
        lambda env: callbacks.TeacherSnapshots(env.tmp_path, epochs=5),
        ValueError,
        r"epochs=\[5\].*every=5",
    ),
    Case(
        "snapshot_epochs_past_the_end",
        _snapshots_past_the_end,
        ValueError,
        r"epochs \[10\].*2 epochs",
    ),
    Case(
        "early_stop_on_an_unlogged_metric",
        _early_stop_on_an_unlogged_metric,
        ValueError,
        r"val_acc.*not logged.*val_accuracy",
        after_an_epoch=True,  # The names are known from the first epoch's logs.
    ),
    Case(
        "early_stop_epoch_negative",
        lambda env: callbacks.StudentEarlyStop(epoch=-1),
        ValueError,
        r"`epoch` to be an integer >= 0\. Received: epoch=-1",
    ),
    Case(
        "schedule_of_an_unknown_parameter",
        lambda env: callbacks.ParameterSchedule(lambda e: 1.0, parameter="lr"),
        ValueError,
        r"parameter='lr'",
    ),
    # Assistants.
    Case(
        "suggest_with_percentages_and_fractions",
        lambda env: assistants.suggest_assistant(
            {"a": 95.0, "b": 90.0}, teacher_accuracy=0.99, student_accuracy=0.85
        ),
        ValueError,
        r"percent.*fractions|fractions.*percent",
    ),
    Case(
        "suggest_with_strings",
        lambda env: assistants.suggest_assistant(
            {"a": "0.9"}, teacher_accuracy=0.99, student_accuracy=0.85
        ),
        ValueError,
        r"'0.9'",
    ),
    Case(
        "suggest_with_accuracies_above_one",
        lambda env: assistants.suggest_assistant(
            {"a": 0.9}, teacher_accuracy=1.5, student_accuracy=0.85
        ),
        ValueError,
        r"teacher_accuracy=1.5",
    ),
    Case(
        "search_paths_with_a_list",
        lambda env: assistants.search_paths(
            env.tiny_mlp(),
            [env.tiny_mlp],
            env.tiny_mlp,
            (env.x, env.y),
            (env.x, env.y),
            workdir=env.tmp_path,
        ),
        ValueError,
        r"candidates.*\{name: builder\}",
    ),
    Case(
        "suggest_with_accuracies_and_builders",
        lambda env: assistants.suggest_assistant(
            {"a": 0.9, "b": env.tiny_mlp}, teacher_accuracy=0.99, student_accuracy=0.85
        ),
        ValueError,
        r"either accuracies or builders",
    ),
    Case(
        "chain_of_other_input_shapes",
        _chain_of_other_input_shapes,
        ValueError,
        r"inputs of shape \(None, 8\).*\(None, 9\)",
    ),
    Case(
        "store_under_a_file",
        _store_under_a_file,
        ValueError,
        r"lies under '.*taken', which is a file",
    ),
    Case(
        "chain_of_one_model",
        lambda env: assistants.distill_chain(
            [env.tiny_mlp()], (env.x, env.y), (env.x, env.y), workdir=env.tmp_path
        ),
        ValueError,
        r"at least a teacher and a student.*Received 1 model",
    ),
    # Tuning.
    Case(
        "tune_with_zero_trials",
        lambda env: _tune(env, max_trials=0),
        ValueError,
        r"max_trials=0",
    ),
    Case(
        "tune_on_an_unlogged_objective",
        lambda env: _tune(env, objective="val_acc"),
        ValueError,
        r"val_acc.*val_accuracy",
    ),
    Case(
        "tune_with_zero_epochs",
        lambda env: _tune(env, epochs=0),
        ValueError,
        r"epochs=0",
    ),
    Case(
        "hypermodel_given_a_model_for_a_builder",
        _hypermodel_with_a_model,
        ValueError,
        r"student_builder.*lambda",
    ),
    Case(
        "sweep_whose_trials_all_fail",
        _tune_with_failing_trials,
        RuntimeError,
        r"Every trial of the sweep failed.*boom",
    ),
    Case(
        "tune_with_an_unknown_tuner",
        lambda env: _tune(env, tuner="grid"),
        ValueError,
        r"tuner='grid'",
    ),
    # Export.
    Case(
        "export_into_an_existing_file",
        _export_into_a_file,
        ValueError,
        r"`directory` '.*student' is a file, not a folder",
        marks=needs_tf,
    ),
    Case(
        "export_test_data_of_the_wrong_width",
        _export_test_data_too_wide,
        ValueError,
        r"test_data.*\(8, 10\).*\(batch, 8\)",
        marks=needs_tf,
    ),
    Case(
        "export_an_unknown_format",
        lambda env: kd_keras.export.export_student(
            env.tiny_mlp(), env.tmp_path, formats=("onnx",)
        ),
        ValueError,
        r"`formats` among .*Received: \('onnx',\)",
    ),
    # Data.
    Case(
        "keep_a_class_that_is_not_there",
        lambda env: data.load("mnist_sample", keep_classes=[10]),
        ValueError,
        r"keep_classes=\[10\].*no examples",
        marks=needs_tf,
    ),
    Case(
        "drop_every_class",
        lambda env: data.load("mnist_sample", drop_classes=range(10)),
        ValueError,
        r"drop_classes.*no examples",
        marks=needs_tf,
    ),
    Case(
        "import_a_truncated_gzip",
        _corrupt_gzip,
        ValueError,
        r"train-images.*truncated or corrupt",
        marks=needs_tf,
    ),
    Case(
        "import_a_file_that_is_not_idx",
        _garbage_gzip,
        ValueError,
        r"t10k-labels.*not an IDX",
        marks=needs_tf,
    ),
    Case(
        "import_from_a_missing_folder",
        lambda env: data.import_mnist(env.tmp_path / "nowhere", env.tmp_path / "t"),
        ValueError,
        r"nowhere",
    ),
    Case(
        "load_an_unknown_split_of_the_sample",
        lambda env: data.load("mnist_sample", split="validation"),
        ValueError,
        r"splits 'train' and 'test'.*Received: split='validation'",
        marks=needs_tf,
    ),
    Case(
        "sample_split_with_no_examples",
        lambda env: data.load("mnist_sample", split="train[8000:]"),
        ValueError,
        r"'train\[8000:\]'.*no examples",
        marks=needs_tf,
    ),
    Case(
        "batch_size_zero",
        lambda env: data.load("mnist_sample", batch_size=0),
        ValueError,
        r"batch_size=0",
        marks=needs_tf,
    ),
    # Models.
    Case(
        "mlp_hidden_as_an_int",
        lambda env: models.mlp(hidden=800),
        ValueError,
        r"such as \(800,\)\. Received: hidden=800",
    ),
    Case(
        "mlp_hidden_as_a_string",
        lambda env: models.mlp(hidden="800,800"),
        ValueError,
        r"such as \(800, 800\)\. Received: hidden='800,800'",
    ),
    Case(
        "mlp_dropout_above_one",
        lambda env: models.mlp(dropout=1.5),
        ValueError,
        r"dropout=1.5",
    ),
    Case(
        "plain_cnn_on_flat_inputs",
        lambda env: models.plain_cnn(4, input_shape=(784,)),
        ValueError,
        r"\(height, width, channels\).*Received: input_shape=\(784,\)",
    ),
    Case(
        "plain_cnn_of_zero_width",
        lambda env: models.plain_cnn(4, width=0),
        ValueError,
        r"width=0",
    ),
]


@pytest.fixture
def env(tiny_mlp, tiny_data, tmp_path, features, num_classes):
    return Env(tiny_mlp, tiny_data, tmp_path, features, num_classes)


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_a_bad_input_gets_a_clear_error(case, env):
    with pytest.raises(case.error, match=re.compile(case.match, re.S)):
        case.run(env)
    assert env.steps == 0 or case.after_an_epoch


def test_the_table_names_each_case_once():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))


def test_a_one_member_ensemble_is_allowed_with_a_warning(tiny_mlp, caplog):
    with caplog.at_level(logging.WARNING, logger="absl"):
        teachers.EnsembleTeacher([tiny_mlp()])
    assert "one member" in caplog.text


def test_a_path_search_without_candidates_warns(tiny_mlp, tiny_data, tmp_path, caplog):
    x, y = tiny_data
    with caplog.at_level(logging.WARNING, logger="absl"):
        result = assistants.search_paths(
            tiny_mlp(seed=1),
            {},
            lambda: tiny_mlp(8, seed=None),
            (x, y),
            (x, y),
            workdir=tmp_path,
            epochs=1,
        )
    assert "no candidates" in caplog.text
    assert [row["path"] for row in result.table] == ["teacher → student"]


def _nan_in_batch_3(tiny_mlp, tiny_data):
    """A compiled Distiller, and unshuffled batches of 16 with a NaN input in
    the third batch."""
    x, y = tiny_data
    x = x.copy()
    x[40, 2] = np.nan
    batches = data.ArrayBatches(x, y, batch_size=16, shuffle=False)
    distiller = kd_keras.Distiller(tiny_mlp(seed=1), tiny_mlp(8, seed=2))
    distiller.compile(optimizer="adam")
    return distiller, batches


def test_a_non_finite_loss_stops_fit_and_keeps_the_last_finite_weights(
    tiny_mlp, tiny_data
):
    # The first batch is clean, so the checks before training pass; batch 3
    # holds a NaN. Its forward pass hides it (ReLU maps NaN to 0) while its
    # gradient turns the weights into NaN: the loss must say so.
    distiller, batches = _nan_in_batch_3(tiny_mlp, tiny_data)
    before = distiller.student.get_weights()
    losses_seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses_seen.append(logs["loss"])
    )
    with pytest.raises(FloatingPointError, match=r"batch 3 of epoch 1"):
        distiller.fit(batches, epochs=2, shuffle=False, verbose=0, callbacks=[record])
    # Batch 3's loss reads NaN, and no batch runs after it.
    assert np.isfinite(losses_seen[:2]).all() and np.isnan(losses_seen[2:]).all()
    assert len(losses_seen) == 3
    after = distiller.student.get_weights()
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


# The command line: every mistake is one line on stderr and a non-zero exit.

CLI_CASES = [
    (["train", "--hidden=12,abc"], r"--hidden: expected integers >= 1 .*'12,abc'"),
    (["distill", "--batch_size=0"], r"--batch_size: expected an integer >= 1"),
    (["train", "--epochs=0"], r"--epochs: expected an integer >= 1, got '0'"),
    (["train", "--learning_rate=-1"], r"--learning_rate: expected a number > 0"),
    (["train", "--dropout=1"], r"--dropout: expected a rate in \[0, 1\)"),
    (["train", "--verbose=3"], r"--verbose: invalid choice: 3"),
    (["train", "--depth=3"], r"--depth: invalid choice: 3"),
    (["distill", "--distillation_weight=1.5"], r"--distillation_weight: .*\[0, 1\]"),
    (["tune", "--temperatures=0,2"], r"--temperatures: expected numbers > 0"),
    (["tune", "--distillation_weights=0.5,1"], r"--distillation_weights: .*min,max"),
    (["tune", "--max_trials=0"], r"--max_trials: expected an integer >= 1"),
    (["reproduce", "hinton-mnist", "--seeds=0"], r"--seeds: expected an integer"),
    (["chain", "--workdir={file}/runs"], r"--workdir: .* is a file"),
    (["train", "--output={file}/m.keras"], r"--output: .* is a file"),
    (["chain", "--sizes=10"], r"at least two --sizes"),
    (["paths", "--candidates=8,8"], r"--candidates: each size once"),
    (
        ["evaluate", "--model={tmp}/none.keras", "--dataset=mnist_sample"],
        r"File not found: filepath=.*none\.keras",
    ),
    (["data", "--idx_dir={tmp}/none", "--data_dir={tmp}/tfds"], r"not a folder"),
    (["teach"], r"invalid choice: 'teach'"),
]


@pytest.mark.parametrize(
    "argv, message", CLI_CASES, ids=[" ".join(argv[:2]) for argv, _ in CLI_CASES]
)
def test_a_cli_mistake_is_one_line_and_a_non_zero_exit(argv, message, tmp_path, capsys):
    from kd_keras.apps import cli

    (tmp_path / "file").write_text("")
    argv = [a.format(file=tmp_path / "file", tmp=tmp_path) for a in argv]
    if argv[0] in ("train", "distill") and not any("--output" in a for a in argv):
        argv.append(f"--output={tmp_path / 'out.keras'}")
    assert cli.run(["kd-keras", *argv]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kd-keras")
    assert re.search(message, lines[0]), lines[0]


# Valid inputs near the checks' edges, which they must let through.


def _input_of_one_feature(env):
    def model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((1,)), keras.layers.Dense(4)])

    distiller = kd_keras.Distiller(model(1), model(2))
    distiller.compile(optimizer="adam")
    # Keras adds the trailing axis of 1 to inputs of shape (batch,).
    distiller.fit(env.x[:, 0], env.y, epochs=1, verbose=0)


def _dict_inputs_by_name(env):
    def model(seed):
        keras.utils.set_random_seed(seed)
        tokens = keras.Input((5,), name="b_tokens")
        features = keras.Input((2,), name="a_features")
        joined = keras.layers.Concatenate()([tokens, features])
        return keras.Model([tokens, features], keras.layers.Dense(4)(joined))

    distiller = kd_keras.Distiller(model(1), model(2))
    distiller.compile(optimizer="adam")
    x = {"a_features": env.x[:, :2], "b_tokens": env.x[:, 2:7]}
    distiller.fit(x, env.y, epochs=1, verbose=0)


def _soft_binary_targets(env):
    def model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((env.features,)), keras.layers.Dense(1)])

    distiller = kd_keras.Distiller(model(1), model(2))
    distiller.compile(optimizer="adam")
    soft = np.linspace(0.0, 1.0, len(env.x)).astype("float32")
    distiller.fit(env.x, soft, epochs=1, verbose=0)


def _numpy_integer_sizes(env):
    data.ArrayBatches(env.x, env.y, batch_size=np.int64(16))
    if BACKEND == "tensorflow":
        data.pipeline((env.x, env.y), batch_size=np.int64(16), limit=np.int32(32))
    models.mlp(hidden=np.array([8, 4]), input_shape=(env.features,))


def _hidden_widths_from_a_generator(env):
    model = models.mlp(hidden=(w for w in (8, 4)), input_shape=(env.features,))
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [8, 4, 10]


def _early_stop_with_validation_every_other_epoch(env):
    stop = callbacks.StudentEarlyStop(monitor="val_loss", patience=5)
    env.distiller().fit(
        env.x,
        env.y,
        validation_data=(env.x, env.y),
        validation_freq=2,
        epochs=2,
        verbose=0,
        callbacks=[stop],
    )


def _infinite_inputs_on_purpose(env):
    x = env.x.copy()
    x[:, -1] = -np.inf  # Such as an additive mask, which the model ignores.

    def model(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((env.features,))
        kept = keras.layers.Lambda(lambda t: t[:, :-1])(inputs)
        return keras.Model(inputs, keras.layers.Dense(4)(kept))

    distiller = kd_keras.Distiller(model(1), model(2), check_finite_inputs=False)
    distiller.compile(optimizer="adam")
    history = distiller.fit(x, env.y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


VALID = [
    _input_of_one_feature,
    _dict_inputs_by_name,
    _soft_binary_targets,
    _numpy_integer_sizes,
    _hidden_widths_from_a_generator,
    _early_stop_with_validation_every_other_epoch,
    _infinite_inputs_on_purpose,
]


@pytest.mark.parametrize("valid", VALID, ids=[f.__name__[1:] for f in VALID])
def test_valid_inputs_near_the_checks_pass(valid, env):
    valid(env)


def test_a_non_finite_loss_in_a_later_epoch_keeps_that_epochs_start(
    tiny_mlp, tiny_data
):
    x, y = tiny_data

    class NanInSecondEpoch(keras.utils.PyDataset):
        """Clean in epoch 1; batch 3 of epoch 2 (the second time batch 3 is
        read: the check before training reads batch 1 only) holds a NaN."""

        reads_of_batch_3 = 0

        def __len__(self):
            return 4

        def __getitem__(self, index):
            rows = slice(16 * index, 16 * index + 16)
            batch = x[rows].copy()
            if index == 2:
                self.reads_of_batch_3 += 1
                if self.reads_of_batch_3 == 2:
                    batch[0, 0] = np.nan
            return batch, y[rows]

    distiller = kd_keras.Distiller(tiny_mlp(seed=1), tiny_mlp(8, seed=2))
    distiller.compile(optimizer="adam")
    after_first = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: after_first.append(
            distiller.student.get_weights()
        )
    )
    # Keras reads a PyDataset ahead in a thread, so the read that turns
    # NaN may be served as batch 3 or 4 of the epoch; the epoch 1 test above
    # checks the exact batch on ArrayBatches.
    with pytest.raises(FloatingPointError, match=r"batch [34] of epoch 2"):
        distiller.fit(
            NanInSecondEpoch(), epochs=3, shuffle=False, verbose=0, callbacks=[record]
        )
    assert len(after_first) == 1
    for old, new in zip(after_first[0], distiller.student.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    # The teacher and T are untouched and readable.
    assert all(np.isfinite(w).all() for w in distiller.teacher.get_weights())
    assert float(keras.ops.convert_to_numpy(distiller.temperature)) == 4.0


def test_a_callback_list_keeps_the_non_finite_stop_and_the_hyperparameter_logs(
    tiny_mlp, tiny_data
):
    # A `keras.callbacks.CallbackList` used to be taken as it was, without
    # the Distiller's own callbacks: a NaN loss trained on silently.
    distiller, batches = _nan_in_batch_3(tiny_mlp, tiny_data)
    x, y = tiny_data
    history = keras.callbacks.History()
    given = keras.callbacks.CallbackList([history], model=distiller)
    with pytest.raises(FloatingPointError, match=r"batch 3 of epoch 1"):
        distiller.fit(batches, epochs=2, shuffle=False, verbose=0, callbacks=given)
    clean = data.ArrayBatches(x[:32], y[:32], batch_size=16, shuffle=False)
    distiller.compile(optimizer="adam")
    distiller.fit(clean, epochs=1, verbose=0, callbacks=given)
    assert history.history["temperature"] == [4.0]
    assert history.history["distillation_weight"] == [pytest.approx(0.9)]


def test_a_nan_stops_fit_after_a_fit_on_cached_data_that_skipped_the_check(
    tiny_mlp, tiny_data
):
    # The batches of `cache_teacher_logits` were checked when cached, so the
    # step skips the per-batch check on them; a later fit on raw data must
    # trace the checking step again.
    distiller, batches = _nan_in_batch_3(tiny_mlp, tiny_data)
    x, y = tiny_data
    cached = kd_keras.cache_teacher_logits(distiller.teacher, (x, y), batch_size=16)
    distiller.fit(cached, epochs=1, verbose=0)
    with pytest.raises(FloatingPointError, match=r"batch 3 of epoch 1"):
        distiller.fit(batches, epochs=1, shuffle=False, verbose=0)
    # A fit on cached data again, then a batch of Keras' own loop.
    distiller.compile(optimizer="adam")  # Its state is NaN.
    distiller.fit(cached, epochs=1, verbose=0)
    bad_x, bad_y = batches[2]
    assert np.isnan(distiller.train_on_batch(bad_x, bad_y, return_dict=True)["loss"])


def test_finite_inputs_whose_sum_overflows_are_finite(tiny_data):
    from kd_keras import distiller

    x, _ = tiny_data
    big = np.full_like(x, 3e38)  # Finite, but their sum is not.
    assert keras.ops.convert_to_numpy(distiller._all_finite({"a": x, "b": big}))
    big[5, 1] = np.inf
    assert not keras.ops.convert_to_numpy(distiller._all_finite({"a": x, "b": big}))
