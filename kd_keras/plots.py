"""Matplotlib figures of what a distillation run produces.

Every function returns a `matplotlib.figure.Figure` and, given `path`, also
writes it as a PNG. Figures are made without pyplot, so no display is needed.
"""

import pathlib

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _finish(figure, path):
    figure.tight_layout()
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure


def _history_dict(history):
    return history.history if hasattr(history, "history") else dict(history)


def plot_history(histories, metric="val_accuracy", path=None, title=None,
                 marks=None):
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
        line, = axes.plot(range(1, len(values) + 1), values, label=name)
        if marks and marks.get(name) is not None:
            axes.axvline(marks[name], linestyle="--", color=line.get_color(),
                         alpha=0.7)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(metric)
    axes.set_title(title or metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _finish(figure, path)
