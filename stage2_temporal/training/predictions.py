"""Per-clip predictions: the ``predictions_<store>.csv`` evaluation writes, and ensembles of several runs.

One row per clip: ``clip_id,label,prediction,confidence`` (class names; the predicted class's probability)
followed by one probability column per class name, so errors can be inspected and runs averaged.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation.atomic import atomic_path

PREDICTIONS_HEADER = ("clip_id", "label", "prediction", "confidence")


def class_labels(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """The class names, or ``class0``, ``class1``, ... when a store or model has none."""
    return list(class_names) if class_names else [f"class{c}" for c in range(num_classes)]


def write_predictions(
    path: str | Path,
    clip_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray | None,
    probs: np.ndarray,
    class_names: Sequence[str] | None,
) -> Path:
    """Writes the per-clip CSV atomically (temp file + rename); ``labels`` None leaves the column empty."""
    probs = np.asarray(probs, dtype=np.float64)
    names = class_labels(class_names, probs.shape[1])
    if len(clip_ids) != len(probs):
        raise ValueError(f"{path}: {len(clip_ids)} clip ids for {len(probs)} rows of probabilities")
    path = Path(path)
    predicted = probs.argmax(axis=1)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*PREDICTIONS_HEADER, *names])
        for i, clip in enumerate(clip_ids):
            label = "" if labels is None or labels[i] < 0 else names[int(labels[i])]
            p = int(predicted[i])
            writer.writerow([clip, label, names[p], f"{probs[i, p]:.8g}", *(f"{x:.8g}" for x in probs[i])])
    return path


def read_predictions(path: str | Path) -> dict[str, Any]:
    """A predictions CSV back as ``{"clip_ids", "labels" (names), "predictions", "class_names", "probs"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions file")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0] if rows else []
    if tuple(header[:4]) != PREDICTIONS_HEADER:
        raise ValueError(f"{path}: expected the header {','.join(PREDICTIONS_HEADER)},<class names>...")
    body = rows[1:]
    return {
        "clip_ids": [r[0] for r in body],
        "labels": [r[1] for r in body],
        "predictions": [r[2] for r in body],
        "class_names": header[4:],
        "probs": np.array([[float(x) for x in r[4:]] for r in body], dtype=np.float64).reshape(
            len(body), len(header) - 4
        ),
    }


def average_runs(
    results: Sequence[tuple[str, list[str], list[str] | None, np.ndarray]],
) -> np.ndarray:
    """The ensemble's probabilities: the mean of several runs' (name, clip ids, class names, probs).

    The runs must score the same clips, in the same order, over the same classes (else the error names
    the first run that differs).
    """
    if not results:
        raise ValueError("an ensemble needs at least one run")
    first_name, first_ids, first_classes, _ = results[0]
    for name, ids, classes, probs in results[1:]:
        if ids != first_ids:
            raise ValueError(f"--run {name}: scores other clips than --run {first_name} on this store")
        if classes != first_classes or probs.shape != results[0][3].shape:
            raise ValueError(f"--run {name}: other classes than --run {first_name} ({classes})")
    return np.mean([r[3] for r in results], axis=0)
