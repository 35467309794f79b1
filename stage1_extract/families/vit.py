"""timm's ``VisionTransformer`` as a backbone family (DINOv2, CLIP, AugReg, ... by name)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import Attention
from timm.models import checkpoint_seq
from timm.models import vision_transformer as timm_vit
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from stage1_extract.families.attention import TimmAttentionSplit
from stage1_extract.families.base import BlockGeometry
from stage1_extract.methods.stdha import STDHAttention

StateDict = dict[str, torch.Tensor]


class TimmViT:
    """timm's ``VisionTransformer`` (DINOv2, CLIP, AugReg, ... by name): the first backbone family."""

    model_class = VisionTransformer
    attention = Attention
    split = TimmAttentionSplit

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_class)

    @staticmethod
    def embed(
        model: VisionTransformer,
        frames: torch.Tensor,
        extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = model._pos_embed(model.patch_embed(frames))
        if extra is not None:
            x = extra(x)
        return model.norm_pre(model.patch_drop(x))

    @staticmethod
    def blocks(model: VisionTransformer) -> nn.ModuleList:
        return model.blocks

    @staticmethod
    def stages(model: VisionTransformer) -> list[list[int]]:
        return [list(range(len(model.blocks)))]

    @staticmethod
    def forward_blocks(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
        if model.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(model.blocks, tokens)
        return model.blocks(tokens)

    @staticmethod
    def stdha(block: nn.Module, num_frames: int, head_offsets: list[int]) -> nn.Module:
        return STDHAttention.from_attention(block.attn, num_frames, head_offsets)

    @staticmethod
    def wrappable(block: nn.Module) -> bool:
        return type(block) is Block

    @staticmethod
    def final_norm(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
        return model.norm(tokens)

    @staticmethod
    def num_prefix_tokens(model: VisionTransformer) -> int:
        return model.num_prefix_tokens

    @staticmethod
    def patch_grid(model: VisionTransformer) -> tuple[int, int]:
        return tuple(model.patch_embed.grid_size)

    @staticmethod
    def embed_dim(model: VisionTransformer) -> int:
        return model.embed_dim

    @staticmethod
    def input_size(model: VisionTransformer) -> tuple[int, int]:
        return tuple(int(s) for s in model.patch_embed.img_size)

    @staticmethod
    def pixel_stats(model: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = model.pretrained_cfg
        return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    @staticmethod
    def checkpoint_filter(state: StateDict, model: VisionTransformer) -> StateDict:
        return timm_vit.checkpoint_filter_fn(state, model)

    @staticmethod
    def block_geometry(model: VisionTransformer) -> list[BlockGeometry]:
        grid = tuple(model.patch_embed.grid_size)
        return [
            BlockGeometry(grid, b.attn.num_heads, model.embed_dim, model.num_prefix_tokens)
            for b in model.blocks
        ]

    @staticmethod
    def pooled(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
        return model.forward_head(tokens, pre_logits=True)

    @staticmethod
    def grid_positions(model: VisionTransformer, index: int) -> None:
        """Tokens are in row-major order already (prefix tokens first)."""
        return None
