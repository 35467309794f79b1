"""Planning a finetuning run: the recipe (``FinetuneConfig``), the three resolved configs and the two
splits' indexes (``plan_finetune``), and how a resumed run's configs are compared with the stored ones."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from foundation.config import (
    CONFIG_ROOT,
    ConfigError,
    config_to_dict,
    load_config,
    parse_overrides,
    route_overrides,
)
from stage1_extract.videos.clip_geometry import ClipGeometry
from stage1_extract.videos.datasets import (
    DatasetConfig,
    DatasetIndex,
    build_index,
    canonical_split,
    load_dataset_config,
)
from stage2_temporal.finetuning.augment import AugmentConfig
from stage2_temporal.finetuning.models import ModelConfig, load_model_config, model_config_class
from store.feature_store import MISSING, config_differences
from store.objects import is_url

log = logging.getLogger(__name__)

DEFAULT_RECIPE = CONFIG_ROOT / "finetune" / "default.yaml"
# Recipe keys that change how a run executes, not what it computes: they may differ on --resume.
RUNTIME_KEYS = ("num_workers", "eval_batch_size", "save_every_steps", "device")


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
    # Auxiliary alignment loss (our addition, not paper 000's; AM flow with aligning encoders only): this
    # weight times the mean squared distance of each aligned frame t+1 to frame t (normed patch tokens).
    aligner_loss_weight: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    gradient_checkpointing: bool = False  # recompute the transformer blocks in the backward pass
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast on CUDA; the CPU always computes in fp32
    val_split: str | None = None  # None = the dataset's val/validation split, else test (with a warning)
    eval_batch_size: int = 8  # clips per forward in validation (each with all its test views)
    num_workers: int = 4  # decoding processes per rank
    save_every_steps: int | None = None  # also write the resume state every N steps (always every epoch)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK when CUDA exists)
    seed: int = 0
    # A checkpoint of this model config (amflow's own, or `amflow convert`ed) to start a new run from.
    init_checkpoint: str | None = None

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
        if self.aligner_loss_weight < 0:
            raise ValueError(f"key 'aligner_loss_weight': expected >= 0, got {self.aligner_loss_weight}")
        if self.aligner_loss_weight and self.gradient_checkpointing:
            raise ValueError("key 'aligner_loss_weight': not with gradient_checkpointing (turn one off)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"key 'grad_clip': expected > 0 or null, got {self.grad_clip}")
        if self.num_workers < 0:
            raise ValueError(f"key 'num_workers': expected >= 0, got {self.num_workers}")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            raise ValueError(f"key 'save_every_steps': expected >= 1 or null, got {self.save_every_steps}")


@dataclass
class FinetunePlan:
    """Everything a run reads: resolved configs, the two splits' indexes, and where the videos are."""

    dataset: str
    root: Path | str  # a folder, or an s3:// URL (the videos and annotation files read from the bucket)
    model: ModelConfig
    data: Any  # stage1_extract.videos.datasets.DatasetConfig
    recipe: FinetuneConfig
    train: DatasetIndex
    val: DatasetIndex
    geometry: ClipGeometry  # frames, views, crop and classes of the clips, resolved once

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
    """Loads the three configs (overrides routed by ``route_overrides``: ``data.``, ``model.``, ``train.``
    or a bare key of one config) and indexes train and val splits.

    The clip geometry (``ClipGeometry.resolve``) reconciles frames and crop size; the class count is the
    dataset's (a ``num_classes`` override that differs from it is an error).
    """
    sections = {"data": DatasetConfig, "model": model_config_class(model_config), "train": FinetuneConfig}
    routed = route_overrides(overrides, sections)
    data_over = routed["data"] + ([f"protocol={protocol}"] if protocol is not None else [])
    data_cfg = load_dataset_config(dataset, data_over)
    ft = load_config(FinetuneConfig, recipe, routed["train"])
    model_cfg = load_model_config(model_config, routed["model"])
    geometry = ClipGeometry.resolve(data_cfg, model_cfg, str(model_config))
    if ft.aligner_loss_weight and not getattr(model_cfg, "aligning_encoder", False):
        raise ConfigError(
            f"{recipe}: aligner_loss_weight {ft.aligner_loss_weight} needs an AM-flow model with "
            "aligning_encoder: true"
        )
    root, name = (str(root) if is_url(root) else Path(root).resolve()), data_cfg.name
    train = build_index(name, root, "train", data_cfg)
    val = build_index(name, root, resolve_val_split(name, ft.val_split), data_cfg)
    for index in (train, val):
        log.info(index.summary())
        if not index.records:
            raise ConfigError(f"{name} split {index.split!r} under {root}: no clips found")
        if index.missing:
            log.warning("%s: %d listed videos are missing and left out", index.split, len(index.missing))
        if index.refused:
            log.warning("%s: %d listed paths leave the root: left out", index.split, len(index.refused))
    if train.classes != val.classes:
        raise ConfigError(f"{name}: train and {val.split} splits list different classes")
    asked = parse_overrides(routed["model"]).get("num_classes")
    if asked is not None and asked != train.num_classes:
        raise ConfigError(
            f"model.num_classes={asked} but {name} split {train.split!r} has {train.num_classes} classes "
            "(the class count comes from the dataset: leave num_classes out)"
        )
    if model_cfg.num_classes != train.num_classes:
        log.info(
            "num_classes=%d from %s (the model config has %d)", train.num_classes, name, model_cfg.num_classes
        )
        model_cfg = dataclasses.replace(model_cfg, num_classes=train.num_classes)
    geometry = dataclasses.replace(geometry, class_names=tuple(train.classes))
    return FinetunePlan(name, root, model_cfg, data_cfg, ft, train, val, geometry)


def run_config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: stored -> current`` per differing key of two resolved configs (recipe runtime keys ignored)."""
    ignored = {f"finetune.{k}" for k in RUNTIME_KEYS}
    return [
        f"{key}: {None if a is MISSING else a!r} -> {None if b is MISSING else b!r}"
        for key, a, b in config_differences(stored, current)
        if key not in ignored
    ]
