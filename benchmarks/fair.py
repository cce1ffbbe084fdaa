"""The fair-comparison harness of the studies.

Every study compares methods of training one student: from scratch, plain
KD, and the heuristics. For a fair comparison each method is treated alike:

- its free settings (T and λ, a KD-cutoff epoch, a teacher snapshot, an
  assistant...) are chosen by keras-tuner with the same number of trials for
  every method (a Bayesian search after 3 random trials, seeded alike, so
  methods with the same space start from the same points). Each trial trains
  on a tuning subset of the training images for the final runs' epochs and
  is scored on a validation split (the last 5,000 training images), never
  on the test set;
- the chosen settings then train the student on the training split once per
  seed; each seed fixes the student's initial weights and the order of its
  batches alike for every method, so differences are paired;
- 3 seeds, or 5 when some method's paired difference from scratch on the
  *validation* split is under two standard deviations of those differences
  (then every method gets 5, so that all rows share their seeds); a study's
  settings may set other counts ("seeds", "more_seeds");
- the test set is read once per final run, at the end, and nothing is chosen
  from it. Each method is reported as mean ± std of its test accuracy, and as
  its paired difference from scratch with a 95% t interval.

The studies of images score accuracy; a study of other data gives the
harness a data object with its own `objective` and `score(model, split)`
(the language-model study: log-perplexity, minimised).

Interrupted studies resume from their work folder: keras-tuner keeps each
search's state, and finished runs and trained teachers are kept beside it.
The folder records the settings and each method's search space, and a rerun
with other settings is refused rather than mixed with old results.
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
RANDOM_STARTS = 3
TEMPERATURES = [1.0, 2.0, 4.0, 8.0, 16.0]
WEIGHTS = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]
# Bump when a change to the harness makes old runs incomparable.
VERSION = 2

# Trials and runs log nothing below warnings (StudentEarlyStop's switch).
logging.set_verbosity(logging.WARNING)


def define_flags(settings, idx_dir=FASHION_MNIST, dataset="Fashion-MNIST"):
    """The flags of every study; `settings` maps "quick" and "full" to the
    study's settings, whose "trials" are the default of `--trials`."""
    common.define_backend_flag()
    flags.DEFINE_bool("quick", False, "A smaller run, under 10 minutes on 2 cores.")
    flags.DEFINE_integer(
        "trials",
        None,
        f"Tuner trials per method (default: {settings['quick']['trials']} "
        f"quick, {settings['full']['trials']} full).",
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


def temperature_and_weight(hp, temperatures=TEMPERATURES, weights=WEIGHTS):
    """The KD settings every distilling method tunes: T and λ."""
    return (
        hp.Choice("temperature", temperatures),
        hp.Choice("distillation_weight", weights),
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

    def space_config(self):
        """The declared settings, as JSON, for the work folder's stamp."""
        if self.space is None:
            return None
        hp = keras_tuner.HyperParameters()
        self.space(hp)
        return [p.get_config() for p in hp.space]


class Data:
    """An MNIST-format IDX set (Fashion-MNIST, MNIST) as the studies split it.

    `train`: the first `train_examples` training images; `tune`: the first
    `tune_examples` of them; `val`: the last 5,000 training images, disjoint
    from both; `test`: the 10,000 test images.
    """

    KEEP = 3  # Transfer sets with cached logits kept at once (memory).
    # What the searches maximise or minimise; `score` computes it.
    objective = OBJECTIVE

    def __init__(self, idx_dir, train_examples, tune_examples, batch_size=128):
        (x, y), (x_test, y_test) = common.mnist_arrays(idx_dir)
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

    def with_logits(self, teacher, split, seed, key=None):
        """The split's batches, shuffled from `seed`, with `teacher`'s
        logits. With `key`, the teacher runs once per (key, split, seed) and
        each call gets its own copy, whose shuffle starts afresh from `seed`;
        a key names one teacher only."""
        if key is None:
            return self._cache(teacher, split, seed)
        name = (key, split, seed)
        if name not in self._cached:
            while len(self._cached) >= self.KEEP:
                self._cached.pop(next(iter(self._cached)))
            self._cached[name] = (teacher, self._cache(teacher, split, seed))
        owner, cached = self._cached[name]
        if owner is not teacher:
            raise ValueError(f"Two teachers share the logits key {key!r}.")
        return cached.with_arrays(cached.x, cached.y, cached.sample_weight)

    def _cache(self, teacher, split, seed):
        return kd_keras.cache_teacher_logits(
            teacher, self.batches(split, shuffle=True, seed=seed), seed=seed
        )

    def accuracy(self, model, split):
        errors, examples = training.test_errors(model, self.batches(split))
        return 1.0 - errors / examples

    def score(self, model, split):
        return self.accuracy(model, split)


def _trained(result):
    """`(student, info)` from a method's `train`, which returns the student
    or `(student, info)`: a dict of JSON facts kept with the final run."""
    return result if isinstance(result, tuple) else (result, {})


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
        student, _ = _trained(self.method.train(trial.hyperparameters, "tune", 0))
        data = self.study.data
        return {data.objective.name: data.score(student, "val")}


# Settings that `kd_keras.tuning.DistillationHyperModel` declares with one
# value in these studies: not worth a column.
FIXED = ("assistant_size", "loss")


def _settings_text(values):
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in values.items()
        if k not in FIXED
    )


def paired_difference(accuracies, baseline, scale=100.0):
    """(mean, low, high): the mean paired difference, times `scale`
    (percentage points of accuracies given as fractions), and its 95% t
    interval (low = high = mean for a single pair)."""
    from scipy import stats

    differences = scale * (np.asarray(accuracies) - np.asarray(baseline))
    mean = float(differences.mean())
    if len(differences) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(differences) - 1) * stats.sem(differences))
    return mean, mean - half, mean + half


def difference_text(difference):
    mean, low, high = difference
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _close(differences):
    """Whether paired differences (points) are under two standard
    deviations of themselves: too close to call with these seeds."""
    return abs(differences.mean()) < 2 * differences.std(ddof=1)


class Study:
    """Tunes, runs and reports methods alike (see the module docstring).

    Args:
        name: the study's name, e.g. "early_stop"; results are written as
            `<name>_<mode>.{md,json,png}`.
        mode: "quick" or "full".
        settings: the mode's settings (examples, epochs, trials...).
        data: a `Data`.
        workdir: folder kept between runs (resumption).
    """

    def __init__(self, name, mode, settings, data, workdir):
        self.name, self.mode, self.settings = name, mode, dict(settings)
        self.data, self.trials = data, settings["trials"]
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._runs_path = self.workdir / "runs.json"
        self.runs = store.read_json(self._runs_path) if self._runs_path.exists() else {}
        self.chosen = {}
        self._stamp_path = self.workdir / "study.json"
        self._stamp = (
            store.read_json(self._stamp_path)
            if self._stamp_path.exists()
            else {"version": VERSION, "settings": self.settings, "methods": {}}
        )
        self._check_stamp("settings", self._stamp["version"], VERSION)
        self._check_stamp("settings", self._stamp["settings"], self.settings)

    @classmethod
    def from_flags(cls, name, flag_values, settings, workdir_name=None):
        """The study of the flags' mode, data, trials and work folder (by
        default `kd_keras_<workdir_name>` in the temporary folder, where
        `workdir_name` defaults to `<name>_<mode>`)."""
        mode = "quick" if flag_values.quick else "full"
        chosen = dict(settings[mode], idx_dir=str(flag_values.idx_dir))
        if flag_values.trials is not None:
            chosen["trials"] = flag_values.trials
        workdir = flag_values.workdir or (
            pathlib.Path(tempfile.gettempdir())
            / f"kd_keras_{workdir_name or f'{name}_{mode}'}"
        )
        return cls(
            name,
            mode,
            chosen,
            Data(
                flag_values.idx_dir, chosen["train_examples"], chosen["tune_examples"]
            ),
            workdir,
        )

    def _check_stamp(self, what, recorded, now):
        if recorded != now:
            raise ValueError(
                f"The work folder {self.workdir} holds a study with other "
                f"{what}: {recorded} there, {now} now. Pass another "
                "--workdir, or delete the folder to start afresh."
            )

    def _record(self, method):
        """Checks the method's search space against the work folder's."""
        config = method.space_config()
        methods = self._stamp["methods"]
        if method.name in methods:
            self._check_stamp(
                f"settings for {method.name!r}", methods[method.name], config
            )
        else:
            methods[method.name] = config
            store.write_json(self._stamp_path, self._stamp)

    def model(self, key, build, seed=0):
        """A trained model kept in the work folder: `build()` trains it the
        first time (after seeding Keras with `seed`), later runs load it."""
        path = self.workdir / f"{key}.keras"
        if path.exists():
            return keras.saving.load_model(path)
        keras.utils.set_random_seed(seed)
        model = build()
        model.save(path)
        return model

    def trained(
        self, key, build_model, epochs, *, seed=0, optimizer=None, callbacks=()
    ):
        """`build_model()` trained on the labels of the training split
        (batches shuffled from `seed`), kept in the work folder (see
        `model`)."""

        def build():
            model = build_model()
            training.train(
                model,
                self.data.batches("train", shuffle=True, seed=seed),
                epochs=epochs,
                optimizer=optimizer,
                callbacks=list(callbacks),
                verbose=0,
            )
            return model

        return self.model(key, build, seed=seed)

    def budget_text(self):
        """The tuning budget, for a heading."""
        search = (
            "random"
            if self.trials <= RANDOM_STARTS
            else f"{RANDOM_STARTS} random, then Bayesian"
        )
        return (
            f"{self.trials} trials per method ({search}) on "
            f"{self.settings['tune_examples']:,} images, scored on 5,000 "
            "validation images"
        )

    def tune(self, method):
        """The method's best settings on the validation split (an empty
        `HyperParameters` for a method with nothing to tune)."""
        self._record(method)
        if method.space is None:
            return keras_tuner.HyperParameters()
        search = _Search(
            method,
            self,
            oracle=keras_tuner.oracles.BayesianOptimizationOracle(
                objective=self.data.objective,
                max_trials=self.trials,
                num_initial_points=RANDOM_STARTS,
                seed=0,
            ),
            directory=str(self.workdir / "searches"),
            project_name=method.name.replace(" ", "_").replace("/", "_"),
            overwrite=False,
        )
        search.search()
        best = search.get_best_hyperparameters(1)[0]
        self.chosen[method.name] = dict(best.values)
        return best

    def _run(self, method, best, seed):
        """{"val": ..., "test": ...} scores of the method's final run (and
        the facts its `train` returned)."""
        key = f"{method.name} / {seed}"
        if key not in self.runs:
            keras.utils.set_random_seed(seed)
            student, info = _trained(method.train(best, "train", seed))
            self.runs[key] = dict(
                info,
                **{split: self.data.score(student, split) for split in ("val", "test")},
            )
            store.write_json(self._runs_path, self.runs)
        return self.runs[key]

    def scores(self, methods, baseline="scratch"):
        """Tunes every method and runs it over the seeds; returns
        `{method: test scores, one per seed}` (and sets `seeds`)."""
        best = {m.name: self.tune(m) for m in methods}

        def runs(seeds, split):
            # Seed by seed, so that the methods' runs interleave in time
            # (their epoch times then share the machine's slow spells).
            scores = {m.name: [] for m in methods}
            for seed in range(seeds):
                for m in methods:
                    scores[m.name].append(self._run(m, best[m.name], seed)[split])
            return {name: np.asarray(values) for name, values in scores.items()}

        seeds = self.settings.get("seeds", SEEDS)
        val = runs(seeds, "val")
        if any(
            _close(100 * (val[m.name] - val[baseline]))
            for m in methods
            if m.name != baseline
        ):
            seeds = max(seeds, self.settings.get("more_seeds", MORE_SEEDS))
        self.seeds = seeds
        return runs(seeds, "test")

    def compare(self, methods, baseline="scratch"):
        """Tunes every method, runs it over the seeds and returns the table's
        rows (dicts); differences are from the baseline (a method's name)."""
        accuracies = self.accuracies = self.scores(methods, baseline)
        rows = []
        for method in methods:
            values = accuracies[method.name]
            difference = (
                None
                if method.name == baseline
                else paired_difference(values, accuracies[baseline])
            )
            rows.append(
                {
                    "method": method.name,
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
        """Prints and writes the table (and `extra_markdown` below it) as
        markdown and JSON; returns the output folder."""
        columns = []
        for row in rows:
            columns += [
                k
                for k in row
                if k not in columns and k not in ("difference", "per_seed")
            ]
        table = [
            dict(row, per_seed=" / ".join(f"{v:.2f}" for v in row["per_seed"]))
            for row in rows
        ]
        markdown = common.markdown_table(table, [*columns, "per_seed"])
        if extra_markdown:
            markdown += "\n\n" + extra_markdown
        out = common.write_report(
            flag_values,
            f"{self.name}_{self.mode}",
            f"{heading}; {self.seeds} seeds",
            markdown,
            dict(
                payload or {},
                settings=self.settings,
                rows=rows,
                runs=self.runs,
                chosen=self.chosen,
                seeds=self.seeds,
            ),
        )
        print(f"\nWrote {out}/{self.name}_{self.mode}.{{md,json}}")
        return out


def warm_up_adam(epochs, examples, batch_size=128, peak=1e-3, **options):
    """Adam whose rate rises linearly over the first epoch, then follows a
    cosine to 0: without the warm-up, the depth-10 plain CNN diverged in one
    seed of three on MNIST. `options` go to Adam (e.g. `clipnorm`)."""
    steps = math.ceil(examples / batch_size)
    return keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=max(1, (epochs - 1) * steps),
            warmup_target=peak,
            warmup_steps=steps,
        ),
        **options,
    )


def distill(
    teacher,
    student_fn,
    study,
    split,
    seed,
    hp,
    *,
    epochs,
    key=None,
    callbacks=(),
    optimizer=None,
):
    """Distils `teacher` into a new `student_fn()` on the split, with T and λ
    from `hp`, and returns the student. The student is built right after
    seeding Keras with `seed`, so that it starts from the weights of the
    scratch student of that seed; the teacher's logits are cached (once per
    `key`, see `Data.with_logits`)."""
    temperature, weight = temperature_and_weight(hp)
    keras.utils.set_random_seed(seed)
    student = student_fn()
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
    """The method that trains the student on the labels alone; `optimizer`
    may be a function of the split."""

    def train(hp, split, seed):
        student = student_fn()
        training.train(
            student,
            study.data.batches(split, shuffle=True, seed=seed),
            epochs=epochs,
            optimizer=optimizer(split) if callable(optimizer) else optimizer,
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
