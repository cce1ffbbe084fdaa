"""Matplotlib figures of what a distillation run produces.

Every function returns a `matplotlib.figure.Figure` and, given `path`, also
writes it as a PNG. Figures are made without pyplot, so no display is needed.
"""

import pathlib

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np


def _finish(figure, path):
    figure.tight_layout()
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure


def _history_dict(history):
    return history.history if hasattr(history, "history") else dict(history)


def plot_history(histories, metric="val_accuracy", path=None, title=None, marks=None):
    """Plots one metric per epoch for several runs.

    Args:
        histories: `{run name: keras History or its .history dict}`.
        metric: the logged metric to plot, e.g. `"val_accuracy"`.
        path: optional PNG path.
        title: optional title.
        marks: optional `{run name: epoch}` drawn as a dashed vertical line,
            e.g. the epoch where `StudentEarlyStop` switched the KD term off.

    Returns:
        The figure.
    """
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    for name, history in histories.items():
        values = _history_dict(history).get(metric)
        if not values:
            continue
        (line,) = axes.plot(range(1, len(values) + 1), values, label=name)
        if marks and marks.get(name) is not None:
            axes.axvline(marks[name], linestyle="--", color=line.get_color(), alpha=0.7)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(metric)
    axes.set_title(title or metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _finish(figure, path)


def plot_paths(table, metric="student_val_accuracy", path=None, title=None):
    """Draws the student accuracy of every distillation path.

    Args:
        table: `PathSearchResult.table` (or any list of dicts with `path` and
            `metric`).
        metric: the column to draw.
        path: optional PNG path.
        title: optional title.

    Returns:
        The figure.
    """
    rows = sorted(table, key=lambda row: row[metric])
    figure = Figure(figsize=(7.0, 1.0 + 0.4 * len(rows)))
    axes = figure.add_subplot()
    values = [row[metric] for row in rows]
    bars = axes.barh(
        [row["path"] for row in rows],
        values,
        color=["C1" if row is rows[-1] else "C0" for row in rows],
    )
    axes.bar_label(
        bars, labels=[f"{v:.4f}" for v in values], fontsize="small", padding=2
    )
    low, high = min(values), max(values)
    margin = max(high - low, 1e-3)
    axes.set_xlim(low - margin, high + margin)
    axes.set_xlabel(metric)
    axes.set_title(title or "Student accuracy by distillation path")
    axes.grid(axis="x", alpha=0.3)
    return _finish(figure, path)


def plot_chain(report, path=None, title=None):
    """Draws the validation accuracy of each model along a chain.

    Args:
        report: the per-step report of `distill_chain`.
        path: optional PNG path.
        title: optional title.

    Returns:
        The figure.
    """
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    names = [row["student"] for row in report]
    values = [row["val_accuracy"] for row in report]
    bars = axes.bar(names, values)
    axes.bar_label(bars, labels=[f"{v:.4f}" for v in values], fontsize="small")
    axes.set_ylim(min(values) - 0.05, min(1.0, max(values) + 0.05))
    axes.set_ylabel("validation accuracy")
    axes.set_title(title or "Distillation chain, step by step")
    axes.grid(axis="y", alpha=0.3)
    return _finish(figure, path)


def plot_curve(
    xs, ys, xlabel, ylabel, path=None, title=None, errors=None, xticks=None, line=True
):
    """Draws one measured curve, with optional error bars.

    Args:
        xs, ys: the points.
        xlabel, ylabel: axis labels.
        path: optional PNG path.
        title: optional title.
        errors: optional error bar half-heights (e.g. std over seeds).
        xticks: optional tick labels for `xs`.
        line: join the points (False for separate methods, not a curve).

    Returns:
        The figure.
    """
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    axes.errorbar(
        xs, ys, yerr=errors, marker="o", capsize=3, linestyle="-" if line else "none"
    )
    if xticks is not None:
        axes.set_xticks(xs, xticks)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title or ylabel)
    axes.grid(alpha=0.3)
    return _finish(figure, path)


def plot_sweep(trials, objective="val_accuracy", path=None, title=None):
    """Draws a sweep's score against temperature, one colour per assistant.

    Args:
        trials: rows with `assistant_size`, `temperature`,
            `distillation_weight` and `score` (see `tuning.trials_table`).
        objective: the score's name, for the axis.
        path: optional PNG path.
        title: optional title.

    Returns:
        The figure.
    """
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    sizes = sorted(
        {str(row["assistant_size"]) for row in trials}, key=lambda s: (s != "none", s)
    )
    for index, size in enumerate(sizes):
        rows = sorted(
            (r for r in trials if str(r["assistant_size"]) == size),
            key=lambda r: r["temperature"],
        )
        axes.scatter(
            [r["temperature"] for r in rows],
            [r["score"] for r in rows],
            s=[20 + 80 * r["distillation_weight"] for r in rows],
            color=f"C{index}",
            alpha=0.75,
            label=f"assistant {size}",
        )
    axes.set_xscale("log")
    temperatures = sorted({row["temperature"] for row in trials})
    axes.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
    axes.minorticks_off()
    axes.set_xlabel("temperature (marker size: distillation weight)")
    axes.set_ylabel(objective)
    axes.set_title(title or f"Sweep: {objective} by temperature")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _finish(figure, path)


def plot_temperature(
    logits, temperatures=(1, 2, 5, 10, 20), class_names=None, path=None, title=None
):
    """Draws one output distribution softened at several temperatures.

    The seed deck's figure: as T grows, softmax(z/T) flattens and shows which
    wrong classes the model finds similar to the right one.

    Args:
        logits: one example's logits, shape `(num_classes,)`.
        temperatures: the temperatures to draw.
        class_names: optional labels of the classes.
        path: optional PNG path.
        title: optional title.

    Returns:
        The figure.
    """
    logits = np.asarray(logits, dtype="float64").reshape(-1)
    classes = np.arange(len(logits))
    count = len(temperatures)
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    width = 0.8 / count
    for index, temperature in enumerate(temperatures):
        scaled = logits / temperature
        probabilities = np.exp(scaled - scaled.max())
        probabilities /= probabilities.sum()
        axes.bar(
            classes + (index - (count - 1) / 2) * width,
            probabilities,
            width=width,
            label=f"T = {temperature:g}",
        )
    axes.set_xticks(classes, class_names or [str(c) for c in classes])
    axes.set_xlabel("class")
    axes.set_ylabel("softmax(z / T)")
    axes.set_yscale("log")
    axes.set_title(title or "One output distribution at several temperatures")
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    return _finish(figure, path)
