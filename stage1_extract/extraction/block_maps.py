"""Per-block token maps in the layout the store keeps (``store.layout``): a ViT's blocks share one map
shape and stay stacked (B, F, T, h, N); the blocks of a hierarchical backbone (tokens and heads change
from stage to stage; ``ClipFeatures.flow`` is then a list, one (B, T, h_b, N_b) tensor per block) are
packed block after block along one axis (B, T, M), M = the sum of h_b x N_b."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_block_maps(flow: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``ClipFeatures.flow`` -> the store's layout: a stacked (B, F, T, h, N) tensor as it is, a list of
    per-block (B, T, h_b, N_b) maps packed into (B, T, M), each block's map flattened, in block order."""
    if isinstance(flow, torch.Tensor):
        return flow
    return torch.cat([m.flatten(2) for m in flow], dim=-1)
