"""The training config of stage 2: which cached branches to use, the heads, and the optimiser."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stage2_temporal.heads import HeadsConfig, LSTMHeadsConfig

# A selection of cached adapters or AM-flow blocks: "all", or a list of names (``block3.attn``,
# ``block12``) and/or 0-based positions in the store's ``adapter_names`` / ``flow_block_names``.
Selection = list[int | str] | Literal["all"]


@dataclass
class TrainConfig:
    """Temporal heads trained from cached features: heads, branch selection, AdamW + cosine schedule."""

    heads: HeadsConfig = field(default_factory=LSTMHeadsConfig)
    adapters: Selection = "all"  # [] = no adapter heads (e.g. flow-map heads or the last frame alone)
    flow_blocks: Selection = "all"  # blocks whose AM-flow maps feed the flow-map heads (heads.flow_maps)
    lr: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 30
    batch_size: int = 64
    warmup_epochs: float = 2.0  # linear warmup, then cosine decay to 0, updated every step
    label_smoothing: float = 0.0
    patience: int | None = 10  # early stopping: epochs without a better validation mean class accuracy
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto" (cuda when available)

    def validate(self) -> None:
        self.heads.validate()
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or null (no early stopping), got {self.patience}")
