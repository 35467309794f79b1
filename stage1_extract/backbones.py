"""The backbone seam: what AM flow and STDHA need from an image backbone, and timm's ViT providing it.

AM flow (paper 000) and STDHA (paper 002) touch a backbone in a few places only. ``BackboneFamily``
names them; ``TimmViT`` is the first family. A new family (a Hiera- or Swin-style model) is one new
module with a class that provides every method of ``BackboneFamily``, registered in ``FAMILIES``; the
AM-flow block, STDHA, extraction and the pictures then run on it unchanged:

- ``embed``: frames (B·T, 3, H, W) -> tokens (B·T, N, D) before the first block (patches, prefix tokens,
  position embeddings, then ``extra``, e.g. ZeroI2V's temporal embedding, then any pre-norm);
- ``blocks``: the ``nn.ModuleList`` of transformer blocks, each replaceable in place by index;
- ``wrappable``: whether a block has the pre-norm layout an ``AMFlowBlock`` takes over (``norm1``,
  ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``);
- ``attention``: the attention class whose q, k, v ``stage1_extract.attention`` splits out
  (``project_qkv`` / ``attend``) and STDHA subclasses;
- ``final_norm``: tokens after the last block -> the normed tokens whose CLS is cached;
- ``num_prefix_tokens``, ``patch_grid``, ``embed_dim``, ``input_size``: token layout, width, frame size;
- ``pixel_stats``: the input normalisation (mean, std) the weights were trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


class BackboneFamily(Protocol):
    """What AM flow and STDHA use of a backbone model (see the module docstring); one class a family."""

    model_class: type[nn.Module]
    attention: type[nn.Module]

    @classmethod
    def matches(cls, model: nn.Module) -> bool: ...

    @staticmethod
    def embed(
        model: nn.Module, frames: torch.Tensor, extra: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor: ...

    @staticmethod
    def blocks(model: nn.Module) -> nn.ModuleList: ...

    @staticmethod
    def wrappable(block: nn.Module) -> bool: ...

    @staticmethod
    def final_norm(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor: ...

    @staticmethod
    def num_prefix_tokens(model: nn.Module) -> int: ...

    @staticmethod
    def patch_grid(model: nn.Module) -> tuple[int, int]: ...

    @staticmethod
    def embed_dim(model: nn.Module) -> int: ...

    @staticmethod
    def input_size(model: nn.Module) -> tuple[int, int]: ...

    @staticmethod
    def pixel_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]: ...


class TimmViT:
    """timm's ``VisionTransformer`` (DINOv2, CLIP, AugReg, ... by name): the first backbone family."""

    model_class = VisionTransformer
    attention = Attention

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


# The backbone families amflow runs on, tried in order.
FAMILIES: list[BackboneFamily] = [TimmViT]


def family_of(model: nn.Module) -> BackboneFamily:
    """The family that provides ``model`` (an error naming the model's class when none does)."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    names = ", ".join(f.model_class.__name__ for f in FAMILIES)
    raise ValueError(f"backbone {type(model).__name__} is not supported: amflow runs on {names}")
