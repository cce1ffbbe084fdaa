"""kd_keras on a machine without TensorFlow, and on PyTorch where it is
installed. Each runs in a process of its own, since Keras picks its backend
once, at import."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

# Makes `import tensorflow` fail, as on a machine where it is not installed.
WITHOUT_TENSORFLOW = textwrap.dedent("""
    import sys

    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoTensorFlow())
""")

# Tiny models and data for the scripts below.
MODELS_AND_DATA = textwrap.dedent("""
    import json, pathlib, sys, tempfile
    import numpy as np, keras
    import kd_keras

    def mlp(units, seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((8,)),
                                 keras.layers.Dense(units, "relu"),
                                 keras.layers.Dense(4)])

    def tiny_data(rows):
        x = np.random.default_rng(0).normal(size=(rows, 8)).astype("float32")
        return x, ((x[:, 0] > 0) + 2 * (x[:, 1] > 0)).astype("int32")
""")

# Everything above the Distiller, on arrays, without TensorFlow.
WITHOUT_TENSORFLOW_RUN = (
    WITHOUT_TENSORFLOW
    + MODELS_AND_DATA
    + textwrap.dedent("""
    from kd_keras import assistants, callbacks, data, export, tuning

    x, y = tiny_data(128)
    train = data.ArrayBatches(x[:96], y[:96], batch_size=16, shuffle=True,
                              seed=0)
    val = data.ArrayBatches(x[96:], y[96:], batch_size=16)
    teacher = kd_keras.EnsembleTeacher([mlp(32, 1), mlp(32, 2)])
    cached = kd_keras.cache_teacher_logits(teacher, train)
    distiller = kd_keras.Distiller(teacher, mlp(8, 3))
    distiller.compile("adam", metrics=["accuracy"])
    history = distiller.fit(cached, validation_data=val, epochs=2, verbose=0,
                            callbacks=[callbacks.StudentEarlyStop(epoch=1)])
    work = pathlib.Path(tempfile.mkdtemp())
    student, report = assistants.distill_chain(
        [teacher, mlp(16, 4), mlp(8, 5)], train, val, workdir=work / "chain",
        epochs=1, verbose=0)
    hypermodel = tuning.DistillationHyperModel(
        teacher, lambda: mlp(8, 6), temperatures=[2.0, 4.0],
        distillation_weights=(0.5, 1.0, 0.5))
    tuner, best = tuning.tune(hypermodel, train, val, tuner="random",
                              max_trials=2, epochs=1, directory=work,
                              project_name="sweep")
    try:
        export.export_student(student, work / "export", test_data=val)
        export_error = None
    except ImportError as error:
        export_error = str(error)
    print(json.dumps({
        "tensorflow_loaded": "tensorflow" in sys.modules,
        "backend": keras.backend.backend(),
        "distillation_weight": history.history["distillation_weight"],
        "chain_steps": len(report),
        "trials": len(tuning.trials_table(tuner)),
        "best": sorted(best.values),
        "export_error": export_error,
    }))
""")
)


def run_python(code, backend, *args):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="JAX is not installed"
)
def test_everything_above_the_distiller_runs_on_jax_without_tensorflow():
    result = run_python(WITHOUT_TENSORFLOW_RUN, "jax")
    assert result["backend"] == "jax"
    assert result["tensorflow_loaded"] is False
    assert result["distillation_weight"] == pytest.approx([0.9, 0.0])
    assert result["chain_steps"] == 2
    assert result["trials"] == 2
    assert result["best"] == ["assistant_size", "distillation_weight", "temperature"]
    assert "needs TensorFlow" in result["export_error"]
    assert "pip install tensorflow" in result["export_error"]


# The Distiller's own scenarios on PyTorch.
TORCH_RUN = MODELS_AND_DATA + textwrap.dedent("""
    from kd_keras import export

    x, y = tiny_data(64)
    teacher, student = mlp(32, 1), mlp(8, 2)
    teacher_before = [w.copy() for w in teacher.get_weights()]
    distiller = kd_keras.Distiller(teacher, student, temperature=3.0)
    distiller.compile("adam", metrics=["accuracy"])
    on_the_fly = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0,
                               validation_data=(x, y))
    cached = kd_keras.cache_teacher_logits(teacher, (x, y), batch_size=16)
    distiller.distillation_weight = 0.5
    from_cache = distiller.fit(cached, epochs=1, verbose=0)
    path = pathlib.Path(tempfile.mkdtemp()) / "distiller.keras"
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    same = np.allclose(loaded.predict(x, verbose=0),
                       distiller.predict(x, verbose=0), rtol=1e-5)
    student_path = pathlib.Path(sys.argv[1])
    student.save(student_path)
    np.save(student_path.with_suffix(".npy"), student.predict(x, verbose=0))
    try:
        export.export_student(student, student_path.parent / "export",
                              test_data=(x, y))
        export_error = None
    except ValueError as error:
        export_error = str(error)
    print(json.dumps({
        "export_error": export_error,
        "backend": keras.backend.backend(),
        "loss": on_the_fly.history["loss"] + from_cache.history["loss"],
        "distillation_weight": from_cache.history["distillation_weight"],
        "teacher_unchanged": all(np.array_equal(a, b) for a, b in zip(
            teacher_before, teacher.get_weights())),
        "reloaded_predictions_match": bool(same),
    }))
""")


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="PyTorch is not installed (it is optional)",
)
def test_the_distiller_trains_saves_and_loads_on_pytorch(tmp_path):
    import keras
    import numpy as np

    student_path = tmp_path / "student.keras"
    result = run_python(TORCH_RUN, "torch", str(student_path))
    assert result["backend"] == "torch"
    assert all(v == v and v < 10 for v in result["loss"])  # Finite.
    assert result["distillation_weight"] == [0.5]
    assert result["teacher_unchanged"]
    assert result["reloaded_predictions_match"]
    # The fix the export error names: load the file here and export it.
    assert "KERAS_BACKEND=tensorflow" in result["export_error"]
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    np.testing.assert_allclose(
        keras.saving.load_model(student_path).predict(x, verbose=0),
        np.load(student_path.with_suffix(".npy")),
        rtol=1e-5,
        atol=1e-6,
    )


# A fresh process: `import kd_keras` alone must make saved kd_keras models
# loadable, and change nothing in the environment.
LOAD_AFTER_IMPORT = textwrap.dedent("""
    import json, os, sys
    environment = dict(os.environ)
    import keras
    import kd_keras
    models = [type(keras.saving.load_model(p)).__name__ for p in sys.argv[1:]]
    print(json.dumps({
        "models": models,
        "environment_unchanged": dict(os.environ) == environment,
        "keras_tuner_loaded": "keras_tuner" in sys.modules,
        "apps_loaded": "kd_keras.apps" in sys.modules,
    }))
""")


@pytest.mark.slow
def test_import_kd_keras_registers_its_saved_classes(tiny_mlp, tmp_path):
    import keras

    import kd_keras

    teacher = kd_keras.EnsembleTeacher([tiny_mlp(8, seed=1), tiny_mlp(8, seed=2)])
    distiller = kd_keras.Distiller(teacher, tiny_mlp(4, seed=3))
    distiller.compile("sgd", metrics=["accuracy"])
    paths = [tmp_path / "ensemble.keras", tmp_path / "distiller.keras"]
    teacher.save(paths[0])
    distiller.save(paths[1])
    result = run_python(LOAD_AFTER_IMPORT, keras.backend.backend(), *map(str, paths))
    assert result == {
        "models": ["EnsembleTeacher", "Distiller"],
        "environment_unchanged": True,
        "keras_tuner_loaded": False,
        "apps_loaded": False,
    }
