import logging

import keras
import numpy as np
import pytest

import kd_keras
from kd_keras.callbacks import ParameterSchedule
from kd_keras.callbacks import StudentEarlyStop
from kd_keras.callbacks import TeacherSnapshots

pytestmark = pytest.mark.all_backends


@pytest.fixture(scope="session")
def distiller_for(tiny_mlp):
    def distiller_for(teacher=None, optimizer="sgd", **kwargs):
        distiller = kd_keras.Distiller(
            teacher or tiny_mlp(32, seed=1), tiny_mlp(8, seed=2), **kwargs
        )
        distiller.compile(optimizer, metrics=["accuracy"])
        return distiller

    return distiller_for


# StudentEarlyStop.


def test_distillation_weight_becomes_zero_exactly_at_the_given_epoch(
    distiller_for, tiny_data
):
    x, y = tiny_data
    stop = StudentEarlyStop(epoch=2)
    history = distiller_for().fit(
        x, y, batch_size=16, epochs=4, verbose=0, callbacks=[stop]
    )
    assert history.history["distillation_weight"] == pytest.approx([0.9, 0.9, 0.0, 0.0])
    assert history.history["distillation_active"] == [1.0, 1.0, 0.0, 0.0]
    assert history.history["distillation_loss"][2:] == [0.0, 0.0]
    assert stop.switch_epoch == 2


def test_teacher_is_not_called_after_the_cutoff(
    counting_teacher, distiller_for, tiny_data
):
    x, y = tiny_data
    teacher = counting_teacher()
    distiller = distiller_for(teacher)
    distiller.fit(
        x, y, batch_size=16, epochs=5, verbose=0, callbacks=[StudentEarlyStop(epoch=2)]
    )
    assert teacher.count() == 2 * (len(x) // 16)


def test_a_plateau_of_the_monitored_metric_triggers_the_switch(
    distiller_for, tiny_data
):
    x, y = tiny_data
    # With a zero learning rate val_loss never improves.
    distiller = distiller_for(optimizer=keras.optimizers.SGD(0.0))
    stop = StudentEarlyStop(monitor="val_loss", patience=2)
    history = distiller.fit(
        x, y, validation_data=(x, y), epochs=5, verbose=0, callbacks=[stop]
    )
    assert stop.switch_epoch == 3
    assert history.history["distillation_active"] == [1, 1, 1, 0, 0]
    assert len(history.history["loss"]) == 5


def test_an_improving_metric_does_not_trigger_the_switch(distiller_for, tiny_data):
    x, y = tiny_data
    distiller = distiller_for(optimizer=keras.optimizers.SGD(0.05))
    stop = StudentEarlyStop(monitor="loss", patience=1)
    history = distiller.fit(x, y, batch_size=64, epochs=4, verbose=0, callbacks=[stop])
    assert np.all(np.diff(history.history["loss"]) < 0)
    assert stop.switch_epoch is None


def test_the_switch_is_logged(distiller_for, tiny_data, caplog):
    x, y = tiny_data
    with caplog.at_level(logging.INFO, logger="absl"):
        distiller_for().fit(
            x, y, epochs=2, verbose=0, callbacks=[StudentEarlyStop(epoch=1)]
        )
    assert "labels only from epoch 2" in caplog.text


def test_student_early_stop_works_on_cached_logits(
    counting_teacher, distiller_for, tiny_data
):
    x, y = tiny_data
    teacher = counting_teacher()
    cached = kd_keras.cache_teacher_logits(teacher, (x, y), batch_size=16)
    calls = teacher.count()
    history = distiller_for(teacher).fit(
        cached, epochs=3, verbose=0, callbacks=[StudentEarlyStop(epoch=1)]
    )
    assert history.history["distillation_weight"] == pytest.approx([0.9, 0.0, 0.0])
    assert history.history["distillation_loss"][0] > 0
    assert teacher.count() == calls


def test_student_early_stop_needs_an_epoch_or_a_monitor():
    with pytest.raises(ValueError, match="`epoch`.*`monitor`"):
        StudentEarlyStop()
    with pytest.raises(ValueError, match="epoch"):
        StudentEarlyStop(epoch=-1)


def test_distiller_callbacks_on_another_model_raise_before_training(
    tiny_mlp, tiny_data
):
    x, y = tiny_data
    model = tiny_mlp()
    model.compile("sgd", "mse")
    before = [w.copy() for w in model.get_weights()]
    for callback in (StudentEarlyStop(epoch=1), ParameterSchedule(lambda epoch: 2.0)):
        with pytest.raises(ValueError, match="distiller.fit"):
            model.fit(
                x,
                keras.utils.to_categorical(y),
                epochs=1,
                verbose=0,
                callbacks=[callback],
            )
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


# TeacherSnapshots.


def test_snapshots_and_manifest_are_written_at_the_chosen_epochs(
    tiny_mlp, tiny_data, tmp_path
):
    x, y = tiny_data
    model = tiny_mlp(seed=4)
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    weights_after = {}
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: weights_after.setdefault(
            epoch + 1, model.get_weights()
        )
    )
    snapshots = TeacherSnapshots(tmp_path / "snaps", epochs=[1, 3])
    model.fit(x, y, epochs=4, verbose=0, callbacks=[snapshots, record])
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == [
        "epoch_001.keras",
        "epoch_003.keras",
        "manifest.json",
    ]
    manifest = TeacherSnapshots.read_manifest(tmp_path / "snaps")
    assert list(manifest) == ["1", "3"]
    assert {"loss", "accuracy"} <= set(manifest["3"]["metrics"])
    early = TeacherSnapshots.load(tmp_path / "snaps", 3)
    for saved, expected in zip(early.get_weights(), weights_after[3], strict=True):
        np.testing.assert_array_equal(saved, expected)


def test_every_saves_periodically_and_a_missing_epoch_names_the_others(
    tiny_mlp, tiny_data, tmp_path
):
    x, y = tiny_data
    model = tiny_mlp()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(
        x, y, epochs=4, verbose=0, callbacks=[TeacherSnapshots(tmp_path, every=2)]
    )
    assert list(TeacherSnapshots.read_manifest(tmp_path)) == ["2", "4"]
    with pytest.raises(ValueError, match="Available epochs: 2, 4"):
        TeacherSnapshots.load(tmp_path, 3)


def test_teacher_snapshots_rejects_bad_epochs(tmp_path):
    with pytest.raises(ValueError, match="`epochs`.*`every`"):
        TeacherSnapshots(tmp_path)
    with pytest.raises(ValueError, match="counted from 1"):
        TeacherSnapshots(tmp_path, epochs=[0, 5])


# ParameterSchedule.


def test_a_temperature_schedule_is_applied_and_logged(distiller_for, tiny_data):
    x, y = tiny_data
    history = distiller_for().fit(
        x,
        y,
        epochs=3,
        verbose=0,
        callbacks=[ParameterSchedule(lambda epoch: 1.0 + epoch)],
    )
    assert history.history["temperature"] == pytest.approx([1.0, 2.0, 3.0])


def test_a_schedule_may_use_the_current_value(distiller_for, tiny_data):
    x, y = tiny_data
    halve = ParameterSchedule(
        lambda epoch, weight: weight / 2, parameter="distillation_weight"
    )
    history = distiller_for(distillation_weight=0.8).fit(
        x, y, epochs=3, verbose=0, callbacks=[halve]
    )
    assert history.history["distillation_weight"] == pytest.approx([0.4, 0.2, 0.1])


@pytest.mark.parametrize(
    "schedule, epochs_before_the_error",
    [
        # A schedule of the epoch alone is checked for every epoch up front.
        (lambda epoch: 2.0 - epoch, []),
        # One of the current value too can only be checked as it runs.
        (lambda epoch, current: 2.0 - epoch, [0, 1]),
    ],
    ids=["of_the_epoch", "of_the_epoch_and_value"],
)
def test_a_schedule_returning_a_bad_value_raises_before_that_epoch(
    distiller_for, tiny_data, schedule, epochs_before_the_error
):
    x, y = tiny_data
    distiller = distiller_for()
    epochs_run = []
    with pytest.raises(ValueError, match=r"returned 0\.0 for epoch 2.*temperature"):
        distiller.fit(
            x,
            y,
            epochs=3,
            verbose=0,
            callbacks=[
                ParameterSchedule(schedule),
                keras.callbacks.LambdaCallback(
                    on_epoch_end=lambda epoch, logs: epochs_run.append(epoch)
                ),
            ],
        )
    assert epochs_run == epochs_before_the_error


def test_an_error_inside_a_two_argument_schedule_is_not_hidden(
    distiller_for, tiny_data
):
    def broken(epoch, current):
        raise TypeError("broken schedule")

    x, y = tiny_data
    with pytest.raises(TypeError, match="broken schedule"):
        distiller_for().fit(
            x, y, epochs=1, verbose=0, callbacks=[ParameterSchedule(broken)]
        )


def test_parameter_schedule_rejects_unknown_parameters():
    with pytest.raises(ValueError, match="parameter"):
        ParameterSchedule(lambda epoch: 1.0, parameter="alpha")
    with pytest.raises(ValueError, match="function"):
        ParameterSchedule(3.0)


def test_the_distillation_weight_comes_back_after_fit(distiller_for, tiny_data):
    x, y = tiny_data
    distiller = distiller_for()
    distiller.fit(x, y, epochs=2, verbose=0, callbacks=[StudentEarlyStop(epoch=1)])
    assert float(distiller.distillation_weight.numpy()) == pytest.approx(0.9)
    history = distiller.fit(x, y, epochs=1, verbose=0)
    assert history.history["distillation_weight"] == [pytest.approx(0.9)]


def test_a_new_run_drops_the_snapshots_of_an_earlier_run(tiny_mlp, tiny_data, tmp_path):
    x, y = tiny_data
    for epochs, _wanted in ((4, [2, 4]), (2, [2])):
        model = tiny_mlp()
        model.compile(
            "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.fit(
            x,
            y,
            epochs=epochs,
            verbose=0,
            callbacks=[TeacherSnapshots(tmp_path, every=2)],
        )
    assert list(TeacherSnapshots.read_manifest(tmp_path)) == ["2"]
    assert not (tmp_path / "epoch_004.keras").exists()


def test_a_change_between_two_batches_applies_from_the_next_step(
    counting_teacher, distiller_for, tiny_data
):
    # On JAX the training state lives outside the variables during an
    # epoch; assigning them must bring it back, not be overwritten by it.
    x, y = tiny_data
    teacher = counting_teacher()
    distiller = distiller_for(teacher, distillation_weight=0.0)
    seen = []

    def switch_on(batch, logs):
        if batch == 1:
            distiller.distillation_weight = 1.0
        seen.append(float(distiller.distillation_weight.numpy()))

    history = distiller.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=switch_on)],
    )
    assert seen == [0.0, 1.0, 1.0, 1.0]
    assert teacher.count() == 2  # Batches 3 and 4 of 4.
    assert history.history["distillation_weight"] == [1.0]
    assert float(distiller.distillation_weight.numpy()) == 1.0


def test_a_resumed_monitored_switch_keeps_its_epoch_and_weight(
    interrupt, tiny_mlp, tiny_data, tmp_path
):
    from kd_keras import training

    def run(*extra):
        # A zero learning rate: val_loss never improves, so the term goes
        # off after the first epoch.
        stop = StudentEarlyStop(monitor="val_loss", patience=0, min_delta=1e-3)
        teacher, student = tiny_mlp(32, seed=1), tiny_mlp(8, seed=2)
        distiller, _ = training.distill(
            teacher,
            student,
            tiny_data,
            tiny_data,
            epochs=4,
            optimizer=keras.optimizers.SGD(0.0),
            callbacks=[stop, *extra],
            backup_dir=tmp_path / "backup",
            verbose=0,
        )
        return stop, distiller

    with pytest.raises(KeyboardInterrupt):
        run(interrupt(3))
    stop, distiller = run()
    assert stop.switch_epoch == 2
    assert float(distiller.distillation_weight.numpy()) == pytest.approx(0.9)
