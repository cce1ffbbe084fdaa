"""Reproductions of published distillation results.

`hinton_mnist` reruns the MNIST experiments of Hinton, Vinyals and Dean (2015),
"Distilling the Knowledge in a Neural Network", and writes a table side by
side with the paper's numbers. `kd-keras reproduce hinton-mnist` and
`benchmarks/hinton_mnist.py` call it.
"""

import json
import pathlib
import time

from absl import logging
import keras
import numpy as np

from kd_keras import data
from kd_keras import models
from kd_keras import store
from kd_keras import training
from kd_keras.apps import plots
from kd_keras.apps.tables import markdown_table
from kd_keras.teachers import cache_teacher_logits

# Test errors (of 10,000) reported by Hinton et al. (2015) on MNIST.
PAPER = {
    "teacher": "67",
    "scratch": "146",
    "distilled_T20": "74",
    "omit3": "206 (133 on 3s)",
    "omit3_bias_paper": "109 (14 on 3s)",
    "only78": "47.3%",
    "only78_bias_paper": "13.2%",
}
TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
PAPER_BIAS_3 = 3.5
PAPER_BIAS_78 = 7.6
THREE = 3
SEVEN_EIGHT = (7, 8)


def _settings(quick):
    examples = 10_000 if quick else 55_000
    settings = dict(
        train_split=f"train[:{examples}]",
        val_split="train[55000:]",
        test_split="test",
        small_split=f"train[:{int(0.03 * examples)}]",
        teacher_hidden=(1200, 1200),
        student_hidden=(800, 800),
    )
    if quick:
        return dict(settings, teacher_epochs=6, epochs=5, small_epochs=30, seeds=2)
    return dict(settings, teacher_epochs=30, epochs=20, small_epochs=100, seeds=3)


def _cosine_decay(epochs, learning_rate=1e-3):
    """Adam's learning rate decayed from `learning_rate` by a half cosine.

    Per epoch, so that it needs no step count (filtered transfer sets have
    none); a constant rate leaves every run's last epoch on a noisy plateau.
    """

    def schedule(epoch, unused_rate):
        return float(learning_rate * 0.5 * (1.0 + np.cos(np.pi * epoch / epochs)))

    return [keras.callbacks.LearningRateScheduler(schedule)]


def _logits(model, dataset):
    logits, labels = training.logits_and_labels(model, dataset)
    return logits.astype("float64"), labels


def _errors(logits, labels, only=None):
    wrong = training.predicted_classes(logits) != labels
    if only is not None:
        wrong = wrong[labels == only]
    return int(wrong.sum())


def _best_shift(val_logits, val_labels, classes, candidates):
    """The bias shift of `classes` that maximises validation accuracy."""

    def accuracy(shift):
        shifted = val_logits.copy()
        shifted[:, list(classes)] += shift
        return np.mean(np.argmax(shifted, -1) == val_labels)

    return max(candidates, key=lambda shift: (accuracy(shift), -abs(shift)))


def _shifted(logits, classes, shift):
    shifted = logits.copy()
    shifted[:, list(classes)] += shift
    return shifted


class _Run:
    """One seed of the experiment."""

    def __init__(self, seed, settings, splits, verbose):
        self.seed = seed
        self.settings = settings
        self.train, self.val, self.test, self.load = splits
        self.verbose = verbose

    def _student(self):
        keras.utils.set_random_seed(self.seed + 1)
        return models.mlp(self.settings["student_hidden"], name="student")

    def _distil(self, transfer, temperature, epochs=None):
        student = self._student()
        epochs = epochs or self.settings["epochs"]
        training.distill(
            self.teacher,
            student,
            transfer,
            self.val,
            temperature=temperature,
            distillation_weight=0.9,
            epochs=epochs,
            cache=False,
            callbacks=_cosine_decay(epochs),
            verbose=self.verbose,
        )
        return student

    def run(self):
        settings, results = self.settings, {}
        keras.utils.set_random_seed(self.seed)
        self.teacher = models.mlp(
            settings["teacher_hidden"],
            dropout=0.5,
            input_dropout=0.2,
            max_norm=4.0,
            name="teacher",
        )
        jittered = self.load(settings["train_split"], shuffle=True, max_shift=2)
        training.train(
            self.teacher,
            jittered,
            self.val,
            epochs=settings["teacher_epochs"],
            callbacks=_cosine_decay(settings["teacher_epochs"]),
            verbose=self.verbose,
        )
        test_logits, test_labels = _logits(self.teacher, self.test)
        results["teacher"] = _errors(test_logits, test_labels)
        results["teacher_example_logits"] = test_logits[0].tolist()

        scratch = self._student()
        training.train(
            scratch,
            self.train,
            self.val,
            epochs=settings["epochs"],
            callbacks=_cosine_decay(settings["epochs"]),
            verbose=self.verbose,
        )
        results["scratch"] = _errors(*_logits(scratch, self.test))

        transfer = cache_teacher_logits(self.teacher, self.train, seed=self.seed)
        for temperature in TEMPERATURES:
            student = self._distil(transfer, temperature)
            results[f"distilled_T{temperature:g}"] = _errors(
                *_logits(student, self.test)
            )

        results.update(self._omit_three())
        results.update(self._only_seven_eight())
        results.update(self._three_percent())
        return results

    def _bias_rows(self, student, classes, sign, paper_shift, key):
        val_logits, val_labels = _logits(student, self.val)
        test_logits, test_labels = _logits(student, self.test)
        grid = sign * np.arange(0.0, 20.01, 0.25)
        chosen = _best_shift(val_logits, val_labels, classes, grid)
        rows = {}
        for name, shift in (
            (key, 0.0),
            (f"{key}_bias_val", chosen),
            (f"{key}_bias_paper", sign * paper_shift),
        ):
            shifted = _shifted(test_logits, classes, shift)
            rows[name] = _errors(shifted, test_labels)
            if classes == (THREE,):
                rows[name + "_on3"] = _errors(shifted, test_labels, only=THREE)
        rows[f"{key}_bias_val_shift"] = float(chosen)
        return rows

    def _omit_three(self):
        transfer = cache_teacher_logits(
            self.teacher,
            self.load(self.settings["train_split"], drop_classes=[THREE]),
            seed=self.seed,
        )
        student = self._distil(transfer, 20.0)
        return self._bias_rows(student, (THREE,), +1.0, PAPER_BIAS_3, "omit3")

    def _only_seven_eight(self):
        transfer = cache_teacher_logits(
            self.teacher,
            self.load(self.settings["train_split"], keep_classes=list(SEVEN_EIGHT)),
            seed=self.seed,
        )
        student = self._distil(transfer, 20.0)
        return self._bias_rows(student, SEVEN_EIGHT, -1.0, PAPER_BIAS_78, "only78")

    def _three_percent(self):
        """Soft targets as a regulariser: 3% of the labels."""
        small = self.load(self.settings["small_split"], shuffle=True)
        epochs = self.settings["small_epochs"]
        scratch = self._student()
        training.train(
            scratch,
            small,
            self.val,
            epochs=epochs,
            callbacks=_cosine_decay(epochs),
            verbose=self.verbose,
        )
        soft = self._distil(
            cache_teacher_logits(self.teacher, small, seed=self.seed), 20.0, epochs
        )
        return {
            "small_scratch": _errors(*_logits(scratch, self.test)),
            "small_soft": _errors(*_logits(soft, self.test)),
        }


def _cell(values, percent_of=None):
    values = np.asarray(values, dtype="float64")
    if percent_of:
        values = 100.0 * values / percent_of
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    unit = "%" if percent_of else ""
    return f"{values.mean():.1f}{unit} ± {std:.1f}"


def _shape(hidden):
    return "×".join(map(str, hidden))


COLUMNS = ("experiment", "paper", "kd_keras (mean ± std)", "per seed")


def _column(runs, key):
    return [run[key] for run in runs]


def _row(runs, label, paper, key, percent_of=None):
    """One experiment: its mean ± std over the seeds, and each seed's."""
    experiment, paper_column, mean, per_seed = COLUMNS
    return {
        experiment: label,
        paper_column: paper,
        mean: _cell(_column(runs, key), percent_of),
        per_seed: "/".join(str(value) for value in _column(runs, key)),
    }


def _with_errors_on_threes(runs, label, paper, key):
    row, on_threes = _row(runs, label, paper, key), _row(runs, "", "", key + "_on3")
    for column in COLUMNS[2:]:
        row[column] += f" ({on_threes[column]} on 3s)"
    return row


def _shifts(runs, key):
    return "/".join(f"{run[key]:+g}" for run in runs)


def _experiment_rows(runs, settings, tests):
    """The table's rows, in the paper's order."""
    teacher, student = (
        _shape(settings[k]) for k in ("teacher_hidden", "student_hidden")
    )
    rows = [
        _row(
            runs,
            f"teacher {teacher}, dropout, max-norm, 2-px jitter",
            PAPER["teacher"],
            "teacher",
        ),
        _row(runs, f"student {student} from scratch", PAPER["scratch"], "scratch"),
    ]
    rows += [
        _row(
            runs,
            f"student {student} distilled, T = {temperature:g}",
            PAPER["distilled_T20"] if temperature == 20 else "",
            f"distilled_T{temperature:g}",
        )
        for temperature in TEMPERATURES
    ]
    shift3 = _shifts(runs, "omit3_bias_val_shift")
    rows += [
        _with_errors_on_threes(runs, label, paper, key)
        for key, label, paper in (
            ("omit3", "distilled without any 3 in the transfer set", PAPER["omit3"]),
            (
                "omit3_bias_paper",
                f"… bias of 3 raised by {PAPER_BIAS_3:g}",
                PAPER["omit3_bias_paper"],
            ),
            (
                "omit3_bias_val",
                f"… bias of 3 raised by a shift chosen on validation ({shift3})",
                "",
            ),
        )
    ]
    shift78 = _shifts(runs, "only78_bias_val_shift")
    rows += [
        _row(runs, label, paper, key, percent_of=tests)
        for key, label, paper in (
            (
                "only78",
                "distilled on a transfer set of 7s and 8s only",
                PAPER["only78"],
            ),
            (
                "only78_bias_paper",
                f"… biases of 7 and 8 lowered by {PAPER_BIAS_78:g}",
                PAPER["only78_bias_paper"],
            ),
            (
                "only78_bias_val",
                f"… biases of 7 and 8 lowered by a shift chosen on validation "
                f"({shift78})",
                "",
            ),
        )
    ]
    return rows + [
        _row(runs, "3% of the labels, from scratch", "", "small_scratch"),
        _row(
            runs, "3% of the labels, with the teacher's soft targets", "", "small_soft"
        ),
    ]


def _targets(runs, settings, test_counts):
    """The reproduction's targets, each measured and judged, and a summary."""
    tests, threes = sum(test_counts.values()), test_counts[THREE]
    teacher, scratch, distilled = (
        np.mean(_column(runs, key)) for key in ("teacher", "scratch", "distilled_T20")
    )
    gap = (scratch - distilled) / (scratch - teacher) if scratch != teacher else np.nan
    recovered = 1.0 - np.mean(_column(runs, "omit3_bias_val_on3")) / threes
    most_errors = 74 * tests / 10_000
    paper_count = " (74 of 10,000)" if tests != 10_000 else ""
    targets = [
        (
            "the distilled student closes ≥ 80% of the scratch–teacher gap",
            f"{100 * gap:.0f}%",
            gap >= 0.8,
        ),
        (
            "the bias fix (chosen on validation) recovers ≥ 90% of the test 3s",
            f"{100 * recovered:.1f}% of {threes}",
            recovered >= 0.9,
        ),
        (
            f"the distilled {_shape(settings['student_hidden'])} student (T = 20) "
            f"has ≤ {most_errors:g} errors{paper_count}",
            f"{distilled:.1f}",
            distilled <= most_errors,
        ),
    ]
    summary = {
        "gap_closed": gap,
        "threes_recovered": recovered,
        "distilled_errors": distilled,
        "targets_met": {target: bool(met) for target, _, met in targets},
    }
    return targets, summary


def _heading(runs, settings, tests, minutes):
    return (
        f"Hinton et al. (2015) on MNIST, reproduced with kd_keras "
        f"({settings['train_split']}, validation {settings['val_split']}, "
        f"test {settings['test_split']} ({tests:,} "
        f"digits); teacher {_shape(settings['teacher_hidden'])} "
        f"{settings['teacher_epochs']} epochs, students "
        f"{_shape(settings['student_hidden'])} "
        f"{settings['epochs']} epochs, λ = 0.9, Adam with its rate decayed "
        f"by a half cosine per epoch; {len(runs)} seeds; "
        f"{minutes:.0f} min on this machine). Test errors unless marked %; "
        "the 7s-and-8s rows give the error rate on all test digits; the "
        "paper's column is of 10,000 test digits."
    )


def _report(runs, settings, test_counts, minutes):
    """The markdown tables, side by side with the paper, and a summary."""
    tests = sum(test_counts.values())
    targets, summary = _targets(runs, settings, test_counts)
    judged = [
        {"target": target, "measured": measured, "met": "yes" if met else "no"}
        for target, measured, met in targets
    ]
    text = "\n\n".join(
        [
            _heading(runs, settings, tests, minutes),
            markdown_table(_experiment_rows(runs, settings, tests), COLUMNS),
            markdown_table(judged, ("target", "measured", "met")),
        ]
    )
    return text + "\n", summary


def hinton_mnist(
    data_dir=None,
    output_dir="hinton_mnist",
    quick=False,
    seeds=None,
    name=None,
    settings=None,
    verbose=0,
):
    """Reruns Hinton et al.'s MNIST experiments and writes the results.

    For each seed: the 784-1200-1200-10 teacher (dropout, max-norm, inputs
    jittered by up to 2 pixels); the 784-800-800-10 student from scratch;
    students distilled at T = 1, 2, 4, 8 and 20 on the teacher's cached
    logits; a student distilled on a transfer set without any 3, whose bias
    for class 3 is then raised (by the paper's 3.5 and by a shift chosen on
    the validation split, never the test set); one distilled on 7s and 8s
    only, whose biases for 7 and 8 are lowered likewise; and, with 3% of the
    labels, a student with and one without the teacher's soft targets.

    Writes `name.md` (the table beside the paper's numbers and the targets),
    `name.json`, `name_temperature.png` (one teacher output at T = 1, 2, 5,
    10, 20) and `name_errors_by_temperature.png` to `output_dir`. Each
    finished seed is saved at once in `name.seeds.json`, so rerunning an
    interrupted reproduction with the same settings skips those seeds.

    Args:
        data_dir: tensorflow-datasets folder holding MNIST (see
            `kd_keras.data.import_mnist`); None for tfds' default.
        output_dir: folder for the results.
        quick: a smaller run (10,000 training digits, fewer epochs, 2 seeds).
        seeds: number of seeds (default 3, or 2 with `quick`).
        name: file name stem (default "hinton_mnist", "_quick" appended in
            quick mode).
        settings: optional overrides of the run's settings (`train_split`,
            `val_split`, `test_split`, `small_split`, `teacher_epochs`,
            `epochs`, `small_epochs`, `teacher_hidden`, `student_hidden`),
            e.g. for a smoke test.
        verbose: Keras verbosity.

    Returns:
        A dict: per-seed results, the table, and whether each target was met.
    """
    settings = dict(_settings(quick), **(settings or {}))
    if seeds is not None:
        settings["seeds"] = seeds
    name = name or ("hinton_mnist_quick" if quick else "hinton_mnist")
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    load = _mnist_loader(data_dir)
    splits = (
        load(settings["train_split"], shuffle=True),
        load(settings["val_split"]),
        load(settings["test_split"]),
        load,
    )
    test_labels = data.to_arrays(splits[2])[1]
    test_counts = {c: int(np.sum(test_labels == c)) for c in range(10)}
    progress = output_dir / f"{name}.seeds.json"
    runs, minutes = _run_seeds(progress, settings, data_dir, splits, verbose)
    table, summary = _report(runs, settings, test_counts, minutes)
    (output_dir / f"{name}.md").write_text(table)
    _plot(runs, settings, sum(test_counts.values()), output_dir / name)
    result = {
        "settings": settings,
        "runs": runs,
        "minutes": minutes,
        "paper": PAPER,
        **summary,
    }
    store.write_json(output_dir / f"{name}.json", result)
    result["table"] = table
    return result


def _mnist_loader(data_dir):
    """`load(split, shuffle=False, **kwargs)`: MNIST batches of 128."""

    def load(split, shuffle=False, **kwargs):
        return data.load(
            "mnist",
            split,
            data_dir=data_dir,
            batch_size=128,
            shuffle=shuffle,
            seed=0,
            **kwargs,
        )

    return load


def _run_seeds(progress, settings, data_dir, splits, verbose):
    """Runs the seeds not yet in `progress` (a JSON file that keeps each
    finished seed, so that an interrupted run resumes after it); returns
    the runs and the minutes they took."""
    saved = store.read_json(progress, {})
    same = {k: v for k, v in settings.items() if k != "seeds"}
    same["data_dir"] = None if data_dir is None else str(data_dir)
    if saved.get("settings") != json.loads(json.dumps(same)):
        saved = {"settings": same, "runs": [], "minutes": 0.0}
    runs = saved["runs"]
    for seed in range(len(runs), settings["seeds"]):
        logging.info("hinton_mnist: seed %d of %d.", seed + 1, settings["seeds"])
        start = time.perf_counter()
        runs.append(_Run(seed, settings, splits, verbose).run())
        saved["minutes"] += (time.perf_counter() - start) / 60
        store.write_json(progress, saved)
    return runs[: settings["seeds"]], saved["minutes"]


def _plot(runs, settings, tests, stem):
    """The teacher's softened output, and errors against temperature."""
    plots.plot_temperature(
        runs[0]["teacher_example_logits"],
        temperatures=(1, 2, 5, 10, 20),
        path=f"{stem}_temperature.png",
        title="The teacher's output on the first test digit",
    )
    errors = np.array(
        [[run[f"distilled_T{t:g}"] for t in TEMPERATURES] for run in runs],
        dtype="float64",
    )
    plots.plot_curve(
        np.log2(TEMPERATURES),
        errors.mean(0),
        "temperature",
        f"test errors (of {tests:,})",
        errors=errors.std(0, ddof=1) if len(runs) > 1 else None,
        xticks=[f"{t:g}" for t in TEMPERATURES],
        path=f"{stem}_errors_by_temperature.png",
        title=f"Distilled {_shape(settings['student_hidden'])} student by temperature",
    )
