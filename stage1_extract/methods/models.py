"""Reading a model YAML for stage 1: the settings of its feature type (``stage1_extract.features``).

A model YAML may hold more than stage 1 reads (an end-to-end config adds its classifier's keys); stage 1
takes the fields of its feature type's config and leaves the rest to the stage that owns them, without
naming them. A key that is none of its fields but close to one (a typo) is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foundation.config import ConfigError, build_config, deep_merge, parse_overrides, read_yaml
from stage1_extract.features import FEATURE_TYPES, feature_type_name


def feature_config_from_dict(data: dict[str, Any], source: str = "<config>") -> Any:
    """The feature part of a model config: the config of the feature type it selects (``maps`` of an
    AM-flow config, ``kind`` otherwise, e.g. ``zeroi2v``)."""
    name = feature_type_name(data)
    if name not in FEATURE_TYPES:
        raise ConfigError(
            f"{source}: kind {data.get('kind', 'amflow')!r} selects feature type {name!r}, which stage 1 "
            f"cannot extract; known types: {sorted(FEATURE_TYPES)}"
        )
    config_class = FEATURE_TYPES[name].config_class
    own = {f.name for f in dataclasses.fields(config_class)}
    for key in data:
        close = difflib.get_close_matches(key, own, n=1, cutoff=0.8) if key not in own else []
        if close:
            raise ConfigError(f"{source}: unknown key {key!r}; did you mean {close[0]!r}?")
    return build_config(config_class, {k: v for k, v in data.items() if k in own}, source)


def feature_config_class(path: str | Path) -> type:
    """The config class of the feature type a model YAML selects (for routing overrides before loading)."""
    name = feature_type_name(read_yaml(path))
    if name not in FEATURE_TYPES:
        raise ConfigError(f"{path}: feature type {name!r} is not registered; known: {sorted(FEATURE_TYPES)}")
    return FEATURE_TYPES[name].config_class


def load_feature_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Reads a model YAML's feature settings and applies ``key.sub=value`` overrides."""
    data = deep_merge(read_yaml(path), parse_overrides(overrides))
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return feature_config_from_dict(data, source)
