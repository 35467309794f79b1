"""Stage-2 figures (matplotlib Agg, files only): confusion matrix, training curve, leaderboard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | Path) -> None:
    """Row-normalised confusion matrix (recall per true class), drawn by scikit-learn's
    ``ConfusionMatrixDisplay``; the fractions are written in the cells up to 12 classes."""
    plt = _pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    recall = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(class_names)
    size = min(4 + 0.35 * n, 20)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    display = ConfusionMatrixDisplay(recall, display_labels=list(class_names))
    display.plot(
        ax=ax,
        cmap="Blues",
        include_values=n <= 12,
        values_format=".2f",
        xticks_rotation="vertical",
        im_kw={"vmin": 0.0, "vmax": 1.0},
        text_kw={"fontsize": 8},
    )
    fontsize = max(5, 10 - n // 8)
    ax.tick_params(labelsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    display.im_.colorbar.set_label("fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curve(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Training loss and validation accuracies per epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    for key, label in (
        ("train_top1", "train top-1"),
        ("val_top1", "val top-1"),
        ("val_mean_class_acc", "val mean class acc"),
    ):
        ax_acc.plot(epochs, [r[key] for r in rows], label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_leaderboard(labels: Sequence[str], values: Sequence[float], path: str | Path, top: int = 40) -> None:
    """Horizontal bars of the validation mean class accuracy, best run on top."""
    plt = _pyplot()
    labels, values = list(labels)[:top], list(values)[:top]
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.3 * len(labels)))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("validation mean class accuracy")
    for i, v in enumerate(values):
        ax.text(v + 0.005, i, f"{100 * v:.1f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
