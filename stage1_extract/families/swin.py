"""timm's ``SwinTransformer`` as a backbone family (``swin_*_patch4_window7_224`` by name), with its STDHA.

Swin (Liu et al. 2021) has no CLS token and four stages of window-attention blocks with a patch merging
(2x2 tokens -> 1, width x2) before every stage but the first; tokens stay (B, H, W, C). A block
partitions each frame into windows, so the attention's batch is ordered (frame, window): a temporal head
of window w in frame t reads K/V of window w in frame t+Δt (METHOD.md section 8). The shifted windows'
mask is the same for every frame and applies unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from timm.models import swin_transformer as timm_swin
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from stage1_extract.families.base import BlockGeometry
from stage1_extract.methods.stdha import STDHA, temporal_shift_kv

StateDict = dict[str, torch.Tensor]


class SwinSTDHAttention(STDHA, WindowAttention):
    """timm's ``WindowAttention`` (same parameters and keys) whose temporal heads read other frames' K/V.

    Its input is the windows of B·T frames, ``windows`` consecutive entries per frame (timm's
    ``window_partition`` order), clips contiguous.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_frames: int = 1,
        head_offsets: Sequence[int] | None = None,
        windows: int = 1,
        **attention_kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **attention_kwargs)
        self.windows = windows
        self.set_temporal_heads(num_frames, head_offsets if head_offsets is not None else [0] * num_heads)

    @classmethod
    def from_block(
        cls, block: SwinTransformerBlock, num_frames: int, head_offsets: Sequence[int]
    ) -> SwinSTDHAttention:
        """STDHA around ``block.attn``'s own layers and tensors (nothing copied), for ``block``'s windows."""
        if block.dynamic_mask:
            raise ValueError("STDHA on Swin needs a fixed input size (a model built with strict_img_size)")
        attn: WindowAttention = block.attn
        H, W = block.input_resolution
        wh, ww = block.window_size
        heads = attn.num_heads
        new = cls(
            attn.dim,
            heads,
            head_dim=attn.qkv.out_features // (3 * heads),
            window_size=attn.window_size,
            qkv_bias=attn.qkv.bias is not None,
            num_frames=num_frames,
            head_offsets=head_offsets,
            windows=math.ceil(H / wh) * math.ceil(W / ww),
            device="meta",
        )
        for name in ("qkv", "attn_drop", "proj", "proj_drop", "softmax"):
            setattr(new, name, getattr(attn, name))
        new.relative_position_bias_table = attn.relative_position_bias_table
        new.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        new.fused_attn, new.scale = attn.fused_attn, attn.scale
        return new.train(attn.training)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """timm's ``WindowAttention.forward`` with temporal heads' K/V taken from their frame's window."""
        B_, N, _ = x.shape
        if mask is not None and mask.shape[0] != self.windows:
            raise ValueError(
                f"SwinSTDHAttention: a mask for {mask.shape[0]} windows, built for {self.windows}"
            )
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = temporal_shift_kv(k, v, self.num_frames, self.head_offsets, self.windows)
        if self.fused_attn:
            attn_mask = self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads, -1, -1)
                attn_mask = attn_mask + mask.reshape(-1, self.num_heads, N, N)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            x = self.attn_drop(self.softmax(attn)) @ v
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, windows={self.windows}"


class StageBlocks(nn.ModuleList):
    """The blocks of every stage in one list; setting an item replaces the block inside its stage."""

    def __init__(self, model: SwinTransformer) -> None:
        super().__init__([b for stage in model.layers for b in stage.blocks])
        self._places = [(stage.blocks, j) for stage in model.layers for j in range(len(stage.blocks))]

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        super().__setitem__(idx, module)
        seq, j = self._places[idx]
        seq[j] = module


class TimmSwin:
    """timm's ``SwinTransformer`` (v1; ``swin_tiny/small/base/large_patch4_window7_224``, ...)."""

    model_class = SwinTransformer
    attention = WindowAttention
    split = None  # AM flow does not run on Swin blocks (``wrappable`` is False): nothing to split

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_class)

    @staticmethod
    def embed(
        model: SwinTransformer,
        frames: torch.Tensor,
        extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = model.patch_embed(frames)  # (B·T, H, W, C): Swin v1 has no position embedding
        return extra(x) if extra is not None else x

    @staticmethod
    def blocks(model: SwinTransformer) -> nn.ModuleList:
        return StageBlocks(model)

    @staticmethod
    def stages(model: SwinTransformer) -> list[list[int]]:
        out, start = [], 0
        for stage in model.layers:
            out.append(list(range(start, start + len(stage.blocks))))
            start += len(stage.blocks)
        return out

    @staticmethod
    def forward_blocks(model: SwinTransformer, tokens: torch.Tensor) -> torch.Tensor:
        for stage in model.layers:
            tokens = stage.downsample(tokens)
            if stage.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint_seq(stage.blocks, tokens)
            else:
                tokens = stage.blocks(tokens)
        return tokens

    @staticmethod
    def stdha(block: nn.Module, num_frames: int, head_offsets: list[int]) -> nn.Module:
        return SwinSTDHAttention.from_block(block, num_frames, head_offsets)

    @staticmethod
    def grid_positions(model: SwinTransformer, index: int) -> None:
        """Swin's tokens are (B, H, W, C): row-major already."""
        return None

    @staticmethod
    def wrappable(block: nn.Module) -> bool:
        return False  # window attention on (B, H, W, C) tokens: not the ViT block an AMFlowBlock takes over

    @staticmethod
    def final_norm(model: SwinTransformer, tokens: torch.Tensor) -> torch.Tensor:
        return model.norm(tokens)

    @staticmethod
    def num_prefix_tokens(model: SwinTransformer) -> int:
        return 0

    @staticmethod
    def patch_grid(model: SwinTransformer) -> tuple[int, int]:
        return tuple(model.patch_embed.grid_size)

    @staticmethod
    def embed_dim(model: SwinTransformer) -> int:
        return model.patch_embed.proj.out_channels  # model.embed_dim may be the per-stage tuple

    @staticmethod
    def input_size(model: SwinTransformer) -> tuple[int, int]:
        return tuple(int(s) for s in model.patch_embed.img_size)

    @staticmethod
    def pixel_stats(model: SwinTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = model.pretrained_cfg
        return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    @staticmethod
    def checkpoint_filter(state: StateDict, model: SwinTransformer) -> StateDict:
        return timm_swin.checkpoint_filter_fn(state, model)

    @staticmethod
    def block_geometry(model: SwinTransformer) -> list[BlockGeometry]:
        return [
            BlockGeometry(
                tuple(b.input_resolution), b.attn.num_heads, b.dim, window=tuple(b.window_size), pools=False
            )
            for stage in model.layers
            for b in stage.blocks
        ]

    @staticmethod
    def pooled(model: SwinTransformer, tokens: torch.Tensor) -> torch.Tensor:
        return model.forward_head(tokens, pre_logits=True)
