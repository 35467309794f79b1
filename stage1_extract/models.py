"""One entry point for every model config: ``kind: amflow`` or ``kind: zeroi2v``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stage1_extract.amflow_model import AMFlowConfig, AMFlowModel, build_amflow
from stage1_extract.config import ConfigError, build_config, deep_merge, parse_overrides, read_yaml
from stage1_extract.zeroi2v import ZeroI2VConfig, ZeroI2VModel, build_zeroi2v

ModelConfig = AMFlowConfig | ZeroI2VConfig
MODEL_KINDS: dict[str, type] = {"amflow": AMFlowConfig, "zeroi2v": ZeroI2VConfig}


def model_config_from_dict(data: dict[str, Any], source: str = "<config>") -> ModelConfig:
    """Builds the config class named by ``kind`` (default ``amflow``) from a mapping."""
    kind = data.get("kind", "amflow")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"{source}: key 'kind': expected one of {sorted(MODEL_KINDS)}, got {kind!r}")
    return build_config(MODEL_KINDS[kind], data, source)


def model_config_class(path: str | Path) -> type:
    """The config class a model YAML's ``kind`` names (for routing overrides before loading it)."""
    kind = read_yaml(path).get("kind", "amflow")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"{path}: key 'kind': expected one of {sorted(MODEL_KINDS)}, got {kind!r}")
    return MODEL_KINDS[kind]


def check_matches_dataset(
    cfg: ModelConfig, source: str | Path, num_frames: int, num_classes: int | None = None, data: str = ""
) -> None:
    """A model config must describe the clips it is fed: a differing frame or class count is an error
    naming both values and the override that fixes it (never silently replaced)."""
    data = data or "the dataset"
    if cfg.num_frames != num_frames:
        raise ConfigError(
            f"{source}: num_frames={cfg.num_frames} but {data} samples num_frames={num_frames}; make them "
            f"agree with num_frames={num_frames} (sets both), model.num_frames={num_frames} or "
            f"data.num_frames={cfg.num_frames}"
        )
    if num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(
            f"{source}: num_classes={cfg.num_classes} but {data} has {num_classes} classes; "
            f"set model.num_classes={num_classes}"
        )


def load_model_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """Reads a model YAML (any kind) and applies ``key.sub=value`` overrides."""
    data = deep_merge(read_yaml(path), parse_overrides(overrides))
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return model_config_from_dict(data, source)


def build_model(cfg: ModelConfig) -> AMFlowModel | ZeroI2VModel:
    """Builds the model a config describes."""
    if isinstance(cfg, ZeroI2VConfig):
        return build_zeroi2v(cfg)
    return build_amflow(cfg)


def count_parameters(params: Iterable[nn.Parameter]) -> tuple[int, int]:
    """(total, trainable) element counts, each parameter tensor counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in params}
    total = sum(p.numel() for p in seen.values())
    return total, sum(p.numel() for p in seen.values() if p.requires_grad)


def parameter_report(model: AMFlowModel | ZeroI2VModel) -> dict[str, Any]:
    """``{"components": {name: {"total", "trainable"}}, "total", "trainable"}`` per ``model.components()``."""
    components = {}
    for name, params in model.components().items():
        total, trainable = count_parameters(params)
        components[name] = {"total": total, "trainable": trainable}
    total, trainable = count_parameters(model.parameters())
    return {"components": components, "total": total, "trainable": trainable}


def build_model_on_meta(cfg: ModelConfig) -> AMFlowModel | ZeroI2VModel:
    """Builds the model without allocating its weights (for counting parameters of paper-size configs)."""
    with torch.device("meta"):
        return build_model(cfg)
