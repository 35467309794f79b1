"""Grouped TCN heads: 1x1 projection, residual dilated temporal convolutions, mean over time -> logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stage2_temporal.heads.base import BranchesConfig
from stage2_temporal.heads.grouped import GroupedLinear


@dataclass
class TCNHeadsConfig(BranchesConfig):
    """TCN heads: width ``hidden``, ``layers`` residual convolutions of ``kernel`` taps (dilation doubles)."""

    type: Literal["tcn"] = "tcn"
    hidden: int = 768
    kernel: int = 3

    def validate(self) -> None:
        super().validate()
        if self.hidden < 1 or self.kernel < 1:
            raise ValueError(f"heads.hidden and heads.kernel must be >= 1, got {self.hidden}, {self.kernel}")


class TCNHeads(nn.Module):
    """G temporal convolution stacks: 1x1 projection, residual dilated convs, mean over time -> logits.

    Args:
        groups: number of independent heads G.
        in_dim: input features per frame.
        hidden: channels of every convolution.
        layers: residual convolutions; layer i has dilation 2**i and "same" padding in time.
        num_classes: logits per head.
        kernel: taps per convolution.
        dropout: after every convolution (training only).
    """

    def __init__(
        self,
        groups: int,
        in_dim: int,
        hidden: int,
        layers: int,
        num_classes: int,
        kernel: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.input_proj = GroupedLinear(groups, in_dim, hidden)
        self.convs = nn.ModuleList([GroupedLinear(groups, kernel * hidden, hidden) for _ in range(layers)])
        self.dropout = nn.Dropout(dropout)
        self.classifier = GroupedLinear(groups, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, G, T, in) -> logits (B, G, C)."""
        x = self.input_proj(x)
        T = x.shape[2]
        for layer, conv in enumerate(self.convs):
            dilation = 2**layer
            pad = dilation * (self.kernel - 1) // 2
            xp = F.pad(x, (0, 0, pad, dilation * (self.kernel - 1) - pad))  # "same" padding in time
            taps = torch.cat([xp[:, :, j * dilation : j * dilation + T] for j in range(self.kernel)], dim=-1)
            x = x + self.dropout(F.relu(conv(taps)))
        return self.classifier(x.mean(dim=2))

    @classmethod
    def from_config(
        cls, cfg: TCNHeadsConfig, groups: int, in_dim: int, num_classes: int, hidden: int, layers: int
    ) -> TCNHeads:
        return cls(groups, in_dim, hidden, layers, num_classes, cfg.kernel, cfg.dropout)
