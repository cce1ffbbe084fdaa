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

Each distilling method gets the same keras-tuner budget (`--trials` trials
of a Bayesian search) over its free settings: the temperature and λ, and
the weight or setting of its own. Trials train on a subset of the training
digits and are scored on a validation split (the last 5,000 training
images), never on the test set. The chosen settings then train the student
on the whole training split for each seed, and the test set is read once per
run at the end. Reports test accuracy, mean ± std over the seeds, and the
paired difference from scratch.

Interrupted runs resume: the teacher, the sweeps (keras-tuner's state) and
finished seeds are kept in `--workdir`.

    python benchmarks/losses.py --quick      # under 10 minutes on 2 cores
    python benchmarks/losses.py              # full, under 60 minutes
"""

import pathlib
import tempfile

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras
import numpy as np

import kd_keras
from kd_keras import data
from kd_keras import losses
from kd_keras import store
from kd_keras import training
from kd_keras import tuning
from kd_keras.apps import plots

FLAGS = flags.FLAGS
common.define_backend_flag()
flags.DEFINE_bool("quick", False, "A smaller run, under 10 minutes on 2 cores.")
flags.DEFINE_integer(
    "seeds", None, "Seeds of the final runs (default: 2 quick, 3 full)."
)
flags.DEFINE_integer(
    "trials", None, "Tuner trials per method (default: 3 quick, 6 full)."
)
flags.DEFINE_string(
    "idx_dir",
    str(common.REPO.parent / "shared" / "data" / "fashion_mnist"),
    "Folder of the Fashion-MNIST IDX files.",
)
flags.DEFINE_string(
    "workdir",
    None,
    "Where the teacher, sweeps and finished runs are kept, so that a rerun "
    "resumes (default: a folder in the system's temporary folder).",
)
flags.DEFINE_string("output_dir", str(common.RESULTS), "Where to write the results.")

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
WEIGHTS = (0.1, 0.9, 0.2)  # λ from 0.1 to 0.9 in steps of 0.2.


def _keras_losses(hp):
    return [
        keras.distillation.LogitsDistillation(
            temperature=hp.Choice("keras_temperature", list(TEMPERATURES))
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
        beta=hp.Choice("dist_weight", [1.0, 2.0]),
        gamma=hp.Choice("dist_weight", [1.0, 2.0]),
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


def _settings():
    """The quick or full settings, with `--seeds` and `--trials` applied."""
    settings = common.settings(
        FLAGS,
        quick=dict(
            teacher_examples=20_000,
            teacher_epochs=4,
            tune_examples=5_000,
            tune_epochs=3,
            train_examples=20_000,
            student_epochs=5,
            seeds=2,
            trials=3,
        ),
        full=dict(
            teacher_examples=55_000,
            teacher_epochs=8,
            tune_examples=15_000,
            tune_epochs=6,
            train_examples=55_000,
            student_epochs=10,
            seeds=3,
            trials=6,
        ),
    )
    if FLAGS.trials is not None:
        settings["trials"] = FLAGS.trials
    return settings


def conv_net(widths, dense, name):
    """Conv blocks "conv1", "conv2" (3×3, ReLU, 2×2 max-pooling), then an
    optional hidden Dense layer and the 10 logits."""
    inputs = keras.Input((28, 28, 1))
    h = inputs
    for index, width in enumerate(widths, 1):
        h = keras.layers.Conv2D(
            width, 3, padding="same", activation="relu", name=f"conv{index}"
        )(h)
        h = keras.layers.MaxPooling2D(name=f"pool{index}")(h)
    h = keras.layers.Flatten()(h)
    if dense:
        h = keras.layers.Dropout(0.3)(h)
        h = keras.layers.Dense(dense, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name=name)


def teacher_model():
    return conv_net((32, 64), 128, "teacher")


def student_model():
    return conv_net((4, 8), 0, "student")


def _splits(settings):
    (x, y), (x_test, y_test) = data.read_mnist(FLAGS.idx_dir)

    def scale(images):
        return (images.astype("float32") / 255.0)[..., None]

    x, x_test = scale(x), scale(x_test)
    y, y_test = y.astype("int32"), y_test.astype("int32")
    val = slice(len(y) - common.VALIDATION_EXAMPLES, None)
    return {
        "teacher": (
            x[: settings["teacher_examples"]],
            y[: settings["teacher_examples"]],
        ),
        "tune": (x[: settings["tune_examples"]], y[: settings["tune_examples"]]),
        "train": (x[: settings["train_examples"]], y[: settings["train_examples"]]),
        "val": (x[val], y[val]),
        "test": (x_test, y_test),
    }


def _batches(arrays, shuffle, seed=0):
    return data.ArrayBatches(*arrays, batch_size=128, shuffle=shuffle, seed=seed)


def _teacher(splits, settings, workdir):
    """The teacher, trained once and kept in `workdir`."""
    path = workdir / "teacher.keras"
    if path.exists():
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(0)
    teacher = teacher_model()
    training.train(
        teacher,
        _batches(splits["teacher"], True),
        _batches(splits["val"], False),
        epochs=settings["teacher_epochs"],
        verbose=0,
    )
    teacher.save(path)
    return teacher


def _hypermodel(teacher, method):
    return tuning.DistillationHyperModel(
        teacher,
        student_model,
        temperatures=TEMPERATURES,
        distillation_weights=WEIGHTS,
        losses={SHORT[method]: METHODS[method]},
    )


def _tune(teacher, method, splits, settings, workdir):
    """The method's best settings on the validation split."""
    hypermodel = _hypermodel(teacher, method)
    _, best = tuning.tune(
        hypermodel,
        _batches(splits["tune"], True),
        _batches(splits["val"], False),
        tuner="bayesian",
        max_trials=settings["trials"],
        epochs=settings["tune_epochs"],
        directory=workdir / "sweeps",
        project_name=SHORT[method],
    )
    return hypermodel, best


def _final_run(teacher, method, tuned, splits, settings, seed):
    """Trains the student with the chosen settings; returns its test
    accuracy."""
    train = _batches(splits["train"], True, seed)
    val = _batches(splits["val"], False)
    keras.utils.set_random_seed(seed)
    if method == "scratch":
        student = student_model()
        training.train(
            student, train, val, epochs=settings["student_epochs"], verbose=0
        )
    else:
        hypermodel, best = tuned
        distiller = hypermodel.build(best)
        student = distiller.student
        if not hypermodel.needs_features:
            train = kd_keras.cache_teacher_logits(teacher, train, seed=seed)
        distiller.fit(
            train, validation_data=val, epochs=settings["student_epochs"], verbose=0
        )
    errors, examples = training.test_errors(student, _batches(splits["test"], False))
    return 1.0 - errors / examples


def _paired_difference(accuracies, baseline):
    """Mean paired difference (percentage points) with a 95% t interval."""
    from scipy import stats

    differences = 100.0 * (np.asarray(accuracies) - np.asarray(baseline))
    mean = differences.mean()
    if len(differences) < 2:
        return f"{mean:+.2f}"
    half = stats.t.ppf(0.975, len(differences) - 1) * stats.sem(differences)
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def main(argv):
    del argv
    settings = _settings()
    mode = "quick" if FLAGS.quick else "full"
    workdir = pathlib.Path(
        FLAGS.workdir or pathlib.Path(tempfile.gettempdir()) / f"kd_keras_losses_{mode}"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    splits = _splits(settings)
    runs_path = workdir / "runs.json"
    runs = store.read_json(runs_path) if runs_path.exists() else {}
    with training.Stopwatch() as timer:
        teacher = _teacher(splits, settings, workdir)
        teacher_errors, test_examples = training.test_errors(
            teacher, _batches(splits["test"], False)
        )
        tuned, chosen = {}, {}
        for method in METHODS:
            tuned[method] = _tune(teacher, method, splits, settings, workdir)
            chosen[method] = dict(tuned[method][1].values)
        for method in ("scratch", *METHODS):
            for seed in range(settings["seeds"]):
                key = f"{method} / {seed}"
                if key not in runs:
                    runs[key] = _final_run(
                        teacher, method, tuned.get(method), splits, settings, seed
                    )
                    store.write_json(runs_path, runs)
    rows = ("scratch", *METHODS)
    accuracy = {
        method: [runs[f"{method} / {s}"] for s in range(settings["seeds"])]
        for method in rows
    }
    table = []
    for method in rows:
        accuracies = accuracy[method]
        table.append(
            {
                "method": method,
                "test_accuracy_percent": common.percent_mean_std(accuracies),
                "vs_scratch_points_95ci": "—"
                if method == "scratch"
                else _paired_difference(accuracies, accuracy["scratch"]),
                "chosen_on_validation": ", ".join(
                    f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in chosen.get(method, {}).items()
                    if k not in ("assistant_size", "loss")
                ),
            }
        )
    heading = (
        f"Distillation losses on Fashion-MNIST ({mode}: teacher CNN 32-64-128 "
        f"{settings['teacher_epochs']} epochs on {settings['teacher_examples']:,} "
        f"images, {100 * (1 - teacher_errors / test_examples):.2f}% test; "
        f"student CNN 4-8, {settings['student_epochs']} epochs on "
        f"{settings['train_examples']:,} images; {settings['trials']} Bayesian "
        f"trials per method ({settings['tune_epochs']} epochs on "
        f"{settings['tune_examples']:,} images, scored on 5,000 validation "
        f"images); {settings['seeds']} seeds; {timer.seconds / 60:.1f} min)"
    )
    columns = [
        "method",
        "test_accuracy_percent",
        "vs_scratch_points_95ci",
        "chosen_on_validation",
    ]
    markdown = common.markdown_table(table, columns)
    out = common.write_report(
        FLAGS,
        f"losses_{mode}",
        heading,
        markdown,
        {
            "settings": settings,
            "rows": table,
            "runs": runs,
            "chosen": chosen,
            "teacher_test_accuracy": 1 - teacher_errors / test_examples,
            "minutes": timer.seconds / 60,
        },
    )
    spread = [common.mean_std(100 * np.asarray(accuracy[m])) for m in rows]
    plots.plot_curve(
        list(range(len(rows))),
        [mean for mean, _ in spread],
        "method",
        "test accuracy (%)",
        path=out / f"losses_{mode}.png",
        title=f"Student CNN, Fashion-MNIST ({settings['seeds']} seeds)",
        errors=[std for _, std in spread],
        xticks=[SHORT[m] for m in rows],
        line=False,
    )
    print(f"\nWrote {out}/losses_{mode}.{{md,json,png}}")


if __name__ == "__main__":
    app.run(main)
