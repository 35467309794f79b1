"""timm's ``Hiera`` as a backbone family (``hiera_tiny_224`` ... ``hiera_huge_224``, MAE or IN-1k weights).

Hiera is hierarchical: each stage's first block pools its queries (fewer tokens out than in) and widens
the tokens; the first stages attend inside mask units (local windows), the last ones globally. Its blocks
see their tokens "unrolled" (timm's ``Unroll``: a mask unit's tokens are strided through the sequence),
so ``grid_positions`` maps them back to the row-major grid. Hiera has no CLS token: a frame's feature is
timm's own head pooling, the token mean then the head's norm (``pooled``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from timm.models.hiera import Hiera, HieraBlock, MaskUnitAttention, checkpoint_filter_fn
from torch import nn

from stage1_extract.families.attention import attention_probs
from stage1_extract.families.base import BlockGeometry


class MaskUnitAttentionSplit:
    """timm's ``MaskUnitAttention`` in steps (``families.base.AttentionSplit``): q, k, v per mask unit
    (B, h, windows, n, d) where attention is local, (B, h, N, d) where it is global."""

    @staticmethod
    def project_qkv(
        attn: MaskUnitAttention, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (pooled with ``q_stride`` as timm pools it), k, v of ``x`` (B, N, D_in)."""
        B, N, _ = x.shape
        if attn.use_mask_unit_attn:
            windows = N // (attn.q_stride * attn.window_size)
            qkv = attn.qkv(x).reshape(B, -1, windows, 3, attn.heads, attn.head_dim).permute(3, 0, 4, 2, 1, 5)
            q, k, v = qkv.unbind(0)
            if attn.q_stride > 1:
                q = q.view(B, attn.heads, windows, attn.q_stride, -1, attn.head_dim).amax(dim=3)
            return q, k, v
        qkv = attn.qkv(x).reshape(B, N, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if attn.q_stride > 1:
            q = q.view(B, attn.heads, attn.q_stride, -1, attn.head_dim).amax(dim=2)
        return q.contiguous(), k.contiguous(), v.contiguous()  # as timm: lets SDPA pick its fast kernel

    @staticmethod
    def attend(
        attn: MaskUnitAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        probs: torch.Tensor | None = None,
        gate_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output (B, N, D_out) from q, k, v, then timm's projection; ``probs`` reused if given."""
        B = q.shape[0]
        if probs is not None:
            x = probs @ v
        elif attn.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = attention_probs(attn, q, k) @ v
        x = x.transpose(1, 3) if attn.use_mask_unit_attn else x.transpose(1, 2)
        return attn.proj(x.reshape(B, -1, attn.dim_out))

    @staticmethod
    def to_tokens(attn: MaskUnitAttention, values: torch.Tensor) -> torch.Tensor:
        """Per-key values (B, h, windows, n) -> (B, h, N): token ``j * windows + w`` is key j of window w."""
        if not attn.use_mask_unit_attn:
            return values
        return values.transpose(2, 3).flatten(2)


class TimmHiera:
    """timm's ``Hiera`` (image models, 2-D patches): a hierarchical family without CLS token."""

    model_class = Hiera
    attention = MaskUnitAttention
    split = MaskUnitAttentionSplit

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_class)

    @staticmethod
    def embed(
        model: Hiera, frames: torch.Tensor, extra: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = model._pos_embed(model.patch_embed(frames))
        if extra is not None:
            x = extra(x)
        return model.unroll(x)

    @staticmethod
    def blocks(model: Hiera) -> nn.ModuleList:
        return model.blocks

    @staticmethod
    def stages(model: Hiera) -> list[list[int]]:
        """Block indices per stage (timm's ``stage_ends``: the last block of each stage)."""
        starts = [0, *(end + 1 for end in model.stage_ends[:-1])]
        return [list(range(a, end + 1)) for a, end in zip(starts, model.stage_ends)]

    @staticmethod
    def forward_blocks(model: Hiera, tokens: torch.Tensor) -> torch.Tensor:
        """The blocks in order, as timm's ``forward_features`` runs them (pooling inside a stage's first)."""
        if model.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(model.blocks, tokens)
        return model.blocks(tokens)

    @staticmethod
    def stdha(block: nn.Module, num_frames: int, head_offsets: list[int]) -> nn.Module:
        """Refused: ZeroI2V's STDHA is defined for ViT and Swin attention, not Hiera's mask units."""
        raise ValueError(
            "backbone.head_offsets: STDHA (ZeroI2V) runs on ViT and Swin backbones; Hiera's mask-unit "
            "attention has none (remove head_offsets)"
        )

    @staticmethod
    def wrappable(block: nn.Module) -> bool:
        """A ``HieraBlock`` that neither pools its queries nor widens its tokens (not a stage's first)."""
        return type(block) is HieraBlock and block.attn.q_stride == 1 and not block.do_expand

    @staticmethod
    def final_norm(model: Hiera, tokens: torch.Tensor) -> torch.Tensor:
        """The last block's tokens, as timm's ``forward_features``: Hiera norms after pooling."""
        return tokens

    @staticmethod
    def num_prefix_tokens(model: Hiera) -> int:
        return 0

    @staticmethod
    def patch_grid(model: Hiera) -> tuple[int, int]:
        return tuple(model.tokens_spatial_shape)

    @staticmethod
    def embed_dim(model: Hiera) -> int:
        return model.num_features

    @staticmethod
    def input_size(model: Hiera) -> tuple[int, int]:
        return tuple(g * s for g, s in zip(model.tokens_spatial_shape, model.patch_stride))

    @staticmethod
    def pixel_stats(model: Hiera) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = model.pretrained_cfg
        return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    @staticmethod
    def block_geometry(model: Hiera) -> list[BlockGeometry]:
        """Per block: its input grid, heads, attention width, the mask unit its keys come from (None where
        attention is global) and whether it pools; a pooling block's output grid is the next one's.

        timm's mask-unit attention groups the unrolled tokens by their position modulo the window count,
        which is a mask unit of the grid only when ``mask_unit_size`` is ``q_stride`` to the power of the
        unrolls left (timm's defaults); other settings are refused, naming the key.
        """
        grid, unit, unrolls = (
            list(model.tokens_spatial_shape),
            list(model.mask_unit_size),
            model.unroll.schedule,
        )
        out = []
        for i, block in enumerate(model.blocks):
            attn = block.attn
            pools = attn.q_stride > 1
            window = None
            if attn.use_mask_unit_attn:
                window = tuple(math.prod(s[d] for s in unrolls) for d in range(len(grid)))
                if window != tuple(unit):
                    raise ValueError(
                        f"hiera: block {i + 1} attends inside mask units of {tuple(unit)} tokens but its "
                        f"unrolled tokens group into {window} windows; set timm_kwargs mask_unit_size "
                        f"({list(model.mask_unit_size)}) to q_stride {list(model.q_stride)} ** (stages - 1)"
                    )
            out.append(BlockGeometry(tuple(grid), attn.heads, attn.dim_out, 0, window, pools))
            if pools:
                grid = [g // s for g, s in zip(grid, model.q_stride)]
                unit = [u // s for u, s in zip(unit, model.q_stride)]
                unrolls = unrolls[1:]
        return out

    @staticmethod
    def pooled(model: Hiera, tokens: torch.Tensor) -> torch.Tensor:
        """timm's head pooling (token mean, then the head's norm): what ``Hiera.forward`` returns without a
        classifier."""
        return model.forward_head(tokens, pre_logits=True)

    @staticmethod
    def grid_positions(model: Hiera, index: int) -> torch.Tensor:
        """Position in block ``index``'s token order of each row-major grid patch (timm's ``Reroll``)."""
        _, size = model.reroll.schedule[index]
        n = math.prod(size)
        return model.reroll(torch.arange(n).view(1, n, 1), index).flatten()

    @staticmethod
    def checkpoint_filter(state: dict[str, torch.Tensor], model: Hiera) -> dict[str, torch.Tensor]:
        """timm's Hiera filter: also reads the ``hiera-transformer`` release's keys (``model_state``,
        ``norm.`` / ``encoder_norm.`` -> ``head.norm.``, ``head.projection.`` -> ``head.fc.``)."""
        return checkpoint_filter_fn(state, model)
