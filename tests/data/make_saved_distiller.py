"""Writes `distiller_764628c.keras` and its expected values: a Distiller
saved by kd_keras at commit 764628c (before the Distiller was split into
collaborators), so that `test_saved_distiller_of_an_earlier_release_loads`
holds later versions to loading it. Kept for the record; rerunning it on a
later version writes that version's file instead.

    KERAS_BACKEND=tensorflow python tests/data/make_saved_distiller.py
"""

import pathlib

import keras
import numpy as np

import kd_keras
from kd_keras import losses

HERE = pathlib.Path(__file__).parent


def mlp(units, seed, name):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(units, activation="relu", name="hidden"),
            keras.layers.Dense(4, name="logits"),
        ],
        name=name,
    )


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + 2 * (x[:, 1] > 0).astype("int32")
    distiller = kd_keras.Distiller(
        mlp(32, 1, "teacher"),
        mlp(8, 2, "student"),
        temperature=3.0,
        distillation_weight=0.7,
        losses=[
            losses.SoftTargets(),
            (losses.DecoupledKD(warmup_epochs=2), 0.5),
            (losses.FeatureHint("hidden", "hidden"), 0.1),
        ],
    )
    distiller.compile("adam", metrics=["accuracy"])
    distiller.fit(x, y, batch_size=16, epochs=2, verbose=0)
    distiller.save(HERE / "distiller_764628c.keras")
    logs = distiller.evaluate(x, y, batch_size=64, return_dict=True, verbose=0)
    np.savez(
        HERE / "distiller_764628c.npz",
        x=x,
        y=y,
        student=distiller.student.predict(x, verbose=0),
        teacher=distiller.teacher.predict(x, verbose=0),
        adapter=distiller.adapters[0].get_weights()[0],
        loss=logs["loss"],
        distillation_loss=logs["distillation_loss"],
    )


if __name__ == "__main__":
    main()
