"""An ensemble distilled into one model, on Fashion-MNIST.

Hinton et al. (2015) distilled an ensemble of 10 speech models into one model
of the same size, which kept 86% of the ensemble's gain over a single model
(58.9% → 61.1% frame accuracy, distilled 60.8%). Here 5 MLPs 784-256-10
(trained from other seeds) form a `kd_keras.EnsembleTeacher` (mean
probabilities), distilled into one MLP of the same size. Methods, tuned alike
by the harness of `fair.py`: scratch (one MLP on the labels) and KD from the
ensemble (T, λ). The share of the gain kept is (distilled − scratch) /
(ensemble − scratch), per seed.

    python benchmarks/ensemble.py --quick      # under 10 minutes on 2 cores
    python benchmarks/ensemble.py              # full, under 60 minutes
"""

from absl import app
from absl import flags
import common
import fair  # Before Keras: it sets the backend from --backend.
import keras
import numpy as np

import kd_keras
from kd_keras import models
from kd_keras import training

FLAGS = flags.FLAGS
fair.define_flags(default_trials=(3, 8))
HIDDEN = (256,)
MEMBERS = 5
SETTINGS = dict(
    quick=dict(train_examples=10_000, tune_examples=5_000, epochs=4, trials=3),
    full=dict(train_examples=55_000, tune_examples=15_000, epochs=10, trials=8),
)


def mlp(name="student"):
    return models.mlp(HIDDEN, name=name)


def main(argv):
    del argv
    mode = "quick" if FLAGS.quick else "full"
    settings = SETTINGS[mode]
    study = fair.Study.from_flags("ensemble", FLAGS, settings)
    epochs = settings["epochs"]
    with training.Stopwatch() as timer:

        def member(index):
            def build():
                keras.utils.set_random_seed(100 + index)
                model = mlp(f"member_{index}")
                training.train(
                    model,
                    study.data.batches("train", shuffle=True, seed=100 + index),
                    epochs=epochs,
                    verbose=0,
                )
                return model

            return study.model(f"member_{index}", build)

        members = [member(i) for i in range(MEMBERS)]
        ensemble = kd_keras.EnsembleTeacher(members, mode="probs")

        def distilled(hp, split, seed):
            return fair.distill(
                ensemble, mlp(), study, split, seed, hp, key="ensemble", epochs=epochs
            )

        rows = study.compare(
            [
                fair.scratch(mlp, study, epochs),
                fair.Method(
                    "KD from the ensemble", distilled, fair.temperature_and_weight
                ),
            ]
        )
    whole = study.data.accuracy(ensemble, "test")
    single = [study.data.accuracy(m, "test") for m in members]
    scratch, kd = (np.asarray(study.accuracies[r["method"]]) for r in rows)
    kept = (kd - scratch[: len(kd)]) / (whole - scratch[: len(kd)])
    extra = common.markdown_table(
        [
            {
                "model": "each member (mean)",
                "test_accuracy_percent": common.percent_mean_std(single),
            },
            {
                "model": f"ensemble of {MEMBERS}",
                "test_accuracy_percent": f"{100 * whole:.2f}",
            },
            {
                "model": "share of the ensemble's gain kept by KD",
                "test_accuracy_percent": f"{100 * kept.mean():.0f}% ± "
                f"{100 * kept.std(ddof=1):.0f}% (Hinton et al.: 86%)",
            },
        ],
        ["model", "test_accuracy_percent"],
    )
    heading = (
        f"Ensemble → one model on Fashion-MNIST ({mode}: {MEMBERS} × MLP "
        f"784-256-10, {epochs} epochs on {settings['train_examples']:,} images, "
        f"mean probabilities; student of the same size; {study.trials} "
        f"Bayesian trials per method on {settings['tune_examples']:,} images, "
        f"scored on 5,000 validation images; {timer.seconds / 60:.1f} min)"
    )
    out = study.report(
        FLAGS,
        heading,
        rows,
        extra,
        dict(
            settings=settings,
            ensemble_test_accuracy=whole,
            member_test_accuracy=single,
            share_kept=kept.tolist(),
            minutes=timer.seconds / 60,
        ),
    )
    fair.plot_rows(rows, out / f"ensemble_{mode}.png", "MLP 784-256-10, Fashion-MNIST")
    print(f"\nWrote {out}/ensemble_{mode}.{{md,json,png}}")


if __name__ == "__main__":
    app.run(main)
