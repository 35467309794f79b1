"""Grouped transformer heads: pre-norm encoders over [CLS; frames] with a temporal position embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stage2_temporal.heads.base import BranchesConfig
from stage2_temporal.heads.grouped import GroupedLayerNorm, GroupedLinear


@dataclass
class TransformerHeadsConfig(BranchesConfig):
    """Transformer heads at the input width: ``attn_heads``, feed-forward ``ff_dim``, up to ``max_frames``."""

    type: Literal["transformer"] = "transformer"
    attn_heads: int = 8
    ff_dim: int = 1280
    max_frames: int = 64

    def validate(self) -> None:
        super().validate()
        for key in ("attn_heads", "ff_dim", "max_frames"):
            if getattr(self, key) < 1:
                raise ValueError(f"heads.{key} must be >= 1, got {getattr(self, key)}")


class TransformerHeads(nn.Module):
    """G pre-norm transformer encoders over [CLS; frames] with a temporal position embedding.

    Each layer computes what ``nn.TransformerEncoderLayer(norm_first=True, activation="gelu")`` computes.

    Args:
        groups: number of independent heads G.
        dim: input and model width.
        layers: encoder layers.
        num_classes: logits per head.
        attn_heads: attention heads (must divide ``dim``).
        ff_dim: feed-forward width.
        max_frames: length of the temporal position embedding.
        dropout: on attention and residual branches (training only).
    """

    def __init__(
        self,
        groups: int,
        dim: int,
        layers: int,
        num_classes: int,
        attn_heads: int = 8,
        ff_dim: int = 1280,
        max_frames: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % attn_heads:
            raise ValueError(f"heads.attn_heads={attn_heads} must divide the input size {dim}")
        self.attn_heads = attn_heads
        self.cls_token = nn.Parameter(torch.zeros(groups, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(groups, max_frames + 1, dim) * 0.02)
        self.norm1 = nn.ModuleList([GroupedLayerNorm(groups, dim) for _ in range(layers)])
        self.qkv = nn.ModuleList([GroupedLinear(groups, dim, 3 * dim) for _ in range(layers)])
        self.proj = nn.ModuleList([GroupedLinear(groups, dim, dim) for _ in range(layers)])
        self.norm2 = nn.ModuleList([GroupedLayerNorm(groups, dim) for _ in range(layers)])
        self.fc1 = nn.ModuleList([GroupedLinear(groups, dim, ff_dim) for _ in range(layers)])
        self.fc2 = nn.ModuleList([GroupedLinear(groups, ff_dim, dim) for _ in range(layers)])
        self.norm = GroupedLayerNorm(groups, dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = GroupedLinear(groups, dim, num_classes)

    def no_weight_decay(self) -> set[str]:
        """Trained without weight decay (timm's convention): the class token and the time positions."""
        return {"cls_token", "pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, G, T, dim) -> logits (B, G, C)."""
        B, G, T, D = x.shape
        if self.pos_embed.shape[1] < T + 1:
            raise ValueError(f"{T} frames exceed heads.max_frames={self.pos_embed.shape[1] - 1}")
        x = torch.cat([self.cls_token.unsqueeze(0).expand(B, -1, -1, -1), x], dim=2)
        x = x + self.pos_embed[None, :, : T + 1]
        h, d = self.attn_heads, D // self.attn_heads
        for norm1, qkv, proj, norm2, fc1, fc2 in zip(
            self.norm1, self.qkv, self.proj, self.norm2, self.fc1, self.fc2
        ):
            q, k, v = qkv(norm1(x)).reshape(B * G, T + 1, 3, h, d).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout.p if self.training else 0.0)
            x = x + self.dropout(proj(a.transpose(1, 2).reshape(B, G, T + 1, D)))
            x = x + self.dropout(fc2(F.gelu(fc1(norm2(x)))))
        return self.classifier(self.norm(x[:, :, 0]))

    @classmethod
    def from_config(
        cls, cfg: TransformerHeadsConfig, groups: int, in_dim: int, num_classes: int, hidden: int, layers: int
    ) -> TransformerHeads:
        """``hidden`` is unused: a transformer head keeps its input width."""
        return cls(
            groups, in_dim, layers, num_classes, cfg.attn_heads, cfg.ff_dim, cfg.max_frames, cfg.dropout
        )
