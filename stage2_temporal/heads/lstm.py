"""Grouped LSTM heads (paper 000, sec. 3.2): G stacked LSTMs, last hidden state -> logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from stage2_temporal.heads.base import BranchesConfig
from stage2_temporal.heads.grouped import GroupedLinear


@dataclass
class LSTMHeadsConfig(BranchesConfig):
    """LSTM heads: ``layers`` stacked LSTMs of size ``hidden`` per sequence."""

    type: Literal["lstm"] = "lstm"
    hidden: int = 768

    def validate(self) -> None:
        super().validate()
        if self.hidden < 1:
            raise ValueError(f"heads.hidden must be >= 1, got {self.hidden}")


class LSTMHeads(nn.Module):
    """G stacked LSTMs (``nn.LSTM``'s equations and parameter count), last hidden state -> C logits.

    Args:
        groups: number of independent heads G (one per adapter sequence or flow block).
        in_dim: input features per frame.
        hidden: LSTM hidden size.
        layers: stacked LSTM layers.
        num_classes: logits per head.
        dropout: between layers and before the classifier (training only).
    """

    def __init__(
        self, groups: int, in_dim: int, hidden: int, layers: int, num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.input_proj = nn.ModuleList(
            [GroupedLinear(groups, in_dim if i == 0 else hidden, 4 * hidden) for i in range(layers)]
        )
        self.recurrent = nn.ModuleList([GroupedLinear(groups, hidden, 4 * hidden) for _ in range(layers)])
        for lin in (*self.input_proj, *self.recurrent):  # nn.LSTM initialises all with 1/sqrt(hidden)
            nn.init.uniform_(lin.weight, -(hidden**-0.5), hidden**-0.5)
            nn.init.uniform_(lin.bias, -(hidden**-0.5), hidden**-0.5)
        self.dropout = nn.Dropout(dropout)
        self.classifier = GroupedLinear(groups, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, G, T, in) -> logits (B, G, C)."""
        B, G, T, _ = x.shape
        for layer, (inp, rec) in enumerate(zip(self.input_proj, self.recurrent)):
            if layer > 0:
                x = self.dropout(x)
            gates_in = inp(x)  # all time steps at once: (B, G, T, 4H)
            h = x.new_zeros(B, G, self.hidden)
            c = x.new_zeros(B, G, self.hidden)
            outputs = []
            for t in range(T):
                i, f, g, o = (gates_in[:, :, t] + rec(h)).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=2)
        return self.classifier(self.dropout(h))

    @classmethod
    def from_config(
        cls, cfg: LSTMHeadsConfig, groups: int, in_dim: int, num_classes: int, hidden: int, layers: int
    ) -> LSTMHeads:
        return cls(groups, in_dim, hidden, layers, num_classes, cfg.dropout)
