"""A run's training curves as one PNG: every loss term per epoch with the
stages marked, and the accuracies (training, test, the teacher's)."""

import io

import numpy as np

from keras_fsp.training.files import atomic_write_bytes


def _series(history, name):
    values = history.get(name) or []
    return np.array([np.nan if v is None else v for v in values], "float64")


def draw_curves(history, path, teacher_accuracy=None, title=None):
    """Writes the curves of `history` (`RunFolder.history()`: columns of
    `metrics.csv`) to `path` as a PNG (atomically).

    Returns:
        `path`, or None when matplotlib is not installed or no epoch ran.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    epochs = _series(history, "epoch") + 1
    if not len(epochs):
        return None
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    losses, accuracies = figure.subplots(1, 2)
    # Terms differ by orders of magnitude (an FSP distance against a
    # cross-entropy): a log scale shows each one's course.
    for name in sorted(k for k in history if k.endswith("_loss") and k != "val_loss"):
        values = _series(history, name)
        if np.any(np.isfinite(values) & (values > 0)):
            losses.plot(epochs, np.where(values > 0, values, np.nan), label=name[:-5])
    losses.set_yscale("log")
    losses.set_xlabel("epoch")
    losses.set_title("loss terms")
    stages = history.get("stage") or []
    for i, stage in enumerate(stages):
        if stage and (i == 0 or stage != stages[i - 1]):
            for axes in (losses, accuracies):
                axes.axvline(epochs[i] - 0.5, color="0.7", linestyle="--", linewidth=0.8)
            losses.annotate(stage, (epochs[i] - 0.5, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.4")
    for name, label in (("accuracy", "training"), ("val_accuracy", "test")):
        values = _series(history, name)
        shown = np.isfinite(values)
        if np.any(shown):
            accuracies.plot(epochs[shown], values[shown], marker="." if name != "accuracy" else None,
                            label=label)
    if teacher_accuracy is not None:
        accuracies.axhline(teacher_accuracy, color="k", linestyle=":", label="teacher (test)")
    accuracies.set_ylim(0, 1)
    accuracies.set_xlabel("epoch")
    accuracies.set_title("accuracy")
    for axes in (losses, accuracies):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(str(path), buffer.getvalue())
    return path
