"""Distilling an ensemble into one model, on MNIST.

Hinton et al. (2015) distilled a 10-model speech ensemble into one model of
the members' size, which kept most of the ensemble's gain (frame accuracy:
single 58.9%, ensemble 61.1%, distilled 60.8%, i.e. 86% of the gain). This
script trains 5 MLPs of the same architecture with different seeds, combines
them with `kd_keras.EnsembleTeacher` (mean probabilities), and distils the
ensemble into a sixth model of the same architecture. Per seed it reports the
test accuracy of a single member (the mean over members), of the ensemble and
of the distilled model, and the share of the ensemble's gain the distilled
model keeps: (distilled − member) / (ensemble − member).

    python benchmarks/ensemble.py --quick      # under 10 minutes
    python benchmarks/ensemble.py              # full
"""

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras
import numpy as np

import kd_keras
from kd_keras import models
from kd_keras import training

FLAGS = flags.FLAGS
common.define_run_flags()
flags.DEFINE_integer("members", 5, "Models in each ensemble.")
flags.DEFINE_float("temperature", 4.0, "Distillation temperature.")
flags.DEFINE_float("distillation_weight", 0.9, "Weight of the KD term.")

HIDDEN = (512, 512)


def _settings():
    return common.settings(
        FLAGS,
        quick=dict(train_split="train[:10000]", epochs=4, seeds=2),
        full=dict(train_split="train[:55000]", epochs=10, seeds=3),
    )


def _run_seed(seed, splits, settings):
    train, val, test = splits
    members = []
    for index in range(FLAGS.members):
        keras.utils.set_random_seed(1000 * seed + index)
        member = models.mlp(HIDDEN, name=f"member_{index}")
        training.train(member, train, val, epochs=settings["epochs"], verbose=0)
        members.append(member)
    ensemble = kd_keras.EnsembleTeacher(members, mode="probs")
    keras.utils.set_random_seed(1000 * seed + FLAGS.members)
    student = models.mlp(HIDDEN, name="distilled")
    common.distill(FLAGS, ensemble, student, splits, settings["epochs"])
    member = float(np.mean([training.test_accuracy(m, test) for m in members]))
    whole = training.test_accuracy(ensemble, test)
    distilled = training.test_accuracy(student, test)
    return {
        "member": member,
        "ensemble": whole,
        "distilled": distilled,
        "gain_kept": (distilled - member) / (whole - member)
        if whole != member
        else float("nan"),
    }


def main(argv):
    del argv
    settings = _settings()
    splits = common.mnist_splits(FLAGS, settings["train_split"])
    with training.Stopwatch() as timer:
        runs = [_run_seed(seed, splits, settings) for seed in range(settings["seeds"])]
    rows = [
        {
            "model": label,
            "test_accuracy_percent": common.percent_mean_std(
                [run[key] for run in runs]
            ),
            "per_seed": " / ".join(f"{100 * run[key]:.2f}" for run in runs),
        }
        for key, label in (
            ("member", "single member (mean of members)"),
            ("ensemble", f"ensemble of {FLAGS.members}"),
            ("distilled", "distilled single model"),
        )
    ]
    rows.append(
        {
            "model": "share of the ensemble's gain kept",
            "test_accuracy_percent": common.percent_mean_std(
                [run["gain_kept"] for run in runs]
            ),
            "per_seed": " / ".join(f"{100 * run['gain_kept']:.0f}%" for run in runs),
        }
    )
    mode = "quick" if FLAGS.quick else "full"
    heading = (
        f"Ensemble distillation on MNIST ({mode}: {FLAGS.members} × MLP "
        f"{HIDDEN}, {settings['train_split']}, {settings['epochs']} epochs "
        f"each, probs-mode ensemble, T={FLAGS.temperature:g}, "
        f"λ={FLAGS.distillation_weight:g}, {settings['seeds']} seeds; "
        f"{timer.seconds / 60:.1f} min). Hinton et al.'s speech ensemble: "
        "58.9% → 61.1%, distilled 60.8% (86% of the gain)."
    )
    common.write_report(
        FLAGS,
        f"ensemble_{mode}",
        heading,
        common.markdown_table(rows, ["model", "test_accuracy_percent", "per_seed"]),
        {
            "settings": settings,
            "rows": rows,
            "runs": runs,
            "minutes": timer.seconds / 60,
        },
    )


if __name__ == "__main__":
    app.run(main)
