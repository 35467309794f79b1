"""The backbone seam: what AM flow and STDHA need from an image backbone; one module per family.

AM flow (paper 000) and STDHA (paper 002) touch a backbone in a few places only. ``BackboneFamily``
names them; ``families.vit.TimmViT`` is the first family. A new family (Hiera, Swin) is one new module
in this package with a class that provides every method of ``BackboneFamily``, and its line in
``FAMILIES`` below; the AM-flow block, STDHA, extraction, checkpoints and the pictures then run on it
unchanged:

- ``embed``: frames (B·T, 3, H, W) -> tokens (B·T, N, D) before the first block (patches, prefix tokens,
  position embeddings, then ``extra``, e.g. ZeroI2V's temporal embedding, then any pre-norm);
- ``blocks``: the ``nn.ModuleList`` of transformer blocks, each replaceable in place by index;
- ``stages``: the block indices of each stage (blocks between two downsamplings; a ViT is one stage);
- ``forward_blocks``: tokens after ``embed`` -> tokens after the last block (through the downsampling
  between stages), recomputing each block in the backward pass when timm's ``set_grad_checkpointing`` is on;
- ``wrappable``: whether a block has the pre-norm layout an ``AMFlowBlock`` takes over (``norm1``,
  ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``) with the same tokens
  and width in and out (no pooling);
- ``attention``: the attention class whose q, k, v ``split`` splits out and STDHA subclasses;
- ``split``: that attention in steps (``AttentionSplit``: ``project_qkv``, ``attend``, ``to_tokens``), so
  AM flow reads a block's own q, k (per attention window where attention is local) and STDHA edits K/V;
- ``stdha``: a block's attention as STDHA (``stage1_extract.methods.stdha``), sharing its weights: the
  family's STDHA subclass of ``attention``, told what it needs of the block (e.g. Swin's windows per frame);
- ``final_norm``: tokens after the last block -> the final tokens, as timm's ``forward_features`` gives
  them (normed for a ViT; Hiera norms after pooling, in ``pooled``);
- ``num_prefix_tokens``, ``patch_grid``, ``embed_dim``, ``input_size``: token layout, width, frame size;
- ``pixel_stats``: the input normalisation (mean, std) the weights were trained with;
- ``checkpoint_filter``: timm's ``checkpoint_filter_fn`` of the family (a timm or original release state
  dict -> the model's keys, position tables resampled to its size);
- ``block_geometry``: per block, its token grid, heads, width, prefix tokens, attention window and whether
  it pools (changes its token set): hierarchical families change these from stage to stage;
- ``pooled``: final tokens -> one feature per frame, timm's ``forward_head(pre_logits=True)`` (the CLS for
  a ViT with token pooling; the token mean for families without a CLS token), width ``model.num_features``;
- ``grid_positions``: where a block's tokens sit on its row-major grid, for families whose blocks see
  their tokens in another order (Hiera's unrolled mask units); the maps AM flow returns are row-major.

Linear adapters (``stage1_extract.methods.linear_adapters``) go on the ``attn.qkv``, ``attn.proj``,
``mlp.fc1`` and ``mlp.fc2`` of every block: the paths timm's ViT, Swin and Hiera blocks share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class BlockGeometry:
    """What one block sees: ``grid`` (rows, cols) of its patch tokens, ``heads`` and ``width`` of its
    attention, ``prefix_tokens`` (CLS, registers) before the patches, ``window`` (rows, cols) of its local
    attention (None: global), and ``pools`` (its output token set differs from its input's)."""

    grid: tuple[int, int]
    heads: int
    width: int
    prefix_tokens: int = 0
    window: tuple[int, int] | None = None
    pools: bool = False

    @property
    def tokens(self) -> int:
        """Tokens per frame at the block's input: prefix tokens, then the patch grid."""
        return self.prefix_tokens + self.grid[0] * self.grid[1]


class AttentionSplit(Protocol):
    """A block's attention in steps: ``project_qkv`` then ``attend`` compute exactly what its ``forward``
    does, so AM flow reads q, k in between and STDHA can swap K/V between frames.

    q, k, v are (B, h, n, d) for global attention, (B, h, windows, n, d) for local attention: ``n`` keys
    per attention window. ``to_tokens`` puts per-key values (B, h, [windows,] n) back on the block's own
    token order, (B, h, N).
    """

    @staticmethod
    def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    @staticmethod
    def attend(
        attn: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        probs: torch.Tensor | None = None,
        gate_input: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    @staticmethod
    def to_tokens(attn: nn.Module, values: torch.Tensor) -> torch.Tensor: ...


class BackboneFamily(Protocol):
    """What AM flow and STDHA use of a backbone model (see the module docstring); one class a family."""

    model_class: type[nn.Module]
    attention: type[nn.Module]
    split: AttentionSplit | None  # None: the family has no block AM flow can wrap

    @classmethod
    def matches(cls, model: nn.Module) -> bool: ...

    @staticmethod
    def embed(
        model: nn.Module, frames: torch.Tensor, extra: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor: ...

    @staticmethod
    def blocks(model: nn.Module) -> nn.ModuleList: ...

    @staticmethod
    def stages(model: nn.Module) -> list[list[int]]: ...

    @staticmethod
    def forward_blocks(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor: ...

    @staticmethod
    def stdha(block: nn.Module, num_frames: int, head_offsets: list[int]) -> nn.Module: ...

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

    @staticmethod
    def checkpoint_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]: ...

    @staticmethod
    def block_geometry(model: nn.Module) -> list[BlockGeometry]: ...

    @staticmethod
    def pooled(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor: ...

    @staticmethod
    def grid_positions(model: nn.Module, index: int) -> torch.Tensor | None: ...
