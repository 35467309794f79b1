"""Temporal heads and the averaging classifier (paper 000, sec. 3.2; METHOD.md section 3).

Every head type is *grouped*: G independent heads (one per adapter or per AM-flow block) with their own
weights run as one batched computation on ``(B, G, T, F)`` inputs, so training 25 heads is one step,
not 25 Python loops. The same modules run inside the end-to-end model and in stage 2 on cached features.

A head type is one module (``lstm.py``, ``tcn.py``, ``transformer.py``) holding its config dataclass and
its layer; ``HEAD_TYPES`` below is the one place that lists them, chosen by the config's ``type``.
"""

from __future__ import annotations

from stage2_temporal.heads.base import BranchesConfig
from stage2_temporal.heads.classifier import AveragingClassifier, FlowMapEncoder, build_classifier
from stage2_temporal.heads.grouped import GroupedLayerNorm, GroupedLinear
from stage2_temporal.heads.head_types import (
    HEAD_TYPES,
    HeadsConfig,
    build_temporal_heads,
    drop_ignored_head_keys,
    ignored_head_keys,
)
from stage2_temporal.heads.lstm import LSTMHeads, LSTMHeadsConfig
from stage2_temporal.heads.tcn import TCNHeads, TCNHeadsConfig
from stage2_temporal.heads.transformer import TransformerHeads, TransformerHeadsConfig

__all__ = [
    "HEAD_TYPES",
    "AveragingClassifier",
    "BranchesConfig",
    "FlowMapEncoder",
    "GroupedLayerNorm",
    "GroupedLinear",
    "HeadsConfig",
    "LSTMHeads",
    "LSTMHeadsConfig",
    "TCNHeads",
    "TCNHeadsConfig",
    "TransformerHeads",
    "TransformerHeadsConfig",
    "build_classifier",
    "build_temporal_heads",
    "drop_ignored_head_keys",
    "ignored_head_keys",
]
