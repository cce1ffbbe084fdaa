"""The distillation losses side by side on Fashion-MNIST, each tuned alike.

Fashion-MNIST (Zalando, MIT licence) is harder than MNIST, so losses can
differ by more than seed noise. A 2-conv CNN teacher (32 and 64 channels)
teaches a small CNN student (4 and 8 channels, the same pooling, so that
their feature maps have the same sizes). Rows:

- scratch: the student on the labels alone (nothing to tune);
- SoftTargets, LogitStandardization, DecoupledKD, DIST: the logit losses;
- FeatureHint + SoftTargets (FitNets on the second conv block, 1×1 adapter);
- AttentionTransfer + SoftTargets (both conv blocks);
- keras.distillation: Keras' own `LogitsDistillation` and
  `FeatureDistillation` (mean squared error of the logits, since Keras
  compares features only of the same shape), passed to `kd_keras.Distiller`
  unchanged.

Every method is tuned alike by the harness of `fair.py` (the same number of
Bayesian trials over its free settings: T and λ, and the weight or setting
of its own; scored on a validation split; the test set read once per run;
3 or 5 seeds; paired differences from scratch with 95% intervals). Keras'
row searches its own loss's T; the Distiller's, which that loss does not
read, stays at 1.

    python benchmarks/losses.py --quick      # under 10 minutes on 2 cores
    python benchmarks/losses.py              # full, under 60 minutes
"""

from absl import app
from absl import flags
import fair
import keras

from kd_keras import losses
from kd_keras import training
from kd_keras import tuning

FLAGS = flags.FLAGS
SETTINGS = dict(
    quick=dict(
        train_examples=10_000,
        tune_examples=4_000,
        teacher_epochs=3,
        student_epochs=4,
        trials=3,
    ),
    full=dict(
        train_examples=20_000,
        tune_examples=10_000,
        teacher_epochs=8,
        student_epochs=8,
        trials=6,
    ),
)
fair.define_flags(SETTINGS)
# λ from 0.05 to 0.95 in steps of 0.15: the values of `fair.WEIGHTS`.
WEIGHTS = (0.05, 0.95, 0.15)


def _keras_losses(hp):
    return [
        keras.distillation.LogitsDistillation(
            temperature=hp.Choice("keras_temperature", fair.TEMPERATURES)
        ),
        keras.distillation.FeatureDistillation(loss="mse"),
    ]


# Each method's losses, as a function of keras-tuner's hyperparameters.
METHODS = {
    "SoftTargets": lambda hp: losses.SoftTargets(),
    "LogitStandardization": lambda hp: losses.LogitStandardization(),
    "DecoupledKD": lambda hp: losses.DecoupledKD(
        beta=hp.Choice("dkd_beta", [1.0, 2.0, 4.0, 8.0])
    ),
    "DIST": lambda hp: losses.DIST(
        beta=hp.Choice("dist_beta", [1.0, 2.0]),
        gamma=hp.Choice("dist_gamma", [1.0, 2.0]),
    ),
    "FeatureHint + SoftTargets": lambda hp: [
        losses.SoftTargets(),
        (
            losses.FeatureHint("conv2", "conv2"),
            hp.Float("hint_weight", 0.01, 1.0, sampling="log"),
        ),
    ],
    "AttentionTransfer + SoftTargets": lambda hp: [
        losses.SoftTargets(),
        (
            losses.AttentionTransfer([("conv1", "conv1"), ("conv2", "conv2")]),
            hp.Float("attention_weight", 10.0, 1000.0, sampling="log"),
        ),
    ],
    "keras.distillation (Logits + FeatureDistillation)": lambda hp: [
        (loss, weight)
        for loss, weight in zip(
            _keras_losses(hp),
            (1.0, hp.Float("keras_feature_weight", 0.01, 1.0, sampling="log")),
            strict=True,
        )
    ],
}
SHORT = {
    "scratch": "scratch",
    "SoftTargets": "KD",
    "LogitStandardization": "LS",
    "DecoupledKD": "DKD",
    "DIST": "DIST",
    "FeatureHint + SoftTargets": "FitNets",
    "AttentionTransfer + SoftTargets": "AT",
    "keras.distillation (Logits + FeatureDistillation)": "keras",
}


def teacher_model():
    return fair.conv_net((32, 64), 128, "teacher")


def student_model():
    return fair.conv_net((4, 8), 0, "student")


def methods(study, teacher, epochs):
    """Scratch, then each loss through kd_keras' `DistillationHyperModel`,
    whose Distiller trains on the teacher's cached logits unless a feature
    loss needs the teacher to run."""

    def method(name):
        hypermodel = tuning.DistillationHyperModel(
            teacher,
            student_model,
            # Keras' loss carries its own T: the Distiller's is not searched.
            temperatures=[1.0] if SHORT[name] == "keras" else fair.TEMPERATURES,
            distillation_weights=WEIGHTS,
            losses={SHORT[name]: METHODS[name]},
        )

        def train(hp, split, seed):
            distiller = hypermodel.build(hp)
            data = (
                study.data.batches(split, shuffle=True, seed=seed)
                if hypermodel.needs_features
                else study.data.with_logits(teacher, split, seed, "teacher")
            )
            distiller.fit(data, epochs=epochs, verbose=0)
            return distiller.student

        return fair.Method(name, train, hypermodel.build)

    return [fair.scratch(student_model, study, epochs), *map(method, METHODS)]


def main(argv):
    del argv
    study = fair.Study.from_flags("losses", FLAGS, SETTINGS)
    settings = study.settings

    with training.Stopwatch() as timer:
        teacher = study.trained("teacher", teacher_model, settings["teacher_epochs"])
        rows = study.compare(methods(study, teacher, settings["student_epochs"]))
    teacher_accuracy = study.data.accuracy(teacher, "test")
    heading = (
        f"Distillation losses on Fashion-MNIST ({study.mode}: teacher CNN 32-64-128 "
        f"{settings['teacher_epochs']} epochs, {100 * teacher_accuracy:.2f}% "
        f"test; student CNN 4-8, {settings['student_epochs']} epochs on "
        f"{settings['train_examples']:,} images; {study.budget_text()}; "
        f"{timer.seconds / 60:.1f} min)"
    )
    out = study.report(
        FLAGS,
        heading,
        rows,
        payload=dict(
            teacher_test_accuracy=teacher_accuracy, minutes=timer.seconds / 60
        ),
    )
    fair.plot_rows(
        rows,
        out / f"losses_{study.mode}.png",
        "Student CNN, Fashion-MNIST",
        short=SHORT,
    )


if __name__ == "__main__":
    app.run(main)
