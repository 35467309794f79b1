"""The stage 1 -> stage 2 contract: what stage 1 computes per clip and stage 2 reads back."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClipFeatures:
    """What stage 1 computes per clip and stage 2 reads back from the cache.

    ``embeddings``: (B, A, T, r) pooled adapter embeddings E; ``flow``: (B, F, T, h, N) AM-flow maps of
    the flow blocks (all N tokens, prefix tokens first, patches row-major) or None; ``cls``: (B, D) the
    last frame's pooled final feature (the normed CLS of a ViT; ``families`` ``pooled``).

    Blocks of a hierarchical backbone (Hiera) differ in heads and tokens: when the flow blocks' maps
    differ in shape, ``flow`` is a list with one (B, T, h_b, N_b) tensor per flow block instead.
    """

    embeddings: torch.Tensor
    cls: torch.Tensor
    flow: torch.Tensor | list[torch.Tensor] | None = None

    def block_flow(self, position: int) -> torch.Tensor:
        """The maps (B, T, h, N) of flow block ``position`` (of ``flow_block_names``), in either layout."""
        if self.flow is None:
            raise ValueError("these features carry no AM-flow maps")
        return self.flow[position] if isinstance(self.flow, list) else self.flow[:, position]
