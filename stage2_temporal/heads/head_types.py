"""The head types, chosen by a config's ``type``: ``HEAD_TYPES`` is the one place that lists them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from stage2_temporal.heads.base import BranchesConfig
from stage2_temporal.heads.lstm import LSTMHeads, LSTMHeadsConfig
from stage2_temporal.heads.tcn import TCNHeads, TCNHeadsConfig
from stage2_temporal.heads.transformer import TransformerHeads, TransformerHeadsConfig

# head type -> (its config, its grouped layer)
HEAD_TYPES: dict[str, tuple[type[BranchesConfig], type[nn.Module]]] = {
    "lstm": (LSTMHeadsConfig, LSTMHeads),
    "tcn": (TCNHeadsConfig, TCNHeads),
    "transformer": (TransformerHeadsConfig, TransformerHeads),
}

# Any head type's config; the config loader picks the class by its ``type`` key (lstm by default).
HeadsConfig = LSTMHeadsConfig | TCNHeadsConfig | TransformerHeadsConfig


def build_temporal_heads(
    cfg: BranchesConfig,
    groups: int,
    in_dim: int,
    num_classes: int,
    hidden: int | None = None,
    layers: int | None = None,
) -> nn.Module:
    """The ``cfg.type`` heads for ``groups`` sequences of ``in_dim`` features (sizes overridable)."""
    if cfg.type not in HEAD_TYPES:
        raise ValueError(f"heads.type: expected one of {sorted(HEAD_TYPES)}, got {cfg.type!r}")
    layer = HEAD_TYPES[cfg.type][1]
    hidden = getattr(cfg, "hidden", in_dim) if hidden is None else hidden
    layers = cfg.layers if layers is None else layers
    return layer.from_config(cfg, groups, in_dim, num_classes, hidden, layers)


def ignored_head_keys(heads: Mapping[str, Any]) -> list[str]:
    """Keys of a ``heads`` mapping that its head type does not read (they belong to other types)."""
    cls = HEAD_TYPES.get(heads.get("type", "lstm"), (LSTMHeadsConfig,))[0]
    known = {f.name for f in dataclasses.fields(cls)}
    every = {f.name for c, _ in HEAD_TYPES.values() for f in dataclasses.fields(c)}
    return sorted(k for k in heads if k not in known and k in every)


def drop_ignored_head_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with its ``heads`` section cut to the keys its type reads.

    Configs written before head types had their own configs held every type's keys; this reads them.
    """
    out = dict(data)
    heads = out.get("heads")
    if isinstance(heads, Mapping):
        drop = set(ignored_head_keys(heads))
        out["heads"] = {k: v for k, v in heads.items() if k not in drop}
    return out
