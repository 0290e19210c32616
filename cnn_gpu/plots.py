"""PNG figures of a run: learning curves and a confusion matrix.

matplotlib is optional (pip install cnn_gpu[plot]). The figures are drawn on matplotlib's Agg
canvas directly, without pyplot, so nothing here changes the backend of a user's session.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_learning_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike,
                         best_epoch: int | None = None) -> Path:
    """Loss and accuracy per epoch for train / val / test (whichever the history holds), side by side.

    history: fit()'s records (each with epoch, train_loss, train_accuracy, maybe val_* and test_*;
        a record with label_smoothing > 0 has a train_loss against smoothed targets, labelled so).
    best_epoch: marked with a dotted vertical line. Returns the PNG's path.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 4)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    for split, style in (("train", "-o"), ("val", "-s"), ("test", "-^")):
        for metric, ax in (("loss", loss_ax), ("accuracy", acc_ax)):
            key = f"{split}_{metric}"
            if history and key in history[0]:
                smoothing = history[-1].get("label_smoothing", 0) if key == "train_loss" else 0
                label = f"{split} (targets smoothed by {smoothing:g})" if smoothing else split
                ax.plot(epochs, [r[key] for r in history], style, markersize=3, label=label)
    for ax, title in ((loss_ax, "loss (cross-entropy)"), (acc_ax, "accuracy")):
        if best_epoch:
            ax.axvline(best_epoch, color="gray", linestyle=":", label=f"best val (epoch {best_epoch})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                          title: str = "confusion matrix") -> Path:
    """A heat map of a (K, K) confusion matrix (rows: true class, columns: predicted), each row
    shaded by its fraction, with the counts written in the cells. Returns the PNG's path."""
    matrix = np.asarray(matrix)
    k = len(class_names)
    fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = _figure(1.0 + 0.65 * k, 0.8 + 0.6 * k)
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if fractions[i, j] > 0.5 else "black")
    path = Path(path)
    fig.savefig(path)
    return path
