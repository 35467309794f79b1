"""End-to-end finetuning from videos: adapters, aligning encoders and heads of the AM-flow model, or the
linear adapters and head of ZeroI2V, trained together on the frozen backbone (papers 000 and 002).

One process or ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on CUDA). Everything random is a
function of numbers, never of process history, so a killed run resumes to the same weights:

- clip order of epoch e: a permutation seeded by (seed, e); optimiser step s of the epoch takes clips
  ``[s*G, (s+1)*G)`` of it (G = global batch; the last incomplete batch is dropped), split into
  ``world_size x accumulation`` micro-batches, each rank decoding only its own;
- clip sampling and augmentation of clip i in epoch e: seeded by (seed, e, i) (``VideoClipDataset`` and
  ``AugmentedClips``), whatever the rank or DataLoader worker;
- dropout and other torch randomness of step s: the global RNG is re-seeded by (seed, e, s, rank) before
  the step, so the resume state needs no RNG state.

RUN_DIR holds ``config.yaml`` (the resolved model, dataset and recipe configs), ``last.safetensors`` and
``best.safetensors`` (trainable parameters + config, ``stage1_extract.checkpoint``), ``resume.pt``
(optimiser, scheduler, position, curve; loads with ``torch.load(weights_only=True)``), ``steps.csv``
(loss and lr per optimiser step), ``curve.csv/png`` (per epoch), ``confusion_val.csv/png`` and, written
last, ``metrics.json``: its presence means the run finished.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import pickle
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from stage1_extract.amflow_model import AMFlowModel
from stage1_extract.backbone import normalise_video, pixel_stats, resolve_device
from stage1_extract.checkpoint import (
    CheckpointError,
    load_into,
    load_trainable_checkpoint,
    read_metadata,
    save_trainable_checkpoint,
)
from stage1_extract.config import (
    CONFIG_ROOT,
    ConfigError,
    config_to_dict,
    deep_merge,
    load_config,
)
from stage1_extract.datasets import DatasetIndex, build_index, canonical_split, load_dataset_config
from stage1_extract.models import ModelConfig, build_model, load_model_config, model_config_from_dict
from stage1_extract.video import VideoClipDataset, collate_clips
from stage1_extract.zeroi2v import ZeroI2VModel
from stage2_temporal.augment import AugmentConfig, AugmentedClips, derived_seed
from stage2_temporal.checks import check_out_dir
from stage2_temporal.metrics import classification_metrics, write_confusion
from stage2_temporal.run_dir import CONFIG_FILE, METRICS_FILE, write_curve, write_json_atomic
from stage2_temporal.train import cosine_with_warmup

log = logging.getLogger(__name__)

DEFAULT_RECIPE = CONFIG_ROOT / "finetune" / "default.yaml"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
RESUME_FILE = "resume.pt"
STEPS_FILE = "steps.csv"
RESUME_FORMAT = "amflow-finetune-resume-1"
# Recipe keys that change how a run executes, not what it computes: they may differ on --resume.
RUNTIME_KEYS = ("num_workers", "eval_batch_size", "save_every_steps", "device")
RUN_FILES = (
    CONFIG_FILE,
    LAST_FILE,
    BEST_FILE,
    RESUME_FILE,
    STEPS_FILE,
    METRICS_FILE,
    "curve.csv",
    "curve.png",
    "confusion_val.csv",
    "confusion_val.png",
)

FinetunableModel = AMFlowModel | ZeroI2VModel


@dataclass
class FinetuneConfig:
    """The end-to-end recipe: AdamW, linear warmup then cosine per step, global batch via accumulation."""

    epochs: int = 40
    batch_size: int = 64  # global clips per optimiser step (all ranks, all accumulated micro-batches)
    micro_batch_size: int | None = 8  # clips per rank per forward/backward; None = batch_size / world size
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    gradient_checkpointing: bool = False  # recompute the transformer blocks in the backward pass
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast on CUDA; the CPU always computes in fp32
    val_split: str | None = None  # None = the dataset's val/validation split, else test (with a warning)
    eval_batch_size: int = 8  # clips per forward in validation (each with all its test views)
    num_workers: int = 4  # decoding processes per rank
    save_every_steps: int | None = None  # also write the resume state every N steps (always every epoch)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK when CUDA exists)
    seed: int = 0

    def validate(self) -> None:
        self.augment.validate()
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("keys 'epochs', 'batch_size' and 'eval_batch_size': expected >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"key 'micro_batch_size': expected >= 1 or null, got {self.micro_batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"keys 'lr' > 0 and 'weight_decay' >= 0 expected, got {self.lr}, {self.weight_decay}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"key 'warmup_epochs': expected 0..epochs={self.epochs}, got {self.warmup_epochs}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"key 'label_smoothing': expected [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"key 'grad_clip': expected > 0 or null, got {self.grad_clip}")
        if self.num_workers < 0:
            raise ValueError(f"key 'num_workers': expected >= 0, got {self.num_workers}")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            raise ValueError(f"key 'save_every_steps': expected >= 1 or null, got {self.save_every_steps}")


# ------------------------------------------------------------------------------------------ configuration


@dataclass
class FinetunePlan:
    """Everything a run reads: resolved configs, the two splits' indexes, and where the videos are."""

    dataset: str
    root: Path
    model: ModelConfig
    data: Any  # stage1_extract.datasets.DatasetConfig
    recipe: FinetuneConfig
    train: DatasetIndex
    val: DatasetIndex
    crop_size: int

    def resolved(self) -> dict[str, Any]:
        """The run's record, written to ``config.yaml``: dataset, root, val split, and the three configs."""
        return {
            "dataset": self.dataset,
            "root": str(self.root),
            "val_split": self.val.split,
            "model": config_to_dict(self.model),
            "data": config_to_dict(self.data),
            "finetune": config_to_dict(self.recipe),
        }


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """``model.X=v`` -> model, ``data.X=v`` -> dataset, ``finetune.X=v`` or anything else -> recipe."""
    model, data, recipe = [], [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for prefix, bucket in (("model.", model), ("data.", data), ("finetune.", recipe)):
            if key.startswith(prefix):
                bucket.append(item[item.index(prefix) + len(prefix) :])
                break
        else:
            recipe.append(item)
    return model, data, recipe


def resolve_val_split(dataset: str, requested: str | None) -> str:
    """The validation split: the one asked for, else val/validation, else test (warned: selection on test)."""
    if requested is not None:
        return canonical_split(dataset, requested)
    try:
        return canonical_split(dataset, "val")
    except ValueError:
        log.warning(
            "dataset %s has no validation split: validating on 'test' (the best checkpoint is then "
            "chosen on the test set; set val_split to silence this)",
            dataset,
        )
        return canonical_split(dataset, "test")


def plan_finetune(
    dataset: str,
    root: str | Path,
    model_config: str | Path,
    *,
    protocol: str | None = None,
    recipe: str | Path | None = DEFAULT_RECIPE,
    overrides: Sequence[str] = (),
) -> FinetunePlan:
    """Loads the three configs (overrides routed by ``split_overrides``) and indexes train and val splits.

    The model gets the dataset's class count and frame count; the crop size is the backbone's input size.
    """
    model_over, data_over, recipe_over = split_overrides(overrides)
    if protocol is not None:
        data_over.append(f"protocol={protocol}")
    data_cfg = load_dataset_config(dataset, data_over)
    ft = load_config(FinetuneConfig, recipe, recipe_over)
    model_cfg = load_model_config(model_config, model_over)
    img = model_cfg.backbone.img_size
    if data_cfg.crop_size is not None and img is not None and data_cfg.crop_size != img:
        raise ConfigError(
            f"dataset crop_size {data_cfg.crop_size} differs from {model_config} backbone.img_size {img}: "
            "the ViT takes one input size (set data.crop_size or model.backbone.img_size)"
        )
    crop = data_cfg.crop_size or img
    if crop is None:
        raise ConfigError(f"{model_config}: set backbone.img_size (or data.crop_size)")
    root, name = Path(root).resolve(), data_cfg.name
    train = build_index(name, root, "train", data_cfg)
    val = build_index(name, root, resolve_val_split(name, ft.val_split), data_cfg)
    for index in (train, val):
        log.info(index.summary())
        if not index.records:
            raise ConfigError(f"{name} split {index.split!r} under {root}: no clips found")
        if index.missing:
            log.warning("%s: %d listed videos are missing and left out", index.split, len(index.missing))
    if train.classes != val.classes:
        raise ConfigError(f"{name}: train and {val.split} splits list different classes")
    changes = {"num_classes": train.num_classes, "num_frames": data_cfg.num_frames}
    model_cfg = model_config_from_dict(
        deep_merge(config_to_dict(model_cfg), changes), f"{model_config} (with the dataset's {changes})"
    )
    return FinetunePlan(name, root, model_cfg, data_cfg, ft, train, val, int(crop))


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved configs (recipe runtime keys ignored)."""
    flat_a, flat_b = _flatten(stored), _flatten(current)
    ignored = {f"finetune.{k}" for k in RUNTIME_KEYS}
    keys = sorted((set(flat_a) | set(flat_b)) - ignored)
    return [f"{k}: {flat_a.get(k)!r} -> {flat_b.get(k)!r}" for k in keys if flat_a.get(k) != flat_b.get(k)]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------- distribution


@dataclass
class Distributed:
    """This process's place: rank, world size, local rank; ``owns_group`` when we initialised it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce sum of a CPU tensor, in place (a no-op in one process; via the GPU under nccl)."""
        if self.world_size > 1:
            if dist.get_backend() == "nccl":
                on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
                tensor.copy_(on_gpu.cpu())
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def init_distributed(device: str) -> tuple[Distributed, torch.device]:
    """Joins the torchrun process group (``WORLD_SIZE`` > 1 in the environment) and picks this rank's device.

    nccl with one GPU per rank (``cuda:LOCAL_RANK``) when CUDA is used, else gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), resolve_device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wanted = resolve_device(device)
    if wanted.type == "cuda":
        wanted = torch.device("cuda", local)
        torch.cuda.set_device(wanted)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if wanted.type == "cuda" else "gloo")
    return Distributed(rank, world, local, owns), wanted


def epoch_order(num_clips: int, seed: int, epoch: int) -> torch.Tensor:
    """The clip order of an epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, 0x6F72646572))
    return torch.randperm(num_clips, generator=generator)


class StepBatches(Sampler[list[int]]):
    """This rank's micro-batches (lists of clip indices) for optimiser steps ``start..stop`` of an epoch.

    Step s uses clips ``order[s*G : (s+1)*G]``; its micro-batch ``a`` of rank ``r`` is the slice number
    ``a * world + r`` of ``micro`` clips, so every clip of the step is read by exactly one rank.
    """

    def __init__(
        self, order: torch.Tensor, start: int, stop: int, micro: int, accumulation: int, dist_: Distributed
    ) -> None:
        self.order, self.start, self.stop = order, start, stop
        self.micro, self.accumulation, self.dist = micro, accumulation, dist_

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        G = self.micro * self.accumulation * self.dist.world_size
        for step in range(self.start, self.stop):
            clips = self.order[step * G : (step + 1) * G]
            for a in range(self.accumulation):
                part = a * self.dist.world_size + self.dist.rank
                yield clips[part * self.micro : (part + 1) * self.micro].tolist()


# ------------------------------------------------------------------------------------------------ model


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision in ``dtype`` on ``device``; ``None`` = full precision."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def use_gradient_checkpointing(model: FinetunableModel) -> int:
    """Recomputes each transformer block in the backward pass instead of keeping its activations.

    Wraps the blocks' ``forward`` (state-dict keys unchanged); returns the number of blocks wrapped.
    """
    for block in model.vit.blocks:
        forward = block.forward

        def checkpointed(*args: Any, _forward: Any = forward) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False)
            return _forward(*args)

        block.forward = checkpointed
    return len(model.vit.blocks)


def build_finetune_model(cfg: ModelConfig) -> FinetunableModel:
    """The model of ``cfg``: frozen backbone, trainable adapters (and aligners) and classifier."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        model = build_model(cfg)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameter")
    return model


def checkpoint_config(model: FinetunableModel, cfg: ModelConfig) -> ModelConfig:
    """The config stored with a checkpoint: ZeroI2V's resolved one (explicit head offsets) or ``cfg``."""
    return getattr(model, "config", cfg)


# ------------------------------------------------------------------------------------------------- state


def save_resume_state(state: dict[str, Any], path: str | Path) -> None:
    """Writes the resume state atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """Reads ``resume.pt`` with ``weights_only=True`` (plain containers, numbers and tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no resume state (the run never finished an epoch or a save point)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:  # never weights_only=False
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a resume state amflow wrote (refused to load: {first[:200]}); start the run "
            "again with --overwrite"
        ) from e
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path}: not an amflow finetune resume state (format {RESUME_FORMAT})")
    return state


def _read_steps(path: Path, up_to: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            if int(r["step"]) <= up_to:
                rows.append(
                    {
                        "step": int(r["step"]),
                        "epoch": int(r["epoch"]),
                        "lr": float(r["lr"]),
                        "loss": float(r["loss"]),
                    }
                )
    return rows


def _write_steps(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "epoch", "lr", "loss"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def prepare_run_dir(out: Path, plan: FinetunePlan, resume: bool, overwrite: bool) -> None:
    """Checks RUN_DIR: empty (or ``overwrite``) for a new run; unfinished and same config to ``resume``."""
    check_out_dir(out)
    if resume:
        if (out / METRICS_FILE).is_file():
            raise ValueError(f"--out {out}: the run already finished (metrics.json); nothing to resume")
        if not (out / RESUME_FILE).is_file():
            raise FileNotFoundError(f"--out {out}: no {RESUME_FILE} to resume from")
        stored = yaml.safe_load((out / CONFIG_FILE).read_text())
        diff = config_differences(stored, plan.resolved())
        if diff:
            raise ConfigError(
                f"--resume {out}: the configs differ from the run's {CONFIG_FILE}:\n  " + "\n  ".join(diff)
            )
        return
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"--out {out}: already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or --overwrite to start again"
        )


# ---------------------------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    """What a call did: run dir, whether it finished, steps done, metrics (finished runs), rank 0 or not."""

    run_dir: Path
    finished: bool
    global_step: int
    metrics: dict[str, Any] | None = None
    is_main: bool = True


def evaluate_clips(
    model: FinetunableModel,
    dataset: VideoClipDataset,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    dist_: Distributed,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities averaged over each clip's test views, (clips, C) float64, and a decoded mask.

    Each rank scores clips ``rank::world``; the result is summed over ranks, so every rank gets all of it.
    """
    n = len(dataset)
    probs = torch.zeros(n, num_classes, dtype=torch.float64)
    decoded = torch.zeros(n, dtype=torch.float64)
    mine = list(range(dist_.rank, n, dist_.world_size))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_clips,
        pin_memory=device.type == "cuda",
    )
    mean, std = pixel_stats(model.vit, device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(loader, desc="validate", unit="batch", disable=not progress, leave=False):
            if batch["video"] is None:
                continue
            video = batch["video"].to(device, non_blocking=True)
            B, V = video.shape[:2]
            with autocast(device, autocast_dtype):
                logits = model(normalise_video(video.flatten(0, 1), mean, std))
            p = logits.float().softmax(dim=-1).double().reshape(B, V, -1).mean(dim=1).cpu()
            probs[batch["index"]] = p
            decoded[batch["index"]] = 1.0
    model.train(was_training)
    dist_.sum(probs)
    dist_.sum(decoded)
    return probs.numpy(), decoded.numpy().astype(bool)


def score_probs(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Stage 2's metrics (``classification_metrics``) plus the loss: NLL of the view-averaged probability."""
    metrics = classification_metrics(probs, labels, num_classes)
    picked = probs[np.arange(len(labels)), labels]
    metrics["loss"] = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    return metrics


def finetune(
    plan: FinetunePlan,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Trains ``plan``'s model end to end, validating every epoch; writes RUN_DIR (rank 0 only).

    ``stop_after_steps`` stops before optimiser step N+1 (the schedule is unchanged), writing the resume
    state as a killed run would have at a save point; ``resume`` continues it. Under torchrun the
    ranks train one DistributedDataParallel model.
    """
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ValueError(f"stop_after_steps: expected >= 1, got {stop_after_steps}")
    dist_, device = init_distributed(plan.recipe.device)
    try:
        run = FinetuneRun(plan, Path(out_dir), dist_, device, progress and dist_.is_main)
        run.start(resume, overwrite)
        return run.train(stop_after_steps)
    finally:
        if dist_.owns_group:
            dist.destroy_process_group()


class FinetuneRun:
    """One run's model, optimiser, schedule, data and resumable ``state`` (plain data, saved in resume.pt)."""

    def __init__(
        self, plan: FinetunePlan, out: Path, dist_: Distributed, device: torch.device, progress: bool
    ) -> None:
        ft = plan.recipe
        self.plan, self.out, self.dist, self.device, self.progress = plan, out, dist_, device, progress
        world = dist_.world_size
        self.micro = ft.micro_batch_size or ft.batch_size // world
        if self.micro < 1 or ft.batch_size % (self.micro * world):
            raise ConfigError(
                f"batch_size {ft.batch_size} is not a multiple of micro_batch_size {self.micro} x {world} "
                "processes"
            )
        self.accumulation = ft.batch_size // (self.micro * world)
        self.steps_per_epoch = len(plan.train.records) // ft.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size {ft.batch_size} is larger than the {len(plan.train.records)} training clips"
            )
        self.model = build_finetune_model(plan.model)
        self.checkpoint_cfg = checkpoint_config(self.model, plan.model)
        if ft.gradient_checkpointing:
            use_gradient_checkpointing(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=ft.lr, weight_decay=ft.weight_decay)
        total = ft.epochs * self.steps_per_epoch
        self.schedule = cosine_with_warmup(total, round(ft.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" and ft.precision == "bf16" else None
        clips = VideoClipDataset(
            plan.train.records, plan.root, plan.data, plan.crop_size, train=True, seed=ft.seed
        )
        self.train_set = AugmentedClips(clips, ft.augment, seed=ft.seed)
        self.val_set = VideoClipDataset(plan.val.records, plan.root, plan.data, plan.crop_size, train=False)
        self.state: dict[str, Any] = {
            "format": RESUME_FORMAT,
            "epoch": 0,  # epochs finished (validated)
            "step_in_epoch": 0,  # optimiser steps done in the current epoch
            "global_step": 0,
            "epoch_sums": [0.0, 0.0, 0.0],  # loss sum, correct, clips of the current epoch so far
            "curve": [],
            "best_score": -1.0,
            "best_epoch": 0,
            "best_metrics": None,
            "train_seconds": 0.0,
            "seconds": 0.0,
            "failed_train_clips": 0,
        }
        self.step_rows: list[dict[str, Any]] = []

    def start(self, resume: bool, overwrite: bool) -> None:
        """Checks RUN_DIR, then writes config.yaml (new run) or loads the last save point (``resume``)."""
        out = self.out
        prepare_run_dir(out, self.plan, resume, overwrite)
        self.dist.barrier()  # every rank has checked RUN_DIR before rank 0 writes into it
        if self.dist.is_main and not resume:
            out.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            (out / CONFIG_FILE).write_text(yaml.safe_dump(self.plan.resolved(), sort_keys=False))
        if resume:
            loaded = load_resume_state(out / RESUME_FILE)
            saved_step = read_metadata(out / LAST_FILE).get("global_step")
            if saved_step != str(loaded["global_step"]):
                raise CheckpointError(
                    f"{out / LAST_FILE}: holds step {saved_step}, {RESUME_FILE} step {loaded['global_step']}"
                )
            weights, _ = load_trainable_checkpoint(out / LAST_FILE)
            load_into(self.model, weights, out / LAST_FILE)
            self.optimizer.load_state_dict(loaded.pop("optimizer"))
            self.scheduler.load_state_dict(loaded.pop("scheduler"))
            self.state.update(loaded)
            self.step_rows = _read_steps(out / STEPS_FILE, self.state["global_step"])
            if self.dist.is_main:
                log.info(
                    "resuming %s after step %d (epoch %d)", out, loaded["global_step"], loaded["epoch"] + 1
                )
        self.model.to(self.device)
        self.mean, self.std = pixel_stats(self.model.vit, self.device)
        self.trained = self.model
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def train(self, stop_after_steps: int | None = None) -> FinetuneResult:
        """Epochs from the current state to the end (or to ``stop_after_steps``), then the final files."""
        state, ft = self.state, self.plan.recipe
        clock, seconds_before = time.perf_counter(), state["seconds"]
        while state["epoch"] < ft.epochs:
            epoch_start = time.perf_counter()
            stopped = not self.train_epoch(stop_after_steps)
            state["seconds"] = seconds_before + time.perf_counter() - clock
            if stopped:
                self.save_point()
                return FinetuneResult(self.out, False, state["global_step"], is_main=self.dist.is_main)
            self.validate(time.perf_counter() - epoch_start)
            state["seconds"] = seconds_before + time.perf_counter() - clock
            self.save_point()
        metrics = self.final_metrics()
        if self.dist.is_main:
            write_curve(state["curve"], self.out)
            write_confusion(
                state["best_metrics"]["confusion"], self.out / "confusion_val", self.plan.train.classes
            )
            write_json_atomic(metrics, self.out / METRICS_FILE)
        self.dist.barrier()
        return FinetuneResult(self.out, True, state["global_step"], metrics, self.dist.is_main)

    def train_epoch(self, stop_after_steps: int | None) -> bool:
        """The remaining optimiser steps of the current epoch; False when stopped by ``stop_after_steps``."""
        state, ft = self.state, self.plan.recipe
        epoch, start = state["epoch"], state["step_in_epoch"]
        self.train_set.set_epoch(epoch)
        order = epoch_order(len(self.train_set), ft.seed, epoch)
        batches = StepBatches(order, start, self.steps_per_epoch, self.micro, self.accumulation, self.dist)
        loader = DataLoader(
            self.train_set,
            batch_sampler=batches,
            num_workers=ft.num_workers,
            collate_fn=collate_clips,
            pin_memory=self.device.type == "cuda",
        )
        micro_batches = iter(loader)
        self.trained.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=start,
            desc=f"epoch {epoch + 1}/{ft.epochs}",
            unit="step",
            disable=not self.progress,
            leave=False,
        )
        with bar:
            for step in range(start, self.steps_per_epoch):
                if stop_after_steps is not None and state["global_step"] >= stop_after_steps:
                    return False
                step_start = time.perf_counter()
                torch.manual_seed(derived_seed(ft.seed, epoch, step, self.dist.rank))
                sums = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, clips, failed clips
                for a in range(self.accumulation):
                    last = a == self.accumulation - 1
                    sync = (
                        contextlib.nullcontext()
                        if last or self.dist.world_size == 1
                        else self.trained.no_sync()
                    )
                    with sync:
                        sums += self.micro_step(next(micro_batches))
                if ft.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, ft.grad_clip)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.dist.sum(sums)
                state["global_step"] += 1
                state["step_in_epoch"] = step + 1
                state["epoch_sums"] = [state["epoch_sums"][i] + float(sums[i]) for i in range(3)]
                state["failed_train_clips"] += int(sums[3])
                state["train_seconds"] += time.perf_counter() - step_start
                loss = float(sums[0] / max(float(sums[2]), 1.0))
                self.step_rows.append(
                    {"step": state["global_step"], "epoch": epoch + 1, "lr": lr, "loss": loss}
                )
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                if ft.save_every_steps and state["global_step"] % ft.save_every_steps == 0:
                    self.save_point()
        return True

    def micro_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns (loss sum, correct, clips, failed clips).

        The loss is the summed cross-entropy over this rank's clips of the step (DDP averages over the
        ranks), so the step's gradient is that of the mean loss over the global batch. A micro-batch whose
        clips all failed to decode still runs (a zero clip, weight 0): every rank joins the gradient exchange.
        """
        plan = self.plan
        failed = len(batch["failed"])
        if failed:
            log.warning(
                "%d training clips failed to decode: %s", failed, [f["path"] for f in batch["failed"]]
            )
        video, labels, weight = batch["video"], batch["label"], 1.0
        if video is None:
            T, S = plan.data.num_frames, plan.crop_size
            video, labels, weight = (
                torch.zeros(1, 1, T, 3, S, S, dtype=torch.uint8),
                torch.zeros(1).long(),
                0.0,
            )
        video = video.to(self.device, non_blocking=True).squeeze(1)  # training items hold one view
        labels = labels.to(self.device)
        with autocast(self.device, self.autocast_dtype):
            logits = self.trained(normalise_video(video, self.mean, self.std))
        loss = F.cross_entropy(
            logits.float(), labels, label_smoothing=plan.recipe.label_smoothing, reduction="sum"
        )
        (loss * (weight / (self.micro * self.accumulation))).backward()
        correct = float((logits.argmax(dim=-1) == labels).sum()) * weight
        return torch.tensor(
            [loss.item() * weight, correct, len(labels) * weight, failed], dtype=torch.float64
        )

    def validate(self, train_seconds: float) -> None:
        """Scores the validation split, appends the epoch's curve row, saves ``best`` when it improved."""
        state, plan = self.state, self.plan
        epoch = state["epoch"]
        clock = time.perf_counter()
        probs, decoded = evaluate_clips(
            self.model,
            self.val_set,
            plan.train.num_classes,
            plan.recipe.eval_batch_size,
            self.device,
            self.autocast_dtype,
            self.dist,
            plan.recipe.num_workers,
            self.progress,
        )
        if not decoded.any():
            raise RuntimeError(f"validation split {plan.val.split!r}: no clip could be decoded")
        labels = np.array([r.label for r in plan.val.records])
        val = score_probs(probs[decoded], labels[decoded], plan.train.num_classes)
        val["failed_clips"] = int((~decoded).sum())
        loss_sum, correct, clips = state["epoch_sums"]
        row = {
            "epoch": epoch + 1,
            "lr": plan.recipe.lr * self.schedule(epoch * self.steps_per_epoch),
            "train_loss": loss_sum / max(clips, 1.0),
            "train_top1": correct / max(clips, 1.0),
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_mean_class_acc": val["mean_class_acc"],
            "seconds": train_seconds + time.perf_counter() - clock,
        }
        state["curve"].append(row)
        state.update(epoch=epoch + 1, step_in_epoch=0, epoch_sums=[0.0, 0.0, 0.0])
        if row["val_mean_class_acc"] > state["best_score"]:
            state.update(best_score=row["val_mean_class_acc"], best_epoch=epoch + 1, best_metrics=val)
            if self.dist.is_main:
                self.save_checkpoint(BEST_FILE, {"val_mean_class_acc": f"{val['mean_class_acc']:.6f}"})
        if self.progress:
            tqdm.write(
                f"epoch {epoch + 1}/{plan.recipe.epochs}: train loss {row['train_loss']:.4f}, val top-1 "
                f"{100 * row['val_top1']:.2f}%, mean class acc {100 * row['val_mean_class_acc']:.2f}%"
            )

    def save_checkpoint(self, name: str, extra: dict[str, str] | None = None) -> None:
        """Trainable parameters + resolved model config, with the step and epoch in the metadata."""
        meta = {
            "global_step": str(self.state["global_step"]),
            "epoch": str(self.state["epoch"]),
            **(extra or {}),
        }
        meta["class_names"] = json.dumps(self.plan.train.classes)
        save_trainable_checkpoint(self.model, self.checkpoint_cfg, self.out / name, meta)

    def save_point(self) -> None:
        """last.safetensors, steps.csv, then resume.pt (the commit): a run resumes from the last commit."""
        if self.dist.is_main:
            self.save_checkpoint(LAST_FILE)
            _write_steps(self.step_rows, self.out / STEPS_FILE)
            resume_state = {
                **self.state,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            save_resume_state(resume_state, self.out / RESUME_FILE)
        self.dist.barrier()

    def final_metrics(self) -> dict[str, Any]:
        """metrics.json: the best epoch's validation metrics and the run's facts."""
        state, plan = self.state, self.plan
        clips_trained = state["global_step"] * plan.recipe.batch_size
        return {
            "val": {k: v for k, v in state["best_metrics"].items() if k != "confusion"},
            "val_split": plan.val.split,
            "best_epoch": state["best_epoch"],
            "epochs_run": len(state["curve"]),
            "global_steps": state["global_step"],
            "steps_per_epoch": self.steps_per_epoch,
            "final_train_loss": state["curve"][-1]["train_loss"],
            "seconds": state["seconds"],
            "train_clips_per_second": clips_trained / state["train_seconds"]
            if state["train_seconds"]
            else 0.0,
            "trainable_parameters": sum(p.numel() for p in self.params),
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_kind": plan.model.kind,
            "world_size": self.dist.world_size,
            "global_batch": plan.recipe.batch_size,
            "micro_batch": self.micro,
            "accumulation": self.accumulation,
            "num_train_clips": len(plan.train.records),
            "num_val_clips": len(plan.val.records),
            "failed_train_clips": state["failed_train_clips"],
            "class_names": plan.train.classes,
            "device": str(self.device),
            "seed": plan.recipe.seed,
            "best_checkpoint": BEST_FILE,
        }


def finetune_from_args(
    dataset: str,
    root: str | Path,
    model_config: str | Path,
    out_dir: str | Path,
    *,
    protocol: str | None = None,
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """``plan_finetune`` then ``finetune``: what ``amflow finetune`` runs."""
    check_out_dir(out_dir)
    plan = plan_finetune(
        dataset, root, model_config, protocol=protocol, recipe=recipe or DEFAULT_RECIPE, overrides=overrides
    )
    return finetune(
        plan,
        out_dir,
        resume=resume,
        overwrite=overwrite,
        stop_after_steps=stop_after_steps,
        progress=progress,
    )
