import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

from kd_keras import tuning

pytestmark = pytest.mark.all_backends


@pytest.fixture(scope="session")
def splits(features):
    def splits(seed=1):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(96, features)).astype("float32")
        y = (x[:, 0] > 0).astype("int32") + 2 * (x[:, 1] > 0).astype("int32")
        train = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(16)
        val = tf.data.Dataset.from_tensor_slices((x[64:], y[64:])).batch(16)
        return train, val

    return splits


class CountingHyperModel(tuning.DistillationHyperModel):
    """Counts the trials it fits."""

    fits = 0

    def fit(self, hp, model, *args, **kwargs):
        CountingHyperModel.fits += 1
        return super().fit(hp, model, *args, **kwargs)


@pytest.fixture(scope="session")
def hypermodel(tiny_mlp):
    def hypermodel(teacher=None, cls=tuning.DistillationHyperModel, **kwargs):
        settings = dict(
            assistant_builder=lambda width: tiny_mlp(width),
            assistant_sizes=[8],
            temperatures=[1.0, 4.0],
            distillation_weights=(0.5, 1.0, 0.25),
        )
        settings.update(kwargs)
        return cls(teacher or tiny_mlp(32, seed=1), lambda: tiny_mlp(4), **settings)

    return hypermodel


# A sweep runs on JAX in tests/test_backends.py (without TensorFlow), and
# trials below run on JAX.
@pytest.mark.backend_independent
def test_a_tiny_sweep_returns_the_best_hyperparameters(
    counting_teacher, hypermodel, splits, tiny_mlp, tmp_path
):
    teacher = counting_teacher()
    model = hypermodel(teacher)
    tuner, best = tuning.tune(
        model,
        *splits(),
        tuner="bayesian",
        max_trials=4,
        epochs=2,
        directory=tmp_path,
        project_name="p",
    )
    assert set(best.values) == {"assistant_size", "temperature", "distillation_weight"}
    rows = tuning.trials_table(tuner)
    assert len(rows) == 4
    assert max(r["score"] for r in rows) == pytest.approx(
        tuner.oracle.get_best_trials(1)[0].score
    )
    # The teacher ran once over each dataset, whatever the number of trials.
    assert model.teacher_passes == {"train": 1, "validation": 1}
    assert teacher.count() == 4 + 2
    project = tmp_path / "p"
    saved = json.loads((project / "best_hyperparameters.json").read_text())
    assert saved["values"] == best.values
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best_model = tuner.get_best_models(1)[0]
    assert best_model.student.count_params() == tiny_mlp(4).count_params()
    # The optimizer's state is restored too, not skipped with a warning.
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]


def test_an_assistant_trial_distils_the_teacher_into_the_assistant_first(
    hypermodel, splits, tmp_path
):
    train, val = splits()
    model = hypermodel()
    hp = keras_tuner.HyperParameters()
    hp.Fixed("assistant_size", "8")
    distiller = model.build(hp)
    assistant = distiller.teacher
    before = [w.copy() for w in assistant.get_weights()]
    cached = model.cache(train, "train")
    model.fit(
        hp,
        distiller,
        cached,
        validation_data=model.cache(val, "v"),
        epochs=1,
        shuffle=False,
    )
    assert not np.allclose(before[0], assistant.get_weights()[0])
    assert assistant.trainable is False


# Files, fingerprints and the oracle: the same on every backend.
@pytest.mark.backend_independent
def test_a_resumed_sweep_does_not_run_finished_trials_again(
    hypermodel, splits, tmp_path
):
    CountingHyperModel.fits = 0
    arguments = dict(tuner="random", epochs=1, directory=tmp_path, project_name="p")
    tuning.tune(
        hypermodel(cls=CountingHyperModel), *splits(), max_trials=2, **arguments
    )
    assert CountingHyperModel.fits == 2
    tuner, _ = tuning.tune(
        hypermodel(cls=CountingHyperModel), *splits(), max_trials=3, **arguments
    )
    assert CountingHyperModel.fits == 3
    assert len(tuner.oracle.trials) == 3


# Files, fingerprints and the oracle: the same on every backend.
@pytest.mark.backend_independent
def test_an_interrupted_trial_is_run_again_on_resume(hypermodel, splits, tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if CountingHyperModel.fits == 2:
                raise KeyboardInterrupt

    CountingHyperModel.fits = 0
    arguments = dict(
        tuner="random", epochs=1, directory=tmp_path, project_name="p", max_trials=3
    )
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(
            hypermodel(cls=CountingHyperModel),
            *splits(),
            callbacks=[Interrupt()],
            **arguments,
        )
    assert CountingHyperModel.fits == 2
    tuner, _ = tuning.tune(hypermodel(cls=CountingHyperModel), *splits(), **arguments)
    # Trial 1 is kept; the interrupted trial 2 and trial 3 run.
    assert CountingHyperModel.fits == 4
    assert sorted(r["status"] for r in tuning.trials_table(tuner)) == ["COMPLETED"] * 3


WORKER = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras
    import kd_keras

    def mlp(units, seed=0):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((8,)),
                                 keras.layers.Dense(units, activation="relu"),
                                 keras.layers.Dense(4)])

    x = np.random.default_rng(1).normal(size=(96, 8)).astype("float32")
    y = ((x[:, 0] > 0) + 2 * (x[:, 1] > 0)).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(16)
    val = tf.data.Dataset.from_tensor_slices((x[64:], y[64:])).batch(16)
    hypermodel = kd_keras.tuning.DistillationHyperModel(
        mlp(32, seed=1), lambda: mlp(4), assistant_builder=mlp,
        assistant_sizes=[8], temperatures=[1.0, 4.0],
        distillation_weights=(0.5, 1.0, 0.25))
    tuner, best = kd_keras.tuning.tune(
        hypermodel, train, val, tuner="random", max_trials=4,
        epochs=1, directory={directory!r}, project_name="distributed")
    print("done", best is None)
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_chief_and_two_workers_on_loopback_record_every_trial(tmp_path):
    script = WORKER.format(directory=str(tmp_path))
    base = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        KERASTUNER_ORACLE_IP="127.0.0.1",
        KERASTUNER_ORACLE_PORT=str(free_port()),
    )
    processes = {
        tuner_id: subprocess.Popen(
            [sys.executable, "-c", script],
            env=dict(base, KERASTUNER_TUNER_ID=tuner_id),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tuner_id in ("chief", "tuner0", "tuner1")
    }
    outputs = {k: p.communicate(timeout=300) for k, p in processes.items()}
    for tuner_id, process in processes.items():
        assert process.returncode == 0, outputs[tuner_id][1][-3000:]
    assert "done True" in outputs["tuner0"][0]
    assert "done False" in outputs["chief"][0]
    trials = json.loads((tmp_path / "distributed" / "trials.json").read_text())
    assert len(trials) == 4
    assert {t["status"] for t in trials} == {"COMPLETED"}
    assert all(t["score"] is not None for t in trials)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperatures": []}, "temperatures"),
        ({"temperatures": [2.0, 0.0]}, "temperatures"),
        ({"distillation_weights": (0.5, 0.2, 0.1)}, "min <= max"),
        ({"distillation_weights": (0.0, 1.5, 0.1)}, "min <= max"),
        ({"distillation_weights": (0.0, 1.0, 0.0)}, "step > 0"),
        ({"distillation_weights": (0.0, 1.0)}, r"\(min, max, step\)"),
        ({"assistant_builder": None}, "assistant_builder"),
        ({"assistant_sizes": []}, "assistant_sizes"),
        ({"mixed_precision": "float8"}, "mixed_precision"),
    ],
)
def test_bad_ranges_raise(hypermodel, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hypermodel(**kwargs)


def test_an_unknown_tuner_raises(hypermodel, splits, tmp_path):
    with pytest.raises(ValueError, match="tuner"):
        tuning.tune(
            hypermodel(), *splits(), tuner="grid", directory=tmp_path, project_name="p"
        )


def test_mixed_float16_students_train_with_loss_scaling(hypermodel, splits):
    model = hypermodel(mixed_precision="mixed_float16")
    distiller = model.build(keras_tuner.HyperParameters())
    assert distiller.student.layers[-1].compute_dtype == "float16"
    assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    assert keras.config.dtype_policy().name == "float32"
    x, y = next(splits()[0].as_numpy_iterator())
    logs = distiller.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["distillation_loss"]) and np.isfinite(logs["loss"])


# Files, fingerprints and the oracle: the same on every backend.
@pytest.mark.backend_independent
def test_trials_are_listed_in_numeric_order(hypermodel, splits, tmp_path):
    tuner, _ = tuning.tune(
        hypermodel(),
        *splits(),
        tuner="random",
        max_trials=3,
        epochs=1,
        directory=tmp_path,
        project_name="p",
    )
    assert [int(r["trial"]) for r in tuning.trials_table(tuner)] == [0, 1, 2]


def test_mixed_precision_and_jit_compile_options(hypermodel, splits):
    model = hypermodel(mixed_precision="mixed_bfloat16", jit_compile=False)
    distiller = model.build(keras_tuner.HyperParameters())
    assert distiller.student.layers[-1].compute_dtype == "bfloat16"
    assert keras.config.dtype_policy().name == "float32"
    assert distiller.jit_compile is False
    x, y = next(splits()[0].as_numpy_iterator())
    logs = distiller.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])


# Files, fingerprints and the oracle: the same on every backend.
@pytest.mark.backend_independent
def test_resuming_a_sweep_with_other_settings_raises(hypermodel, splits, tmp_path):
    arguments = dict(tuner="random", max_trials=1, directory=tmp_path, project_name="p")
    tuning.tune(hypermodel(), *splits(), epochs=1, **arguments)
    with pytest.raises(ValueError, match="ran with another epochs.*overwrite"):
        tuning.tune(hypermodel(), *splits(), epochs=2, **arguments)
    with pytest.raises(ValueError, match="training data"):
        tuning.tune(hypermodel(), *splits(seed=7), epochs=1, **arguments)
    tuner, _ = tuning.tune(
        hypermodel(), *splits(seed=7), epochs=1, overwrite=True, **arguments
    )
    assert len(tuner.oracle.trials) == 1


def test_the_weight_grid_includes_its_maximum(hypermodel):
    model = hypermodel(distillation_weights=(0.05, 1.0, 0.05))
    hp = keras_tuner.HyperParameters()
    model.build(hp)
    grid = next(h for h in hp.space if h.name == "distillation_weight")
    assert round(grid.max_value, 6) >= 1.0
    hp.values["distillation_weight"] = grid.max_value
    assert model._weight(hp) == 1.0


class RecordingHyperModel(tuning.DistillationHyperModel):
    """Records assistant trainings, and the assistants trials start or end
    with."""

    assistant_trainings = 0
    trained = []  # each fresh trial's assistant after its training
    restored = []  # each continued trial's assistant as it starts

    def _compiled(self, teacher, student, *args, **kwargs):
        if student.name == "assistant":
            RecordingHyperModel.assistant_trainings += 1
        return super()._compiled(teacher, student, *args, **kwargs)

    def fit(self, hp, model, *args, **kwargs):
        assistant = model.teacher if model.teacher is not self.teacher else None
        if assistant is not None and kwargs.get("initial_epoch", 0) > 0:
            RecordingHyperModel.restored.append(assistant.get_weights())
        history = super().fit(hp, model, *args, **kwargs)
        if assistant is not None and kwargs.get("initial_epoch", 0) == 0:
            RecordingHyperModel.trained.append(assistant.get_weights())
        return history


# Files, fingerprints and the oracle: the same on every backend.
@pytest.mark.backend_independent
def test_hyperband_continues_assistant_trials_without_retraining(
    hypermodel, splits, tiny_mlp, tmp_path
):
    # Hyperband's later rounds reload a trial's checkpoint and train on: the
    # trained assistant must come back with it, not be trained again.
    model = hypermodel(
        cls=RecordingHyperModel,
        assistant_builder=lambda w: tiny_mlp(w, name="assistant"),
        temperatures=[1.0, 2.0, 4.0, 8.0],
        distillation_weights=(0.5, 0.5, 0.25),
    )
    # keras-tuner's own way to pin a hyperparameter: every trial has the
    # assistant.
    fixed = keras_tuner.HyperParameters()
    fixed.Fixed("assistant_size", "8")
    tuner, best = tuning.tune(
        model,
        *splits(),
        tuner="hyperband",
        epochs=3,
        directory=tmp_path,
        project_name="p",
        factor=3,
        hyperband_iterations=1,
        hyperparameters=fixed,
    )
    assert best is not None
    recorder = RecordingHyperModel
    assert recorder.restored, "the sweep should continue an assistant trial"
    assert recorder.assistant_trainings == len(recorder.trained)

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    for weights in recorder.restored:
        assert any(same(weights, trained) for trained in recorder.trained)
    assert model.teacher_passes == {"train": 1, "validation": 1}


# Files, fingerprints and the oracle: the same on every backend.
@pytest.mark.backend_independent
def test_a_second_sweep_in_the_same_session_resumes(
    hypermodel, splits, tiny_mlp, tmp_path
):
    teacher = tiny_mlp(32, seed=1)
    for _ in range(2):  # The first sweep froze the teacher.
        tuner, best = tuning.tune(
            hypermodel(teacher),
            *splits(),
            tuner="random",
            max_trials=2,
            epochs=1,
            directory=tmp_path,
            project_name="p",
        )
    assert best is not None and len(tuning.trials_table(tuner)) == 2


# keras-tuner's search space does not depend on the backend.
@pytest.mark.backend_independent
def test_a_sweep_chooses_the_loss_and_its_own_hyperparameters(
    hypermodel, splits, tmp_path
):
    from kd_keras import losses

    model = hypermodel(
        assistant_builder=None,
        assistant_sizes=(),
        temperatures=[4.0],
        distillation_weights=(0.5, 0.5, 0.1),
        losses={
            "kd": losses.SoftTargets(),
            "dkd": lambda hp: losses.DecoupledKD(
                beta=hp.Choice("dkd_beta", [2.0, 8.0])
            ),
            "dist": losses.DIST(),
        },
    )
    # Four distinct trials: kd, dist, and dkd with either weight.
    tuner, _ = tuning.tune(
        model,
        *splits(),
        tuner="random",
        max_trials=8,
        epochs=1,
        directory=tmp_path,
        project_name="p",
        seed=3,
    )
    trials = [t.hyperparameters for t in tuner.oracle.trials.values()]
    chosen = {hp.values["loss"] for hp in trials}
    assert chosen == {"kd", "dkd", "dist"}
    for hp in trials:
        # The DKD weight is searched, and set, only in DKD's trials.
        assert ("dkd_beta" in hp.values) == (hp.values["loss"] == "dkd")
        built = model.build(hp)
        ((loss, _),) = built._terms.weighted
        expected = {"kd": "SoftTargets", "dkd": "DecoupledKD", "dist": "DIST"}
        assert type(loss).__name__ == expected[hp.values["loss"]]
        if hp.values["loss"] == "dkd":
            assert loss.beta == hp.values["dkd_beta"]
    assert {row["loss"] for row in tuning.trials_table(tuner)} == chosen
    # DKD's weight is in the search space from the start, and both of its
    # values were tried.
    assert "dkd_beta" in [h.name for h in tuner.oracle.hyperparameters.space]
    betas = {hp.values["dkd_beta"] for hp in trials if hp.values["loss"] == "dkd"}
    assert betas == {2.0, 8.0}


def test_loss_choices_must_be_losses(hypermodel):
    with pytest.raises(ValueError, match=r"losses\['kd'\].*Received: 'soft'"):
        hypermodel(losses={"kd": "soft"})


# The feature path itself runs on JAX in test_feature_losses.
def test_a_sweep_over_a_feature_loss_runs_the_teacher_on_the_fly(
    hypermodel, splits, tmp_path
):
    from kd_keras import losses

    def first_layer(model, inputs):
        return model.layers[0](inputs)

    model = hypermodel(
        assistant_builder=None,
        assistant_sizes=(),
        losses={
            "hint": lambda hp: [
                losses.SoftTargets(),
                (
                    losses.FeatureHint(first_layer, first_layer),
                    hp.Choice("hint_weight", [0.1, 1.0]),
                ),
            ]
        },
    )
    assert model.needs_features
    tuner, best = tuning.tune(
        model,
        *splits(),
        tuner="random",
        max_trials=2,
        epochs=1,
        directory=tmp_path,
        project_name="p",
    )
    assert model.teacher_passes == {}  # Features are not cached.
    built = model.build(best)
    assert [type(loss).__name__ for loss, _ in built._terms.weighted] == [
        "SoftTargets",
        "FeatureHint",
    ]
    assert built._terms.weighted[1][1] == best.values["hint_weight"]


def test_a_trial_that_picks_a_feature_loss_gets_uncached_data(hypermodel, splits):

    from kd_keras import losses

    def first_layer(model, inputs):
        return model.layers[0](inputs)

    def loss(hp):  # The default (probed) has no feature loss.
        if hp.Boolean("hint"):
            return [losses.SoftTargets(), losses.FeatureHint(first_layer, first_layer)]
        return losses.SoftTargets()

    model = hypermodel(assistant_builder=None, assistant_sizes=(), losses={"x": loss})
    assert not model.needs_features
    hp = keras_tuner.HyperParameters()
    model.build(hp)
    hp.values["hint"] = True
    distiller = model.build(hp)
    train, val = splits()
    history = model.fit(
        hp,
        distiller,
        model.cache(train, "train"),
        validation_data=model.cache(val, "validation"),
        epochs=1,
        verbose=0,
    )
    assert np.isfinite(history.history["feature_hint_loss"][0])
