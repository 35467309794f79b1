"""Per-block token maps of a clip in the layout the store keeps (``store.layout``): stacked when every
block's map has one shape, else packed block after block (hierarchical backbones change tokens and
heads from stage to stage)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stack_block_maps(maps: Sequence[torch.Tensor], clips: int, frames: int) -> torch.Tensor:
    """Per block (clips*frames, channels_b, tokens_b), frames of a clip contiguous -> (clips, blocks,
    frames, channels, tokens) when every block's map has one shape, else packed (clips, frames, M) with
    each block's map flattened in block order (M = sum of channels_b x tokens_b)."""
    if len({tuple(m.shape[1:]) for m in maps}) == 1:
        return (
            torch.stack(list(maps), dim=1)
            .reshape(clips, frames, len(maps), *maps[0].shape[1:])
            .transpose(1, 2)
        )
    return torch.cat([m.reshape(clips, frames, -1) for m in maps], dim=-1)
