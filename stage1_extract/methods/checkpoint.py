"""Trainable-only checkpoints: a ``.safetensors`` of what training changed, with the resolved config.

The frozen timm backbone is not stored: it comes back from ``backbone.weights`` (a local file, whose
SHA-256 the checkpoint records) or, for a random backbone, from the config's seed. Everything else the
model holds (trainable parameters, adapters, frozen random layers, buffers outside the backbone) is
stored under the model's own state-dict keys. Shared by ZeroI2V merging and end-to-end finetuning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from foundation.config import config_to_dict
from foundation.files import file_sha256
from foundation.formats import (  # the file formats are defined in one module; re-exported here
    CONFIG_KEY,
    FORMAT_KEY,
    TRAINABLE_FORMAT,
    WEIGHTS_SHA_KEY,
    CheckpointError,
    load_safetensors,
    read_metadata,
    write_safetensors,
)
from stage1_extract.families import is_backbone
from stage1_extract.families.backbone import ADDED_KEY_MARKERS


def _frozen_backbone_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the backbone model(s) inside ``model``: the weights a checkpoint leaves out."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if is_backbone(module):
            prefix = f"{name}." if name else ""
            keys |= {prefix + k for k in module.state_dict() if not any(m in k for m in ADDED_KEY_MARKERS)}
    return keys


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: trainable parameters and every entry that is not a frozen backbone weight."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen_backbone = _frozen_backbone_keys(model) - trainable
    return {k: v for k, v in model.state_dict().items() if k in trainable or k not in frozen_backbone}


def _config_text(cfg: Any) -> str:
    data = config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return yaml.safe_dump(data, sort_keys=False)


def save_trainable_checkpoint(
    model: nn.Module, cfg: Any, path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Saves ``trainable_state(model)`` with the resolved config ``cfg`` (a dataclass or mapping) as YAML.

    When the config names a backbone weights file, its SHA-256 is recorded so a later load can tell
    whether the frozen weights it is combined with are still the same.
    """
    meta = {FORMAT_KEY: TRAINABLE_FORMAT, CONFIG_KEY: _config_text(cfg), **(metadata or {})}
    weights = (yaml.safe_load(meta[CONFIG_KEY]).get("backbone") or {}).get("weights")
    if weights and Path(weights).is_file():
        meta[WEIGHTS_SHA_KEY] = file_sha256(weights)
    write_safetensors(trainable_state(model), path, meta)


def read_config(path: str | Path, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The config stored in a checkpoint's metadata (key ``config``), as a mapping."""
    meta = read_metadata(path) if metadata is None else metadata
    if CONFIG_KEY not in meta:
        raise CheckpointError(
            f"{path}: no '{CONFIG_KEY}' in the safetensors metadata (not an amflow checkpoint?)"
        )
    try:
        cfg = yaml.safe_load(meta[CONFIG_KEY])
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: metadata '{CONFIG_KEY}' is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: metadata '{CONFIG_KEY}' is not a mapping")
    return cfg


def load_trainable_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a checkpoint written by ``save_trainable_checkpoint``: (state, config mapping)."""
    meta = read_metadata(path)
    cfg = read_config(path, meta)
    return load_safetensors(path, meta), cfg


def check_backbone_weights(path: str | Path, cfg: Mapping[str, Any]) -> None:
    """Fails when the backbone weights file recorded in checkpoint ``path`` has changed since it was saved."""
    recorded = read_metadata(path).get(WEIGHTS_SHA_KEY)
    weights = (cfg.get("backbone") or {}).get("weights")
    if recorded and weights and Path(weights).is_file() and file_sha256(weights) != recorded:
        raise CheckpointError(
            f"{path}: backbone weights {weights} differ from those the checkpoint was trained on "
            f"(SHA-256 {recorded[:12]}...): the adapters would be combined with the wrong frozen weights"
        )


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Loads a trainable-only state into ``model``: every entry it should hold must be there, nothing else."""
    expected = set(trainable_state(model))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit {type(model).__name__}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(dict(state), strict=False)
    except RuntimeError as e:  # shapes that do not fit, e.g. another adapter ratio than the config's
        raise CheckpointError(f"{source}: does not fit {type(model).__name__}: {e}") from e
