"""The fair-comparison harness of the Fashion-MNIST studies.

Every study compares methods of training one student: from scratch, plain
KD, and the heuristics. For a fair comparison each method is treated alike:

- its free settings (T and λ, a KD-cutoff epoch, a teacher snapshot, an
  assistant...) are chosen by keras-tuner (a Bayesian search) with the same
  number of trials for every method, each trial training on a tuning subset
  of the training images and scored on a validation split (the last 5,000
  training images), never on the test set;
- the chosen settings then train the student on the training split once per
  seed, and the test set is read once per run, at the end;
- at least 3 seeds, and 5 for a method whose paired difference from scratch
  is under two standard deviations of those differences;
- each method is reported as mean ± std of its test accuracy, and as its
  paired difference from scratch (same seeds) with a 95% t interval.

Interrupted studies resume: keras-tuner keeps each search's state, and
finished runs and trained teachers are kept in the study's work folder.
"""

import dataclasses
import math
import pathlib
import tempfile

from absl import flags
from absl import logging
import common  # Before Keras: it sets the backend from --backend.
import keras
import keras_tuner
import numpy as np

import kd_keras
from kd_keras import data
from kd_keras import store
from kd_keras import training

FASHION_MNIST = common.REPO.parent / "shared" / "data" / "fashion_mnist"
OBJECTIVE = keras_tuner.Objective("val_accuracy", "max")
SEEDS = 3
MORE_SEEDS = 5
TEMPERATURES = [1.0, 2.0, 4.0, 8.0, 16.0]
# Fashion-MNIST's classes, for the figures.
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def define_flags(default_trials, idx_dir=FASHION_MNIST, dataset="Fashion-MNIST"):
    """The flags of every study. `default_trials` is `(quick, full)`."""
    common.define_backend_flag()
    flags.DEFINE_bool("quick", False, "A smaller run, under 10 minutes on 2 cores.")
    flags.DEFINE_integer(
        "trials",
        None,
        f"Tuner trials per method (default: {default_trials[0]} quick, "
        f"{default_trials[1]} full).",
    )
    flags.DEFINE_string("idx_dir", str(idx_dir), f"Folder of the {dataset} IDX files.")
    flags.DEFINE_string(
        "workdir",
        None,
        "Where teachers, searches and finished runs are kept, so that a rerun "
        "resumes (default: a folder in the system's temporary folder).",
    )
    flags.DEFINE_string(
        "output_dir", str(common.RESULTS), "Where to write the results."
    )


# Trials and runs log nothing below warnings (StudentEarlyStop's switch).
logging.set_verbosity(logging.WARNING)


def temperature_and_weight(hp):
    """The KD settings every distilling method tunes: T and λ."""
    return (
        hp.Choice("temperature", TEMPERATURES),
        hp.Float("distillation_weight", 0.05, 0.95, step=0.15),
    )


@dataclasses.dataclass
class Method:
    """One way of training the student.

    `train(hp, split, seed)` trains a new student on the named split (the
    tuning subset during the search, the training split in the final runs)
    and returns it; `space(hp)` declares the method's free settings (None:
    nothing to tune, as for scratch).
    """

    name: str
    train: object
    space: object = None


class Data:
    """Fashion-MNIST (or any MNIST-format IDX set) as the studies split it.

    `train`: the first `train_examples` training images; `tune`: the first
    `tune_examples` of them; `val`: the last 5,000 training images, disjoint
    from both; `test`: the 10,000 test images.
    """

    KEEP = 3  # Cached transfer sets kept at once.

    def __init__(self, idx_dir, train_examples, tune_examples, batch_size=128):
        (x, y), (x_test, y_test) = data.read_mnist(idx_dir)

        def scale(images):
            return (images.astype("float32") / 255.0)[..., None]

        x, x_test = scale(x), scale(x_test)
        y, y_test = y.astype("int32"), y_test.astype("int32")
        held_out = len(y) - common.VALIDATION_EXAMPLES
        if train_examples > held_out:
            raise ValueError(
                f"train_examples={train_examples} overlaps the validation "
                f"split: at most {held_out}."
            )
        self.arrays = {
            "train": (x[:train_examples], y[:train_examples]),
            "tune": (x[:tune_examples], y[:tune_examples]),
            "val": (x[held_out:], y[held_out:]),
            "test": (x_test, y_test),
        }
        self.batch_size = batch_size
        self._cached = {}

    def batches(self, split, shuffle=False, seed=0):
        return data.ArrayBatches(
            *self.arrays[split], batch_size=self.batch_size, shuffle=shuffle, seed=seed
        )

    def with_logits(self, teacher, split, seed, key):
        """The split's shuffled batches with `teacher`'s logits cached once
        per (`key`, split, seed)."""
        name = (key, split, seed)
        if name not in self._cached:
            while len(self._cached) >= self.KEEP:  # Bounds the memory.
                self._cached.pop(next(iter(self._cached)))
            self._cached[name] = kd_keras.cache_teacher_logits(
                teacher, self.batches(split, shuffle=True, seed=seed), seed=seed
            )
        return self._cached[name]

    def accuracy(self, model, split):
        errors, examples = training.test_errors(model, self.batches(split))
        return 1.0 - errors / examples


class _Space(keras_tuner.HyperModel):
    """Declares a method's settings; the search trains in `run_trial`."""

    def __init__(self, method):
        super().__init__(name=method.name)
        self.method = method

    def build(self, hp):
        self.method.space(hp)


class _Search(keras_tuner.Tuner):
    """A keras-tuner search whose trial trains a method on the tuning split
    (seed 0) and scores its student on the validation split."""

    def __init__(self, method, study, **options):
        super().__init__(hypermodel=_Space(method), **options)
        self.method, self.study = method, study

    def run_trial(self, trial, *args, **kwargs):
        keras.utils.set_random_seed(0)
        student = self.method.train(trial.hyperparameters, "tune", 0)
        return {"val_accuracy": self.study.data.accuracy(student, "val")}


# Settings that `kd_keras.tuning.DistillationHyperModel` declares with one
# value in these studies: not worth a column.
FIXED = ("assistant_size", "loss")


def _settings_text(values):
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in values.items()
        if k not in FIXED
    )


def paired_difference(accuracies, baseline):
    """(mean, low, high): the mean paired difference in percentage points and
    its 95% t interval (low = high = mean for a single pair)."""
    from scipy import stats

    differences = 100.0 * (np.asarray(accuracies) - np.asarray(baseline))
    mean = float(differences.mean())
    if len(differences) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(differences) - 1) * stats.sem(differences))
    return mean, mean - half, mean + half


def difference_text(difference):
    mean, low, high = difference
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


class Study:
    """Tunes, runs and reports methods alike (see the module docstring).

    Args:
        name: the study's name, e.g. "early_stop"; results are written as
            `<name>_<quick|full>.{md,json,png}`.
        data: a `Data`.
        trials: tuner trials per method.
        workdir: folder kept between runs (resumption).
    """

    def __init__(self, name, data, trials, workdir):
        self.name, self.data, self.trials = name, data, trials
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._runs_path = self.workdir / "runs.json"
        self.runs = store.read_json(self._runs_path) if self._runs_path.exists() else {}
        self.chosen = {}

    @classmethod
    def from_flags(cls, name, flag_values, settings, workdir_name=None):
        """The study with the flags' data, trials and work folder (by
        default `kd_keras_<workdir_name>` in the temporary folder, where
        `workdir_name` defaults to `<name>_<mode>`)."""
        mode = "quick" if flag_values.quick else "full"
        workdir = flag_values.workdir or (
            pathlib.Path(tempfile.gettempdir())
            / f"kd_keras_{workdir_name or f'{name}_{mode}'}"
        )
        study = cls(
            name,
            Data(
                flag_values.idx_dir,
                settings["train_examples"],
                settings["tune_examples"],
            ),
            flag_values.trials or settings["trials"],
            workdir,
        )
        study.mode = mode
        return study

    def model(self, key, build):
        """A trained model kept in the work folder: `build()` trains it the
        first time, later runs load it."""
        path = self.workdir / f"{key}.keras"
        if path.exists():
            return keras.saving.load_model(path)
        model = build()
        model.save(path)
        return model

    def tune(self, method):
        """The method's best settings on the validation split (an empty
        `HyperParameters` for a method with nothing to tune)."""
        if method.space is None:
            return keras_tuner.HyperParameters()
        search = _Search(
            method,
            self,
            oracle=keras_tuner.oracles.BayesianOptimizationOracle(
                objective=OBJECTIVE, max_trials=self.trials, seed=0
            ),
            directory=str(self.workdir / "searches"),
            project_name=method.name.replace(" ", "_").replace("/", "_"),
            overwrite=False,
        )
        search.search()
        best = search.get_best_hyperparameters(1)[0]
        self.chosen[method.name] = dict(best.values)
        return best

    def _test_accuracy(self, method, best, seed):
        key = f"{method.name} / {seed}"
        if key not in self.runs:
            keras.utils.set_random_seed(seed)
            student = method.train(best, "train", seed)
            self.runs[key] = self.data.accuracy(student, "test")
            store.write_json(self._runs_path, self.runs)
        return self.runs[key]

    def compare(self, methods, baseline="scratch"):
        """Tunes every method, runs it over the seeds and returns the table's
        rows (dicts); the baseline (a method's name) gets the seeds of every
        other method so that differences are paired."""
        best = {m.name: self.tune(m) for m in methods}
        by_name = {m.name: m for m in methods}
        accuracies = {
            m.name: [self._test_accuracy(m, best[m.name], s) for s in range(SEEDS)]
            for m in methods
        }
        for method in methods:
            if method.name == baseline:
                continue
            differences = 100 * (
                np.asarray(accuracies[method.name]) - accuracies[baseline][:SEEDS]
            )
            if abs(differences.mean()) < 2 * differences.std(ddof=1):
                for name in (method.name, baseline):
                    accuracies[name] = [
                        self._test_accuracy(by_name[name], best[name], s)
                        for s in range(MORE_SEEDS)
                    ]
        self.accuracies = accuracies
        rows = []
        for method in methods:
            values = accuracies[method.name]
            base = accuracies[baseline][: len(values)]
            difference = (
                None if method.name == baseline else paired_difference(values, base)
            )
            rows.append(
                {
                    "method": method.name,
                    "seeds": len(values),
                    "test_accuracy_percent": common.percent_mean_std(values),
                    f"vs_{baseline}_points_95ci": "—"
                    if difference is None
                    else difference_text(difference),
                    "chosen_on_validation": _settings_text(
                        self.chosen.get(method.name, {})
                    ),
                    "difference": difference,
                    "per_seed": [round(100 * v, 2) for v in values],
                }
            )
        return rows

    def report(self, flag_values, heading, rows, extra_markdown="", payload=None):
        """Writes the table (and `extra_markdown` below it) as markdown and
        JSON; returns the output folder."""
        columns = [k for k in rows[0] if k not in ("difference", "per_seed")] + [
            "per_seed"
        ]
        table = [
            dict(row, per_seed=" / ".join(f"{v:.2f}" for v in row["per_seed"]))
            for row in rows
        ]
        markdown = common.markdown_table(table, columns)
        if extra_markdown:
            markdown += "\n\n" + extra_markdown
        return common.write_report(
            flag_values,
            f"{self.name}_{self.mode}",
            heading,
            markdown,
            dict(
                payload or {},
                rows=rows,
                runs=self.runs,
                chosen=self.chosen,
                trials=self.trials,
            ),
        )


def warm_up_adam(epochs, examples, batch_size=128, peak=1e-3):
    """Adam whose rate rises linearly over the first epoch, then follows a
    cosine to 0: without the warm-up, the depth-10 plain CNN diverged in one
    seed of three on MNIST."""
    steps = math.ceil(examples / batch_size)
    return keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=max(1, (epochs - 1) * steps),
            warmup_target=peak,
            warmup_steps=steps,
        )
    )


def distill(
    teacher, student, study, split, seed, hp, key, epochs, callbacks=(), optimizer=None
):
    """Distils `teacher` into `student` on the split with the teacher's
    logits cached once (per `key`), with T and λ from `hp`; returns the
    student."""
    temperature, weight = temperature_and_weight(hp)
    training.distill(
        teacher,
        student,
        study.data.with_logits(teacher, split, seed, key),
        temperature=temperature,
        distillation_weight=weight,
        epochs=epochs,
        cache=False,
        optimizer=optimizer,
        callbacks=list(callbacks),
        verbose=0,
    )
    return student


def scratch(student_fn, study, epochs, optimizer=None):
    """The method that trains the student on the labels alone."""

    def train(hp, split, seed):
        student = student_fn()
        training.train(
            student,
            study.data.batches(split, shuffle=True, seed=seed),
            epochs=epochs,
            optimizer=optimizer,
            verbose=0,
        )
        return student

    return Method("scratch", train)


def conv_net(widths, dense, name):
    """Conv blocks "conv1", "conv2"... (3×3, ReLU, 2×2 max-pooling), then an
    optional hidden Dense layer (after dropout 0.3) and the 10 logits."""
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


def plot_rows(rows, path, title, short=None):
    """Test accuracy (mean ± std over seeds) of every row."""
    from kd_keras.apps import plots

    spread = [common.mean_std(row["per_seed"]) for row in rows]
    plots.plot_curve(
        list(range(len(rows))),
        [mean for mean, _ in spread],
        "method",
        "test accuracy (%)",
        path=path,
        title=title,
        errors=[std for _, std in spread],
        xticks=[(short or {}).get(r["method"], r["method"]) for r in rows],
        line=False,
    )
