"""STDHA, spatial-temporal dual-headed attention (paper 002, eqs. 7-9): zero parameters, zero FLOPs.

After the qkv projection, a *temporal head* j with offset Δt_j takes frame t+Δt_j's K and V (its own d
channels) while keeping frame t's Q; *spatial heads* (Δt = 0) are untouched. All tokens move, CLS
included. At the clip's edges, where t+Δt_j falls outside the clip, the head keeps frame t's own K and V
(no zeros, no wrap-around), as the authors' released code does (METHOD.md section 4).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from stage1_extract.attention import attend, project_qkv
from stage1_extract.families import family_of

HeadOffsets = Sequence[int] | Mapping[int, int]


def expand_head_offsets(spec: HeadOffsets, num_heads: int) -> list[int]:
    """The explicit per-head offset list of ``spec``: a list (one offset per head) or a multiset.

    A multiset ``{offset: count}`` expands in the released code's channel-block order: every -1 head,
    then every +1 head, then -2, +2, ..., spatial heads (0) last (its ``TemporalShift`` moves channel
    blocks ``[0, fold)`` by -1, ``[fold, 2·fold)`` by +1, then the long shifts):
    ``{-1: 2, +1: 2, 0: 12}`` -> ``[-1, -1, +1, +1, 0, ...]`` (ViT-L/14 with ``shift_div=8``).
    """
    if isinstance(spec, Mapping):
        counts: dict[int, int] = {}
        for offset, count in spec.items():
            if isinstance(offset, bool) or not isinstance(offset, int):
                raise ValueError(f"head_offsets: offset {offset!r} is not an integer (multiset {dict(spec)})")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(
                    f"head_offsets: count of offset {offset} must be an integer >= 0, got {count!r}"
                )
            counts[offset] = count
        total = sum(counts.values())
        if total != num_heads:
            raise ValueError(
                f"head_offsets: the multiset {dict(spec)} has {total} heads, the backbone has {num_heads}"
            )
        offsets: list[int] = []
        for m in range(1, max((abs(o) for o in counts), default=0) + 1):
            offsets += [-m] * counts.get(-m, 0) + [m] * counts.get(m, 0)
        return offsets + [0] * counts.get(0, 0)
    offsets = list(spec)
    if any(isinstance(o, bool) or not isinstance(o, int) for o in offsets):
        raise ValueError(f"head_offsets: expected integers, got {offsets}")
    if len(offsets) != num_heads:
        raise ValueError(
            f"head_offsets: {len(offsets)} offsets {offsets} for a backbone with {num_heads} heads"
        )
    return offsets


@functools.lru_cache(maxsize=64)
def _gather_index(num_frames: int, head_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Flat index (T·h,) into a clip's (frame, head) pairs: entry t·h + j = source frame of (t, j) · h + j.

    Made outside inference mode: the cached tensor is reused by training after a prediction.
    """
    with torch.inference_mode(False):
        h = len(head_offsets)
        t = torch.arange(num_frames).unsqueeze(1)
        source = t + torch.tensor(head_offsets, dtype=torch.long).unsqueeze(0)
        source = torch.where((source >= 0) & (source < num_frames), source, t)
        return (source * h + torch.arange(h)).reshape(-1).to(device)


def temporal_shift_kv(
    k: torch.Tensor, v: torch.Tensor, num_frames: int, head_offsets: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (B·T, h, N, d) where head j of frame t holds frame t+Δt_j's K/V (own K/V at the edges).

    Frames of a clip are contiguous in the batch (index b·T + t). All offsets zero returns the inputs.
    One ``index_select`` per tensor over the clip's (frame, head) pairs moves whole (N, d) slices.
    """
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"temporal_shift_kv: k and v must both be (B*T, h, N, d), got {k.shape} and {v.shape}"
        )
    BT, h, N, d = k.shape
    if num_frames < 1 or BT % num_frames:
        raise ValueError(f"temporal_shift_kv: batch {BT} is not a whole number of {num_frames}-frame clips")
    if len(head_offsets) != h:
        raise ValueError(f"temporal_shift_kv: {len(head_offsets)} head offsets for {h} heads")
    if not any(head_offsets):
        return k, v
    index = _gather_index(num_frames, tuple(int(o) for o in head_offsets), k.device)
    pairs = (BT // num_frames, num_frames * h, N, d)
    k = k.reshape(pairs).index_select(1, index).reshape(BT, h, N, d)
    v = v.reshape(pairs).index_select(1, index).reshape(BT, h, N, d)
    return k, v


class STDHAttention(Attention):
    """timm's ``Attention`` (same parameters and state-dict keys) whose temporal heads read other frames.

    The input is a batch of B·T frames, clips contiguous; ``head_offsets[j]`` is head j's Δt.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_frames: int = 1,
        head_offsets: Sequence[int] | None = None,
        **attention_kwargs,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **attention_kwargs)
        self.num_frames = num_frames
        self.head_offsets = list(head_offsets) if head_offsets is not None else [0] * num_heads
        _check_offsets(self.head_offsets, num_heads, num_frames)

    @classmethod
    def from_attention(cls, attn: Attention, num_frames: int, head_offsets: Sequence[int]) -> STDHAttention:
        """An STDHAttention built around ``attn``'s own submodules and parameter tensors (nothing copied).

        The new module is constructed on the meta device (no allocation, no random draws), then takes
        over ``attn``'s layers, so its state-dict keys and values are ``attn``'s.
        """
        if not isinstance(attn, Attention):
            raise TypeError(f"STDHA needs timm.layers.Attention, got {type(attn).__name__}")
        new = cls(
            attn.qkv.in_features,
            attn.num_heads,
            attn_head_dim=attn.head_dim,
            dim_out=attn.proj.out_features,
            gated=getattr(attn, "gate", None) is not None,
            num_frames=num_frames,
            head_offsets=head_offsets,
            device="meta",
        )
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            setattr(new, name, getattr(attn, name, None))
        new.fused_attn, new.scale = attn.fused_attn, attn.scale
        return new.train(attn.training)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "STDHAttention: attention masks are not supported (frames attend to whole frames)"
            )
        q, k, v = project_qkv(self, x)
        k, v = temporal_shift_kv(k, v, self.num_frames, self.head_offsets)
        return attend(self, q, k, v, gate_input=x)

    def extra_repr(self) -> str:
        return f"num_frames={self.num_frames}, head_offsets={self.head_offsets}"


def _check_offsets(head_offsets: list[int], num_heads: int, num_frames: int) -> None:
    if len(head_offsets) != num_heads:
        raise ValueError(f"STDHA: {len(head_offsets)} head offsets {head_offsets} for {num_heads} heads")
    if num_frames < 1:
        raise ValueError(f"STDHA: num_frames must be >= 1, got {num_frames}")


def use_stdha(
    vit: VisionTransformer,
    head_offsets: HeadOffsets,
    num_frames: int,
    blocks: Sequence[int] | None = None,
) -> VisionTransformer:
    """Swaps the ``attn`` of every block (or of the 0-based ``blocks``) for STDHA, in place; keys unchanged.

    ``head_offsets`` is an explicit list or a multiset (see ``expand_head_offsets``). Returns ``vit``.
    """
    all_blocks = family_of(vit).blocks(vit)
    indices = range(len(all_blocks)) if blocks is None else list(blocks)
    for i in indices:
        if not 0 <= i < len(all_blocks):
            raise ValueError(
                f"use_stdha: block index {i} out of range (the ViT has {len(all_blocks)} blocks)"
            )
        attn = all_blocks[i].attn
        offsets = expand_head_offsets(head_offsets, attn.num_heads)
        if isinstance(attn, STDHAttention):
            _check_offsets(offsets, attn.num_heads, num_frames)
            attn.num_frames, attn.head_offsets = num_frames, offsets
        else:
            all_blocks[i].attn = STDHAttention.from_attention(attn, num_frames, offsets)
    return vit


def stdha_modules(module: nn.Module) -> list[STDHAttention]:
    """Every STDHAttention inside ``module`` (to check or change their frame count)."""
    return [m for m in module.modules() if isinstance(m, STDHAttention)]
