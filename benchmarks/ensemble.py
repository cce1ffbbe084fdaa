"""An ensemble distilled into one model, on Fashion-MNIST.

Hinton et al. (2015) distilled an ensemble of 10 speech models into one model
of the same size, which kept 86% of the ensemble's gain over a single model
(58.9% → 61.1% frame accuracy, distilled 60.8%). Here 5 MLPs 784-256-10
(trained from other seeds) form a `kd_keras.EnsembleTeacher` (mean
probabilities), distilled into one MLP of the same size. Methods, tuned alike
by the harness of `fair.py`: scratch (one MLP on the labels) and KD from the
ensemble (T, λ). The share of the gain kept is (distilled − scratch) /
(ensemble − scratch), of the means over the seeds.

    python benchmarks/ensemble.py --quick      # under 10 minutes on 2 cores
    python benchmarks/ensemble.py              # full, under 60 minutes
"""

from absl import app
from absl import flags
import common
import fair  # Before Keras: it sets the backend from --backend.

import kd_keras
from kd_keras import models
from kd_keras import training

FLAGS = flags.FLAGS
HIDDEN = (256,)
MEMBERS = 5
SETTINGS = dict(
    quick=dict(train_examples=10_000, tune_examples=5_000, epochs=4, trials=3),
    full=dict(train_examples=30_000, tune_examples=10_000, epochs=10, trials=8),
)
fair.define_flags(SETTINGS)


def mlp(name="student"):
    return models.mlp(HIDDEN, name=name)


def main(argv):
    del argv
    study = fair.Study.from_flags("ensemble", FLAGS, SETTINGS)
    settings = study.settings
    epochs = settings["epochs"]
    with training.Stopwatch() as timer:
        members = [
            study.trained(
                f"member_{i}", lambda i=i: mlp(f"member_{i}"), epochs, seed=100 + i
            )
            for i in range(MEMBERS)
        ]
        ensemble = kd_keras.EnsembleTeacher(members, mode="probs")

        def distilled(hp, split, seed):
            return fair.distill(
                ensemble, mlp, study, split, seed, hp, key="ensemble", epochs=epochs
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
    scratch, kd = (study.accuracies[r["method"]] for r in rows)
    # The share of the mean gain (a ratio of means: the per-seed ratios
    # swing when the ensemble's lead over a seed's scratch is small).
    kept = (kd.mean() - scratch.mean()) / (whole - scratch.mean())
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
                "model": "share of the ensemble's gain over scratch kept by KD",
                "test_accuracy_percent": f"{100 * kept:.0f}% (Hinton et al.: 86%)",
            },
        ],
        ["model", "test_accuracy_percent"],
    )
    heading = (
        f"Ensemble → one model on Fashion-MNIST ({study.mode}: {MEMBERS} × MLP "
        f"784-256-10, {epochs} epochs on {settings['train_examples']:,} images, "
        f"mean probabilities; student of the same size; {study.budget_text()}; "
        f"{timer.seconds / 60:.1f} min)"
    )
    out = study.report(
        FLAGS,
        heading,
        rows,
        extra,
        dict(
            ensemble_test_accuracy=whole,
            member_test_accuracy=single,
            share_kept=kept,
            minutes=timer.seconds / 60,
        ),
    )
    fair.plot_rows(
        rows, out / f"ensemble_{study.mode}.png", "MLP 784-256-10, Fashion-MNIST"
    )


if __name__ == "__main__":
    app.run(main)
