"""The feature types stage 1 extracts: the registry (``FEATURE_TYPES``, one line per type).

What a type provides is ``base.FeatureExtractor``; each type is one module of this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from foundation.config import ConfigError
from stage1_extract.features.am_flow import AMFlowFeatures
from stage1_extract.features.base import FeatureExtractor, FeatureLayout
from stage1_extract.features.feature_diff import FeatureDifferenceControl
from stage1_extract.features.zeroi2v import ZeroI2VFeatures

# Feature type name -> its extractor class.
FEATURE_TYPES: dict[str, type[FeatureExtractor]] = {
    "am_flow": AMFlowFeatures,
    "feature_diff": FeatureDifferenceControl,
    "zeroi2v": ZeroI2VFeatures,
}

__all__ = [
    "FEATURE_TYPES",
    "FeatureExtractor",
    "FeatureLayout",
    "build_feature_extractor",
    "feature_type",
    "feature_type_name",
]


def feature_type_name(cfg: Any) -> str:
    """The feature type a model config (object or mapping) selects: an AM-flow config's ``maps``
    (``am_flow`` or the control ``feature_diff``); a config of another ``kind`` names its type by it."""
    get = cfg.get if isinstance(cfg, Mapping) else lambda key, default: getattr(cfg, key, default)
    kind = get("kind", "amflow")
    return get("maps", "am_flow") if kind == "amflow" else kind


def feature_type(cfg: Any) -> type[FeatureExtractor]:
    """The registered extractor class of a model config (an error naming the registered types)."""
    name = feature_type_name(cfg)
    if name not in FEATURE_TYPES:
        raise ConfigError(f"feature type {name!r} is not registered; known: {sorted(FEATURE_TYPES)}")
    return FEATURE_TYPES[name]


def build_feature_extractor(cfg: Any, checkpoint: str | None = None) -> FeatureExtractor:
    """The feature model of ``cfg`` (its registered type), in inference mode, with ``checkpoint`` if given."""
    return feature_type(cfg).build(cfg, checkpoint)
