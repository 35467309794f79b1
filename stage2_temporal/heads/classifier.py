"""The averaging classifier (paper 000, sec. 3.2): every branch's logits averaged, or a frozen vote.

Branches: one temporal head per adapter sequence, optional AM-flow map heads (one per flow block), and a
linear classifier on the last frame's CLS. ``build_classifier`` reads a heads config and assembles them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from foundation.features import ClipFeatures
from stage2_temporal.heads.base import BranchesConfig
from stage2_temporal.heads.grouped import GroupedLayerNorm, GroupedLinear
from stage2_temporal.heads.head_types import build_temporal_heads
from store.layout import FlowBlock, flow_offsets


class FlowMapEncoder(nn.Module):
    """Per flow block: each token's flow summed over heads (as the ``flow`` pooling weighs tokens), the map
    pooled to a small grid and layer-normalised, then a 2-layer MLP.

    Summing over heads mattered: on the demo's motion-only clips (random-init ViT-Tiny, static camera) LSTM
    heads reading the h per-head maps stayed near chance (31%) while the head-summed maps reached 81%, and
    93% pooled to a 4x4 grid (the demo's ``flow_grid``; a 2x2 grid loses where things move). The
    layer norm makes the heads see where things move whatever the flow's overall scale (tiny for a
    random-init backbone, whose attention is nearly uniform).

    Blocks may differ in heads, tokens and grid (hierarchical backbones): each block's map is pooled to
    the same grid (the smallest block grid's side when that is below ``out_grid``).

    Args:
        blocks: per flow block G its map geometry (channels, tokens, prefix tokens, patch grid).
        out_grid: side of the pooled grid (at most each block's patch grid).
        embed: output features per frame.
    """

    def __init__(self, blocks: Sequence[FlowBlock], out_grid: int, embed: int) -> None:
        super().__init__()
        missing = [i for i, b in enumerate(blocks) if b.grid is None]
        if not blocks or missing:
            raise ValueError(
                f"flow-map heads need each flow block's patch grid; flow blocks {missing} have none"
            )
        self.blocks = list(blocks)
        self.uniform = len({b.map_shape for b in self.blocks}) == 1
        self.offsets = flow_offsets(self.blocks)
        self.out_grid = (
            min(out_grid, *(b.grid[0] for b in self.blocks)),
            min(out_grid, *(b.grid[1] for b in self.blocks)),
        )
        groups, in_dim = len(self.blocks), self.out_grid[0] * self.out_grid[1]
        self.norm = GroupedLayerNorm(groups, in_dim)
        self.fc1 = GroupedLinear(groups, in_dim, embed)
        self.fc2 = GroupedLinear(groups, embed, embed)

    def block_maps(self, maps: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """The maps -> per block (B, T, channels, tokens): ``maps`` is (B, G, T, h, N) when every block's
        map has one shape, packed (B, T, sum of channels x tokens) as the store keeps blocks of different
        shapes (``stage1_extract.extraction.block_maps``), or already one (B, T, h_b, N_b) tensor per
        block."""
        if isinstance(maps, list):
            return maps
        if self.uniform and maps.ndim == 5:
            return list(maps.unbind(dim=1))
        B, T = maps.shape[:2]
        return [
            maps[..., a:b].reshape(B, T, *blk.map_shape) for blk, (a, b) in zip(self.blocks, self.offsets)
        ]

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """maps (see ``block_maps``, prefix tokens included) -> (B, G, T, embed)."""
        pooled = []
        for blk, m in zip(self.blocks, self.block_maps(maps)):
            B, T = m.shape[:2]
            x = m[..., blk.prefix_tokens :].sum(dim=2).reshape(B * T, 1, *blk.grid)
            pooled.append(F.adaptive_avg_pool2d(x, self.out_grid).reshape(B, T, -1))
        x = torch.stack(pooled, dim=1)
        return self.fc2(F.relu(self.fc1(self.norm(x))))


class AveragingClassifier(nn.Module):
    """All branches -> logits averaged (or a frozen random voting layer): paper 000, sec. 3.2.

    Args:
        num_classes: logits per branch and of the clip.
        temporal_heads: grouped heads over the adapter embeddings (B, A, T, r) -> (B, A, C), or None.
        flow_encoder: ``FlowMapEncoder`` of the AM-flow maps, with ``flow_heads`` after it, or None.
        flow_heads: grouped heads over the encoded maps (B, F, T, e) -> (B, F, C), or None.
        last_frame_head: linear classifier of the last frame's CLS, or None.
        num_branches: total branch count K (A + F + 1 when all are on).
        combine: ``mean`` of the branch logits, or ``voting`` (a frozen random linear layer over them).
        seed: seeds the voting layer.
    """

    def __init__(
        self,
        num_classes: int,
        temporal_heads: nn.Module | None,
        flow_encoder: FlowMapEncoder | None,
        flow_heads: nn.Module | None,
        last_frame_head: nn.Linear | None,
        num_branches: int,
        combine: str = "mean",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_branches == 0:
            raise ValueError("the classifier has no branch: no adapters, no flow maps and no last-frame head")
        if (flow_encoder is None) != (flow_heads is None):
            raise ValueError("flow_encoder and flow_heads go together")
        self.num_branches = num_branches
        self.temporal_heads = temporal_heads
        self.flow_encoder = flow_encoder
        self.flow_heads = flow_heads
        self.last_frame_head = last_frame_head
        self.voting = None
        if combine == "voting":
            generator = torch.Generator().manual_seed(seed)
            self.voting = nn.Linear(num_branches * num_classes, num_classes)
            bound = 1.0 / math.sqrt(num_branches * num_classes)
            with torch.no_grad():
                self.voting.weight.uniform_(-bound, bound, generator=generator)
                self.voting.bias.uniform_(-bound, bound, generator=generator)
            self.voting.requires_grad_(False)

    def branch_logits(self, features: ClipFeatures) -> torch.Tensor:
        """Every branch's logits, stacked: (B, K, C) in the order adapters, flow blocks, last frame."""
        parts = []
        if self.temporal_heads is not None:
            parts.append(self.temporal_heads(features.embeddings))
        if self.flow_heads is not None:
            if features.flow is None:
                raise ValueError("heads.flow_maps is on but these features carry no AM-flow maps")
            parts.append(self.flow_heads(self.flow_encoder(features.flow)))
        if self.last_frame_head is not None:
            parts.append(self.last_frame_head(features.cls).unsqueeze(1))
        return torch.cat(parts, dim=1)

    def forward(self, features: ClipFeatures) -> torch.Tensor:
        """Clip logits (B, C): the mean of the branch logits, or the voting layer over them."""
        logits = self.branch_logits(features)
        if self.voting is not None:
            return self.voting(logits.flatten(1))
        return logits.mean(dim=1)


def build_classifier(
    cfg: BranchesConfig,
    num_classes: int,
    num_adapters: int,
    embed_dim: int,
    cls_dim: int,
    flow_blocks: Sequence[FlowBlock] = (),
    seed: int = 0,
) -> AveragingClassifier:
    """The averaging classifier a heads config describes, for features of the given shapes
    (``flow_blocks``: the map geometry of each flow block the features hold).

    Layers are created in a fixed order (temporal heads, flow encoder, flow heads, last frame) from the
    current RNG state, so a seeded caller gets the same weights every time.
    """
    temporal = build_temporal_heads(cfg, num_adapters, embed_dim, num_classes) if num_adapters else None
    encoder = flow_heads = None
    if cfg.flow_maps:
        if not flow_blocks:
            raise ValueError("heads.flow_maps is on but the features hold no AM-flow maps")
        encoder = FlowMapEncoder(flow_blocks, cfg.flow_grid, cfg.flow_embed)
        flow_heads = build_temporal_heads(
            cfg, len(flow_blocks), cfg.flow_embed, num_classes, cfg.flow_hidden, cfg.flow_layers
        )
    last = nn.Linear(cls_dim, num_classes) if cfg.last_frame else None
    branches = num_adapters * (temporal is not None) + len(flow_blocks) * cfg.flow_maps + int(cfg.last_frame)
    return AveragingClassifier(num_classes, temporal, encoder, flow_heads, last, branches, cfg.combine, seed)
