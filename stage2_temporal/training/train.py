"""Training the averaging classifier's heads from cached features (paper 000, sec. 3.2; METHOD.md s3).

All heads of a run are one ``AveragingClassifier``: one batched forward and backward per step. The cache
is in memory (a batch is a fancy index into it) or streamed from the store under a memory budget
(``stream.py``: same interface, shard-ordered epochs). Views: each epoch every training clip contributes one
view drawn at random (so an epoch costs the same for 1 or 3 views and views act as augmentation);
evaluation averages the softmax probabilities over all views (METHOD.md section 6).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from foundation.config import dump_config
from foundation.devices import resolve_device
from stage2_temporal.heads import AveragingClassifier
from stage2_temporal.training.checks import (
    check_class_names,
    check_out_dir,
    check_store_pair,
    check_store_usable,
    make_run_dir,
)
from stage2_temporal.training.config import TrainConfig
from stage2_temporal.training.data import CachedFeatures, check_same_features
from stage2_temporal.training.metrics import classification_metrics, write_confusion
from stage2_temporal.training.optim import adamw
from stage2_temporal.training.run_dir import (
    CONFIG_FILE,
    FINGERPRINT_FILE,
    HEADS_FILE,
    METRICS_FILE,
    HeadsInfo,
    save_heads,
    write_curve,
    write_json_atomic,
)
from stage2_temporal.training.schedule import WarmupCosine
from stage2_temporal.training.tensorboard import EpochLogger
from store.objects import store_location
from store.reader import resolve_selection

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The training loss became NaN or inf; the run stops unfinished."""


def heads_info(data: CachedFeatures, cfg: TrainConfig) -> HeadsInfo:
    """The classifier's shape for these (already selected) features and this config."""
    return HeadsInfo(
        heads=cfg.heads,
        num_classes=data.num_classes,
        adapter_names=list(data.adapter_names),
        embed_dim=data.embed_dim,
        cls_dim=data.cls_dim,
        flow_block_names=list(data.flow_block_names) if cfg.heads.flow_maps else [],
        flow_heads=data.flow_heads if cfg.heads.flow_maps else 0,
        flow_geometry=[b.to_dict() for b in data.flow_geometry] if cfg.heads.flow_maps else None,
        seed=cfg.seed,
        class_names=data.class_names,
    )


def select_for_heads(data: CachedFeatures, info_or_cfg: HeadsInfo | TrainConfig) -> CachedFeatures:
    """The adapters and flow blocks a config (by selection) or trained heads (by name) read."""
    if isinstance(info_or_cfg, HeadsInfo):
        flow_maps = info_or_cfg.heads.flow_maps
        return data.select(info_or_cfg.adapter_names, info_or_cfg.flow_block_names, with_flow=flow_maps)
    cfg = info_or_cfg
    return data.select(cfg.adapters, cfg.flow_blocks, with_flow=cfg.heads.flow_maps)


def check_compatible(train: CachedFeatures, other: CachedFeatures, what: str) -> None:
    """The two caches must hold the same branches, sizes and classes (else heads cannot read both)."""
    pairs = {
        "adapter_names": (train.adapter_names, other.adapter_names),
        "flow_block_names": (train.flow_block_names, other.flow_block_names),
        "embed_dim": (train.embed_dim, other.embed_dim),
        "cls_dim": (train.cls_dim, other.cls_dim),
        "frames": (train.num_frames, other.num_frames),
        "num_classes": (train.num_classes, other.num_classes),
        "flow shape": (train.flow_map_shape, other.flow_map_shape),
    }
    bad = [f"{k}: {a} in {train.source}, {b} in {other.source}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise ValueError(f"{what} {other.source} does not match the training cache:\n  " + "\n  ".join(bad))
    check_class_names(
        train.class_names, other.class_names, f"training cache {train.source}", f"{what} {other.source}"
    )


@torch.inference_mode()
def predict_proba(
    classifier: AveragingClassifier,
    data: CachedFeatures,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Class probabilities per clip (clips, C): the softmax of the clip logits, averaged over views."""
    was_training = classifier.training
    classifier.eval()
    probs = torch.zeros(data.num_clips, data.num_classes, dtype=torch.float64)
    for clips, view in data.eval_batches(batch_size):
        logits = classifier(data.batch(clips, torch.full_like(clips, view), device))
        probs[clips] += logits.float().softmax(dim=-1).double().cpu()
    classifier.train(was_training)
    return (probs / data.num_views).numpy()


@torch.inference_mode()
def predict_logits(
    classifier: AveragingClassifier,
    data: CachedFeatures,
    view: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Clip logits (clips, C) of one view, as the end-to-end model's ``forward`` returns them."""
    classifier.eval()
    out = []
    for start in range(0, data.num_clips, batch_size):
        clips = torch.arange(start, min(start + batch_size, data.num_clips))
        out.append(classifier(data.batch(clips, torch.full_like(clips, view), device)).float().cpu())
    return torch.cat(out).numpy()


def score(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Metrics of view-averaged probabilities (clips, C), plus the loss (NLL of the averaged probabilities).

    Stage 2 and end-to-end finetuning both score with this.
    """
    metrics = classification_metrics(probs, labels, num_classes)
    picked = probs[np.arange(len(labels)), labels]
    metrics["loss"] = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    return metrics


def make_optimiser(
    classifier: AveragingClassifier, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, WarmupCosine]:
    """AdamW over the trainable parameters (``optim.adamw``: no decay on biases, norms, embeddings), with a
    per-step cosine schedule after a linear warmup."""
    optimiser = adamw(classifier, cfg.lr, cfg.weight_decay)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return optimiser, WarmupCosine(optimiser, cfg.epochs * steps_per_epoch, warmup)


def train_epoch(
    classifier: AveragingClassifier,
    data: CachedFeatures,
    optimiser: torch.optim.Optimizer,
    schedule: WarmupCosine,
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    max_steps: int | None = None,
) -> tuple[float, float]:
    """One pass over the clips in random order, one random view each: (mean loss, top-1 accuracy).

    Every step is one batched forward/backward of all heads; ``max_steps`` stops early (benchmarks).
    """
    classifier.train()
    order = data.epoch_order(generator)  # a shard-ordered shuffle when streamed (stream.py)
    views = torch.randint(data.num_views, (data.num_clips,), generator=generator)
    labels = torch.from_numpy(data.labels)
    loss_sum, correct, seen = 0.0, 0, 0
    for step, start in enumerate(range(0, data.num_clips, cfg.batch_size)):
        if max_steps is not None and step >= max_steps:
            break
        clips = order[start : start + cfg.batch_size]
        target = labels[clips].to(device)
        logits = classifier(data.batch(clips, views[clips], device))
        loss = F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        loss_sum += loss.item() * len(clips)
        correct += int((logits.argmax(dim=-1) == target).sum())
        seen += len(clips)
    return loss_sum / seen, correct / seen


def train_heads(
    train_data: CachedFeatures,
    val_data: CachedFeatures,
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Trains the averaging classifier's heads on ``train_data``, early-stopped on validation mean class
    accuracy, and writes the run directory (``metrics.json`` last). Returns the metrics.

    ``provenance`` (e.g. the stores' paths and fingerprint fields) is written to ``fingerprint.json``;
    ``tensorboard`` also logs each epoch's curve row as TensorBoard scalars (when installed).
    """
    out = Path(out_dir)
    cfg.validate()
    train = select_for_heads(train_data, cfg)
    val = select_for_heads(val_data, cfg)
    check_compatible(train, val, "validation cache")
    device = resolve_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).unlink(missing_ok=True)  # this directory is not a finished run until the end
    dump_config(cfg, out / CONFIG_FILE)
    write_json_atomic(
        provenance
        or {
            "train": train_data.source,
            "val": val_data.source,
            "fingerprint_fields": train_data.fingerprint_fields,
        },
        out / FINGERPRINT_FILE,
    )

    torch.manual_seed(cfg.seed)
    info = heads_info(train, cfg)
    classifier = info.build().to(device)
    optimiser, schedule = make_optimiser(classifier, cfg, math.ceil(train.num_clips / cfg.batch_size))
    generator = torch.Generator().manual_seed(cfg.seed)

    curve: list[dict[str, Any]] = []
    best_score, best_epoch, best_state, waited = -1.0, 0, None, 0
    start_time = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc="train heads", unit="epoch", disable=not progress, leave=False)
    board = EpochLogger(out, enabled=tensorboard)
    for epoch in bar:
        lr = optimiser.param_groups[0]["lr"]
        epoch_start = time.perf_counter()
        train_loss, train_top1 = train_epoch(classifier, train, optimiser, schedule, cfg, generator, device)
        train_seconds = time.perf_counter() - epoch_start
        if not math.isfinite(train_loss):
            raise NonFiniteLossError(
                f"{out}: the training loss is {train_loss} in epoch {epoch}; stopped, the run is unfinished "
                "(no metrics.json); try a lower lr or check the stores with amflow store verify"
            )
        probs = predict_proba(classifier, val, cfg.eval_batch_size, device)
        val_metrics = score(probs, val.labels, val.num_classes)
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "train_top1": train_top1,
            "val_loss": val_metrics["loss"],
            "val_top1": val_metrics["top1"],
            "val_top5": val_metrics["top5"],
            "val_mean_class_acc": val_metrics["mean_class_acc"],
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - epoch_start,
        }
        curve.append(row)
        board.log(row, epoch)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_mca=f"{row['val_mean_class_acc']:.3f}")
        if row["val_mean_class_acc"] > best_score:
            best_score, best_epoch, waited = row["val_mean_class_acc"], epoch, 0
            best_state = copy.deepcopy(classifier.state_dict())
        else:
            waited += 1
            if cfg.patience is not None and waited >= cfg.patience:
                log.info(
                    "early stop at epoch %d: no better validation score since epoch %d", epoch, best_epoch
                )
                break
    bar.close()
    board.close()
    seconds = time.perf_counter() - start_time

    classifier.load_state_dict(best_state)
    probs = predict_proba(classifier, val, cfg.eval_batch_size, device)
    val_metrics = score(probs, val.labels, val.num_classes)
    save_heads(classifier, info, out / HEADS_FILE)
    write_curve(curve, out)
    write_confusion(val_metrics.pop("confusion"), out / "confusion_val", val.class_names)
    metrics = {
        "val": val_metrics,
        "best_epoch": best_epoch,
        "epochs_run": len(curve),
        "stopped_early": len(curve) < cfg.epochs,
        "final_train_loss": curve[-1]["train_loss"],
        "seconds": seconds,
        "seconds_per_epoch": sum(r["seconds"] for r in curve) / len(curve),
        "train_seconds_per_epoch": sum(r["train_seconds"] for r in curve) / len(curve),
        "trainable_parameters": sum(p.numel() for p in classifier.parameters() if p.requires_grad),
        "num_branches": classifier.num_branches,
        "num_train_clips": train.num_clips,
        "num_val_clips": val.num_clips,
        "class_names": val.class_names,
        "seed": cfg.seed,
        "device": str(device),
    }
    write_json_atomic(metrics, out / METRICS_FILE)
    return metrics


def resolved_selection(
    cfg: TrainConfig, adapter_names: list[str], flow_block_names: list[str]
) -> TrainConfig:
    """The config with its adapter / flow-block positions turned into names ("all" stays "all")."""

    def names(what: str, selection: list[int | str] | str, available: list[str]) -> list[str] | str:
        if selection == "all":
            return "all"
        return [available[i] for i in resolve_selection(what, available, selection)]

    flow_blocks = (
        names("flow_blocks", cfg.flow_blocks, flow_block_names) if cfg.heads.flow_maps else cfg.flow_blocks
    )
    return replace(cfg, adapters=names("adapters", cfg.adapters, adapter_names), flow_blocks=flow_blocks)


def train_heads_from_stores(
    train_store: str | Path,
    val_store: str | Path,
    cfg: TrainConfig,
    out_dir: str | Path,
    force: bool = False,
    progress: bool = True,
    memory_budget: int | str | None = None,
    features_on_device: bool = False,
    tensorboard: bool = True,
    allow_incomplete: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Checks both stores (complete, undamaged, same features and classes) and the config before anything
    is written, opens both once, trains (train_heads). ``overwrite`` moves an existing run aside first.

    The selected arrays are held in memory when they fit ``memory_budget`` (bytes, ``"1GB"``; default half
    the available RAM), else streamed from the stores (``stream.py``). ``features_on_device`` holds
    in-memory features on the CUDA device of ``cfg.device`` when they fit (``stream.hold_on_device``).
    """
    from stage2_temporal.training.stream import hold_on_device, open_pair

    cfg.validate()
    resolve_device(cfg.device)
    arrays = ("embeddings", "cls", "flow") if cfg.heads.flow_maps else ("embeddings", "cls")
    st = check_store_usable(train_store, arrays, allow_incomplete)
    val_st = check_store_usable(val_store, arrays, allow_incomplete)
    fields = st.fingerprint_fields
    differences = check_same_features(val_store, fields, force=force)
    class_names = check_store_pair(st, val_st)
    check_out_dir(out_dir)
    cfg = resolved_selection(cfg, st.adapter_names, st.flow_block_names)
    flow = cfg.heads.flow_maps
    train, val = open_pair(
        train_store, val_store, cfg.adapters, cfg.flow_blocks, flow, memory_budget, progress
    )
    if features_on_device:
        device = resolve_device(cfg.device)
        train, val = hold_on_device(train, device), hold_on_device(val, device)
    check_compatible(select_for_heads(train, cfg), select_for_heads(val, cfg), "validation cache")
    make_run_dir(out_dir, overwrite)
    provenance = {
        "train_store": store_location(train_store),
        "val_store": store_location(val_store),
        "fingerprint_fields": fields,
        "forced_differences": differences,
        # what ``amflow predict`` rebuilds stage 1 from: the model and dataset configs, weights, checkpoint
        "features": {
            **{k: st.provenance.get(k) for k in ("config", "weights", "checkpoint")},
            "classes": st.class_names,
        },
        "class_names": class_names,
    }
    return train_heads(
        train, val, cfg, out_dir, progress=progress, provenance=provenance, tensorboard=tensorboard
    )
