"""Scoring trained heads on another cache (e.g. the test split): metrics, table, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation.devices import resolve_device
from stage2_temporal.training.checks import (
    check_class_names,
    check_finished_run,
    check_scoring_store,
    check_store_usable,
    store_class_names,
)
from stage2_temporal.training.data import CachedFeatures, check_same_features, store_name
from stage2_temporal.training.metrics import write_confusion
from stage2_temporal.training.predictions import average_runs, write_predictions
from stage2_temporal.training.run_dir import (
    FINGERPRINT_FILE,
    HEADS_FILE,
    METRICS_FILE,
    HeadsInfo,
    load_heads,
    read_heads_info,
    read_json,
    write_json_atomic,
)
from stage2_temporal.training.stream import open_features
from stage2_temporal.training.train import predict_proba, score, select_for_heads
from store.objects import store_location


def check_matches_heads(data: CachedFeatures, info: HeadsInfo) -> None:
    """The cache must have the sizes and classes the heads were trained with."""
    pairs = {
        "num_classes": (info.num_classes, data.num_classes),
        "embed_dim": (info.embed_dim, data.embed_dim),
        "cls_dim": (info.cls_dim, data.cls_dim),
    }
    if info.heads.flow_maps:
        pairs["flow heads"] = (info.flow_heads, data.flow_heads)
    bad = [f"{k}: heads {a}, cache {b}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise ValueError(f"{data.source} does not fit the trained heads:\n  " + "\n  ".join(bad))
    check_class_names(info.class_names, data.class_names, "the trained heads", data.source)


def heads_probabilities(
    run_dir: str | Path, data: CachedFeatures, batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    """A run's class probabilities (clips, C) on in-memory cached clips, softmax averaged over views."""
    classifier, info = load_heads(run_dir)
    data = select_for_heads(data, info)
    check_matches_heads(data, info)
    dev = resolve_device(device)
    return predict_proba(classifier.to(dev), data, batch_size, dev)


def evaluate_heads(
    run_dir: str | Path, data: CachedFeatures, batch_size: int = 256, device: str = "cpu"
) -> dict[str, Any]:
    """Metrics (with confusion matrix) of a run's heads on in-memory cached clips, views averaged."""
    probs = heads_probabilities(run_dir, data, batch_size, device)
    return score(probs, data.labels, data.num_classes)


def evaluate_store(
    run_dir: str | Path,
    store: str | Path,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
    memory_budget: int | str | None = None,
    allow_incomplete: bool = False,
) -> dict[str, Any]:
    """Scores a run on a store; writes ``eval_<store>.json``, ``confusion_<store>.csv/png`` and
    ``predictions_<store>.csv`` (per clip) in the run.

    Refuses a store whose features were made with other settings than the training store (the differing
    fields are named); ``force`` only warns.
    """
    return _evaluate_store(run_dir, store, force, device, progress, memory_budget, allow_incomplete)[0]


def evaluation_files(run_dir: str | Path, store: str | Path) -> list[Path]:
    """The files an evaluation of ``store`` writes into ``run_dir`` (checked before any work)."""
    name, run_dir = store_name(store), Path(run_dir)
    return [
        run_dir / f"eval_{name}.json",
        run_dir / f"confusion_{name}.csv",
        run_dir / f"confusion_{name}.png",
        run_dir / f"predictions_{name}.csv",
    ]


def run_inputs(run_dir: str | Path) -> list[Path]:
    """The files of a run that an evaluation reads."""
    return [Path(run_dir) / name for name in (HEADS_FILE, FINGERPRINT_FILE, METRICS_FILE)]


def _evaluate_store(
    run_dir: str | Path,
    store: str | Path,
    force: bool,
    device: str,
    progress: bool,
    memory_budget: int | str | None = None,
    allow_incomplete: bool = False,
    write: bool = True,
) -> tuple[dict[str, Any], np.ndarray, CachedFeatures]:
    """``evaluate_store``'s work; also returns the probabilities and the clips they score.

    ``write=False`` scores only (``_write_evaluation`` writes later), so an ensemble writes nothing until
    every run has been scored and the runs agree.
    """
    run_dir = check_finished_run(run_dir)
    resolve_device(device)
    record = run_dir / FINGERPRINT_FILE
    if not record.is_file():
        raise FileNotFoundError(f"{record}: not found; {run_dir} is not a run of amflow train-heads")
    differences = check_same_features(store, read_json(record).get("fingerprint_fields") or {}, force)
    info = read_heads_info(run_dir / HEADS_FILE)
    arrays = ("embeddings", "cls", "flow") if info.heads.flow_maps else ("embeddings", "cls")
    st = check_store_usable(store, arrays, allow_incomplete)
    check_class_names(info.class_names, store_class_names(st), f"run {run_dir}", f"store {store}")
    check_scoring_store(st, "store")
    data = open_features(  # in memory when it fits memory_budget, else streamed
        store, info.adapter_names, info.flow_block_names, info.heads.flow_maps, memory_budget, progress
    )
    probs = heads_probabilities(run_dir, data, device=device)
    metrics = score(probs, data.labels, data.num_classes)
    metrics.update(store=store_location(store), class_names=data.class_names, forced_differences=differences)
    if write:
        _write_evaluation(run_dir, store, metrics, probs, data)
    return metrics, probs, data


def _write_evaluation(
    run_dir: Path, store: str | Path, metrics: dict[str, Any], probs: np.ndarray, data: CachedFeatures
) -> None:
    """A scored run's files: confusion matrix, per-clip predictions, then ``eval_<store>.json``."""
    name = store_name(store)
    write_confusion(metrics.pop("confusion"), run_dir / f"confusion_{name}", data.class_names)
    write_predictions(
        run_dir / f"predictions_{name}.csv", data.clip_ids, data.labels, probs, data.class_names
    )
    write_json_atomic(metrics, run_dir / f"eval_{name}.json")


def evaluate_ensemble(
    run_dirs: Sequence[str | Path],
    store: str | Path,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
    memory_budget: int | str | None = None,
    allow_incomplete: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Scores each run on the store (writing its own files) and the ensemble: their probabilities averaged.

    Returns (the ensemble's metrics, each run's metrics).
    """
    results, scored = [], []
    for run_dir in run_dirs:  # score every run first: a refusal (other classes, clips) writes nothing
        metrics, probs, data = _evaluate_store(
            run_dir, store, force, device, progress, memory_budget, allow_incomplete, write=False
        )
        scored.append((Path(run_dir), metrics, probs, data))
        results.append((str(run_dir), data.clip_ids, data.class_names, probs))
    probs = average_runs(results)
    for run_dir, metrics, run_probs, run_data in scored:
        _write_evaluation(run_dir, store, metrics, run_probs, run_data)
    single = [metrics for _, metrics, _, _ in scored]
    ensemble = score(probs, data.labels, data.num_classes)
    ensemble.pop("confusion")
    ensemble.update(store=store_location(store), class_names=data.class_names, runs=list(map(str, run_dirs)))
    return ensemble, single
