"""Classification metrics of stage 2, computed by scikit-learn: top-k, mean per-class accuracy, per-class
accuracy, confusion matrix.

Mean per-class accuracy is scikit-learn's balanced accuracy (the mean recall over the classes present in
the labels, computed as ``recall_score`` over those classes, which needs no warning filter when a class
is predicted but never true); top-k is ``top_k_accuracy_score(labels=range(C))``, ties ranked as
scikit-learn ranks them (the highest class index first); the matrix is ``confusion_matrix``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score, top_k_accuracy_score


def top_predictions(scores: np.ndarray) -> np.ndarray:
    """The best class per clip, (n,); ties go to the highest class index, as in ``top_k_accuracy_score``."""
    return scores.shape[1] - 1 - np.argmax(scores[:, ::-1], axis=1)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of clips whose label is among the k highest scores (every clip when k >= C)."""
    num_classes = scores.shape[1]
    if k >= num_classes:
        return 1.0
    if k == 1:  # scikit-learn's top-k takes 1-D scores for 2 classes: top-1 is the accuracy of the best
        return float(accuracy_score(labels, top_predictions(scores)))
    return float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(num_classes)))


def classification_metrics(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Top-1, top-5, mean per-class accuracy, per-class accuracy (None where a class has no clip), matrix.

    ``scores``: (n, C) probabilities or logits; ``labels``: (n,) class indices in [0, C).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or scores.shape != (len(labels), num_classes):
        raise ValueError(f"scores: expected shape ({len(labels)}, {num_classes}), got {scores.shape}")
    if len(labels) == 0:
        raise ValueError("labels: no clip to score")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels: expected class indices in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    predictions = top_predictions(scores)
    matrix = confusion_matrix(labels, predictions, labels=np.arange(num_classes))
    present = np.unique(labels)
    recall = recall_score(labels, predictions, labels=present, average=None)
    per_class: list[float | None] = [None] * num_classes
    for c, r in zip(present, recall):
        per_class[c] = float(r)
    return {
        "num_clips": len(labels),
        "top1": top_k_accuracy(scores, labels, 1),
        "top5": top_k_accuracy(scores, labels, 5),
        "mean_class_acc": float(recall.mean()),
        "per_class_acc": per_class,
        "support": matrix.sum(axis=1).tolist(),
        "confusion": matrix.tolist(),
    }


def format_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None, title: str = "") -> str:
    """A plain-text table: the summary line, then per-class accuracy and support."""
    n = len(metrics["per_class_acc"])
    names = list(class_names) if class_names else [str(c) for c in range(n)]
    width = max(12, *(len(s) for s in names)) + 2
    lines = [title] if title else []
    lines.append(f"{'clips':<14}{metrics['num_clips']:>10}")
    for key, label in (("top1", "top-1"), ("top5", "top-5"), ("mean_class_acc", "mean class acc")):
        lines.append(f"{label:<14}{100 * metrics[key]:>9.2f}%")
    lines.append("")
    lines.append(f"{'class':<{width}}{'accuracy':>10}{'clips':>8}")
    for name, acc, support in zip(names, metrics["per_class_acc"], metrics["support"]):
        shown = "-" if acc is None else f"{100 * acc:.2f}%"
        lines.append(f"{name:<{width}}{shown:>10}{support:>8}")
    return "\n".join(lines)


def write_confusion(
    matrix: np.ndarray | list, path_stem: str | Path, class_names: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Writes the confusion matrix as ``<stem>.csv`` (counts, class names as header) and ``<stem>.png``."""
    from stage2_temporal.training.plots import plot_confusion

    matrix = np.asarray(matrix)
    names = list(class_names) if class_names else [str(c) for c in range(len(matrix))]
    stem = Path(path_stem)
    csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *names])
        for name, row in zip(names, matrix):
            writer.writerow([name, *row.tolist()])
    plot_confusion(matrix, names, png_path)
    return csv_path, png_path
