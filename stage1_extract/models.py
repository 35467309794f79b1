"""Reading a model YAML for stage 1: the AM-flow feature config, without stage 2's classifier keys."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stage1_extract.amflow_model import CLASSIFIER_KEYS, AMFlowConfig
from stage1_extract.config import ConfigError, build_config, deep_merge, parse_overrides, read_yaml


def feature_config_from_dict(data: dict[str, Any], source: str = "<config>") -> AMFlowConfig:
    """The feature part of an AM-flow model config (``kind: amflow``); the classifier's keys are skipped.

    A ZeroI2V config is refused: its features come from a merged checkpoint (``amflow merge``) passed
    with an AM-flow config of the same backbone.
    """
    kind = data.get("kind", "amflow")
    if kind != "amflow":
        raise ConfigError(
            f"{source}: extraction runs an AM-flow model (kind: amflow), got kind {kind!r}; for ZeroI2V, "
            "merge the checkpoint (amflow merge) and pass it with --checkpoint to an AM-flow config"
        )
    return build_config(AMFlowConfig, {k: v for k, v in data.items() if k not in CLASSIFIER_KEYS}, source)


def check_matches_dataset(
    cfg: Any, source: str | Path, num_frames: int, num_classes: int | None = None, data: str = ""
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


def load_feature_config(path: str | Path, overrides: Sequence[str] = ()) -> AMFlowConfig:
    """Reads an AM-flow model YAML's feature settings and applies ``key.sub=value`` overrides."""
    data = deep_merge(read_yaml(path), parse_overrides(overrides))
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return feature_config_from_dict(data, source)
