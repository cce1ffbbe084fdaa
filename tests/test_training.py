"""One-call training and scoring: arrays, optimizers, one-hot labels, resume
safety, and what library calls must leave alone."""

import logging
import warnings

import keras
import numpy as np
import pytest

import kd_keras
from kd_keras import assistants
from kd_keras import training

pytestmark = pytest.mark.all_backends


def test_scores_read_one_hot_labels_as_class_ids(num_classes, tiny_mlp, tiny_data):
    x, y = tiny_data
    model = tiny_mlp(seed=1)
    one_hot = keras.utils.to_categorical(y, num_classes)
    accuracy = training.test_accuracy(model, (x, y))
    assert training.test_accuracy(model, (x, one_hot)) == accuracy
    predicted = np.argmax(model.predict(x, verbose=0), -1)
    assert accuracy == pytest.approx(np.mean(predicted == y))


def test_train_and_distill_accept_arrays(tiny_mlp, tiny_data):
    x, y = tiny_data
    teacher, student = tiny_mlp(32, seed=1), tiny_mlp(8, seed=2)
    history = training.train(
        teacher, (x, y), (x, y), epochs=1, batch_size=16, verbose=0
    )
    assert len(history.history["loss"]) == 1
    before = student.get_weights()[0].copy()
    _, history = training.distill(
        teacher, student, (x, y), (x, y), epochs=1, batch_size=16, verbose=0
    )
    assert "val_distillation_loss" in history.history
    assert not np.allclose(before, student.get_weights()[0])


def test_train_uses_a_copy_of_the_optimizer_it_is_given(tiny_mlp, tiny_data):
    x, y = tiny_data
    model = tiny_mlp(seed=1)
    before = [w.copy() for w in model.get_weights()]
    frozen = keras.optimizers.SGD(learning_rate=0.0)
    training.train(model, (x, y), epochs=1, optimizer=frozen, verbose=0)
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert model.optimizer is not frozen
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    training.train(
        model, (x, y), epochs=1, optimizer="sgd", learning_rate=0.5, verbose=0
    )
    assert float(model.optimizer.learning_rate.numpy()) == 0.5


@pytest.fixture(scope="session")
def epochs_run(tiny_mlp):
    def epochs_run(backup_dir, tiny_data, learning_rate, callbacks=()):
        model = tiny_mlp(seed=1)
        seen = []
        record = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: seen.append(epoch)
        )
        training.train(
            model,
            tiny_data,
            epochs=3,
            learning_rate=learning_rate,
            callbacks=[record, *callbacks],
            backup_dir=backup_dir,
            verbose=0,
        )
        return seen

    return epochs_run


def test_a_backup_resumes_only_the_run_that_made_it(
    epochs_run, interrupt, tiny_data, tmp_path
):
    backup = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):
        epochs_run(backup, tiny_data, 1e-3, [interrupt(2)])
    # Interrupted after epoch 2, backed up after epoch 1: resumed there.
    assert epochs_run(backup, tiny_data, 1e-3) == [1, 2]
    with pytest.raises(KeyboardInterrupt):
        epochs_run(backup, tiny_data, 1e-3, [interrupt(2)])
    assert epochs_run(backup, tiny_data, 1e-2) == [0, 1, 2]  # Other settings.


# Which calls set the seed does not depend on the backend.
@pytest.mark.backend_independent
@pytest.mark.slow
def test_library_calls_never_set_the_global_seed(
    tiny_mlp, tiny_data, tmp_path, monkeypatch
):
    x, y = tiny_data
    teacher = tiny_mlp(32, seed=1)
    monkeypatch.setattr(
        keras.utils,
        "set_random_seed",
        lambda seed: pytest.fail("a library call set the global seed"),
    )

    def new(units):
        return lambda: tiny_mlp(units, seed=None)

    training.distill(teacher, new(8)(), (x, y), epochs=1, verbose=0)
    assistants.distill_chain(
        [teacher, new(16)(), new(8)()],
        (x, y),
        (x, y),
        epochs=1,
        workdir=tmp_path / "chain",
    )
    assistants.search_paths(
        teacher,
        {"16": new(16)},
        new(8),
        (x, y),
        (x, y),
        epochs=1,
        workdir=tmp_path / "paths",
    )
    assistants.suggest_assistant(
        {"16": new(16)},
        teacher=teacher,
        student=new(8),
        train_data=(x, y),
        val_data=(x, y),
    )


def test_fits_on_datasets_do_not_warn_that_shuffle_is_ignored(tiny_mlp, tiny_data):
    import tensorflow as tf

    x, y = tiny_data
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with pytest.warns() as caught:
        training.train(tiny_mlp(seed=1), dataset, epochs=1, verbose=0)
        training.distill(
            tiny_mlp(32, seed=1), tiny_mlp(8), dataset, epochs=1, verbose=0
        )
        warnings.warn("checked", UserWarning, stacklevel=2)  # One at least.
    assert not [w for w in caught if "shuffle" in str(w.message)]


def test_auto_caching_skips_opaque_stages_and_says_why(tiny_mlp, tiny_data, caplog):
    import tensorflow as tf

    x, y = tiny_data
    opaque = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(16)
        .map(lambda a, b: (tf.numpy_function(lambda v: v, [a], tf.float32), b))
    )
    with caplog.at_level(logging.INFO, logger="absl"):
        assert training.should_cache(opaque) is False
    assert "PyFunc" in caplog.text
    with pytest.raises(ValueError, match="allow_random=True"):
        kd_keras.cache_teacher_logits(tiny_mlp(seed=1), opaque)


def test_a_backup_folder_with_other_files_is_refused(epochs_run, tiny_data, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        epochs_run(folder, tiny_data, 1e-3)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_a_resumed_epoch_switch_stays_off(interrupt, tiny_mlp, tiny_data, tmp_path):
    from kd_keras.callbacks import StudentEarlyStop

    def run(*extra):
        stop = StudentEarlyStop(epoch=2)
        distiller, history = training.distill(
            tiny_mlp(32, seed=1),
            tiny_mlp(8, seed=2),
            tiny_data,
            epochs=4,
            callbacks=[stop, *extra],
            backup_dir=tmp_path / "backup",
            verbose=0,
        )
        return stop, distiller, history

    # Killed at the end of epoch 3 (from 0), before its backup: the rerun
    # resumes after the switch at epoch 2, which the callback must recall.
    with pytest.raises(KeyboardInterrupt):
        run(interrupt(4))
    stop, distiller, history = run()
    assert history.history["distillation_weight"] == [0.0]
    assert stop.switch_epoch == 2
    assert float(distiller.distillation_weight.numpy()) == pytest.approx(0.9)


def test_a_trained_teacher_is_shared_whatever_the_distillation_settings(
    tiny_mlp, tiny_data, tmp_path
):
    from kd_keras import store

    models = store.ModelStore(tmp_path)
    first = store.Settings(epochs=1, temperature=2.0)
    second = store.Settings(epochs=1, temperature=8.0)
    models.train(tiny_mlp(seed=1), tiny_data, settings=first)
    _, entry = models.train(tiny_mlp(seed=1), tiny_data, settings=second)
    assert entry["reused"]
    _, entry = models.train(
        tiny_mlp(seed=1), tiny_data, settings=store.Settings(epochs=2)
    )
    assert not entry["reused"]
    # Another seed is another run, as in a seed study.
    _, entry = models.train(
        tiny_mlp(seed=1), tiny_data, settings=store.Settings(epochs=1, seed=7)
    )
    assert not entry["reused"]


def test_a_model_rebuilt_unseeded_resumes_its_backup(
    interrupt, tiny_mlp, tiny_data, tmp_path
):
    # As a chain step rebuilt in a new process: same architecture, other
    # initial weights. The backup replaces the weights, so the run resumes.
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seen.append(epoch)
    )

    def run(*extra):
        training.train(
            tiny_mlp(seed=None),
            tiny_data,
            epochs=3,
            callbacks=[record, *extra],
            backup_dir=tmp_path / "backup",
            verbose=0,
        )

    with pytest.raises(KeyboardInterrupt):
        run(interrupt(2))
    seen.clear()
    run()
    assert seen == [1, 2]


def test_changing_the_early_stop_starts_a_distillation_afresh(
    interrupt, tiny_mlp, tiny_data, tmp_path
):
    from kd_keras.callbacks import StudentEarlyStop

    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seen.append(epoch)
    )

    def run(switch, *extra):
        training.distill(
            tiny_mlp(32, seed=1),
            tiny_mlp(8, seed=2),
            tiny_data,
            epochs=3,
            callbacks=[StudentEarlyStop(epoch=switch), record, *extra],
            backup_dir=tmp_path / "backup",
            verbose=0,
        )

    with pytest.raises(KeyboardInterrupt):
        run(1, interrupt(2))
    seen.clear()
    run(2)
    assert seen == [0, 1, 2]
