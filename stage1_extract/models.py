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


def load_feature_config(path: str | Path, overrides: Sequence[str] = ()) -> AMFlowConfig:
    """Reads an AM-flow model YAML's feature settings and applies ``key.sub=value`` overrides."""
    data = deep_merge(read_yaml(path), parse_overrides(overrides))
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return feature_config_from_dict(data, source)
