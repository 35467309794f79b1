"""The config fields every head type shares: depth, dropout, the AM-flow map heads and the other branches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class BranchesConfig:
    """Shared by every head type: the temporal heads' depth and dropout, AM-flow map heads, last frame.

    ``type`` names the head type; each head type's config (``lstm.py``, ``tcn.py``, ``transformer.py``)
    adds the keys only that type reads, so a key a type ignores is an error, not a silent no-op.
    """

    type: str = "lstm"
    layers: int = 3
    dropout: float = 0.0
    # AM-flow map heads (our addition): per flow block, maps pooled to a grid, a small encoder, a head.
    flow_maps: bool = False
    flow_grid: int = 8
    flow_embed: int = 128
    flow_hidden: int = 128  # width of the flow-map heads (LSTM/TCN hidden size; transformers use flow_embed)
    flow_layers: int = 1
    last_frame: bool = True
    combine: Literal["mean", "voting"] = "mean"

    def validate(self) -> None:
        if self.layers < 1:
            raise ValueError(f"heads.layers must be >= 1, got {self.layers}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"heads.dropout must be in [0, 1), got {self.dropout}")
        if self.flow_maps and min(self.flow_grid, self.flow_embed, self.flow_hidden, self.flow_layers) < 1:
            raise ValueError("heads.flow_grid, flow_embed, flow_hidden and flow_layers must be >= 1")
