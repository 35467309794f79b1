"""Scoring trained heads on another cache (e.g. the test split): metrics, table, confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stage1_extract.backbone import resolve_device
from stage2_temporal.checks import (
    check_class_names,
    check_finished_run,
    check_store_usable,
    store_class_names,
)
from stage2_temporal.data import CachedFeatures, check_same_features, load_store, store_name
from stage2_temporal.metrics import write_confusion
from stage2_temporal.run_dir import (
    FINGERPRINT_FILE,
    HEADS_FILE,
    HeadsInfo,
    load_heads,
    read_heads_info,
    write_json_atomic,
)
from stage2_temporal.train import predict_proba, score, select_for_heads


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


def evaluate_heads(
    run_dir: str | Path, data: CachedFeatures, batch_size: int = 256, device: str = "cpu"
) -> dict[str, Any]:
    """Metrics (with confusion matrix) of a run's heads on in-memory cached clips, views averaged."""
    classifier, info = load_heads(run_dir)
    data = select_for_heads(data, info)
    check_matches_heads(data, info)
    dev = resolve_device(device)
    return score(predict_proba(classifier.to(dev), data, batch_size, dev), data)


def evaluate_store(
    run_dir: str | Path,
    store: str | Path,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
    allow_incomplete: bool = False,
) -> dict[str, Any]:
    """Scores a run on a store; writes ``eval_<store>.json`` and ``confusion_<store>.csv/png`` in the run.

    Refuses a store whose features were made with other settings than the training store (the differing
    fields are named); ``force`` only warns.
    """
    run_dir = check_finished_run(run_dir)
    resolve_device(device)
    record = run_dir / FINGERPRINT_FILE
    if not record.is_file():
        raise FileNotFoundError(f"{record}: not found; {run_dir} is not a run of amflow train-heads")
    differences = check_same_features(store, json.loads(record.read_text())["fingerprint_fields"], force)
    info = read_heads_info(run_dir / HEADS_FILE)
    arrays = ("embeddings", "cls", "flow") if info.heads.flow_maps else ("embeddings", "cls")
    st = check_store_usable(store, arrays, allow_incomplete)
    check_class_names(info.class_names, store_class_names(st), f"run {run_dir}", f"store {store}")
    data = load_store(
        store, info.adapter_names, info.flow_block_names, with_flow=info.heads.flow_maps, progress=progress
    )
    metrics = evaluate_heads(run_dir, data, device=device)
    name = store_name(store)
    write_confusion(metrics.pop("confusion"), run_dir / f"confusion_{name}", data.class_names)
    metrics.update(
        store=str(Path(store).resolve()), class_names=data.class_names, forced_differences=differences
    )
    write_json_atomic(metrics, run_dir / f"eval_{name}.json")
    return metrics
