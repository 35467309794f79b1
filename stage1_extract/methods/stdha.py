"""STDHA, spatial-temporal dual-headed attention (paper 002, eqs. 7-9): zero parameters, zero FLOPs.

After the qkv projection, a *temporal head* j with offset Δt_j takes frame t+Δt_j's K and V (its own d
channels) while keeping frame t's Q; *spatial heads* (Δt = 0) are untouched. All tokens move, CLS
included. At the clip's edges, where t+Δt_j falls outside the clip, the head keeps frame t's own K and V
(no zeros, no wrap-around), as the authors' released code does (METHOD.md section 4).

Each backbone family has its STDHA attention (``STDHA`` mixed into the family's attention class:
``STDHAttention`` here for timm's ``Attention``; Swin's window attention in ``families.swin``, where K/V
come from the same window of the other frame). ``use_stdha`` installs it through the family.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from timm.layers import Attention
from torch import nn

from stage1_extract.families.attention import attend, project_qkv

HeadOffsets = Sequence[int] | Mapping[int, int]
# A model's STDHA heads: one spec for every stage, a list of specs (one per stage), or the temporal fraction
# of each stage's heads (offsets -1, +1, -2, +2, ... in turn: ``stage_head_offsets``).
StageOffsets = HeadOffsets | Sequence[HeadOffsets] | float
TEMPORAL_CYCLE = (-1, 1, -2, 2)


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
    if not isinstance(spec, Sequence):
        raise ValueError(f"head_offsets: expected a list of offsets or a multiset, got {spec!r}")
    offsets = list(spec)
    if any(isinstance(o, bool) or not isinstance(o, int) for o in offsets):
        raise ValueError(f"head_offsets: expected integers, got {offsets}")
    if len(offsets) != num_heads:
        raise ValueError(
            f"head_offsets: {len(offsets)} offsets {offsets} for a backbone with {num_heads} heads"
        )
    return offsets


def stage_head_offsets(spec: StageOffsets, stage_heads: Sequence[int]) -> list[list[int]]:
    """Per stage (its head count in ``stage_heads``), the explicit per-head offsets of ``spec``.

    ``spec``: one list or multiset for every stage; a list with one per stage; or a fraction in (0, 1]:
    ``max(1, round(fraction · h))`` temporal heads per stage with offsets -1, +1, -2, +2, -1, ... in turn
    (paper 002's Swin-B: 1/4 of each stage's heads), expanded in the released code's order.
    """
    if isinstance(spec, float):
        if not 0 < spec <= 1:
            raise ValueError(f"head_offsets: a fraction of each stage's heads must be in (0, 1], got {spec}")
        specs: list[HeadOffsets] = []
        for h in stage_heads:
            counts = {o: 0 for o in TEMPORAL_CYCLE}
            temporal = max(1, round(spec * h))
            for i in range(temporal):
                counts[TEMPORAL_CYCLE[i % len(TEMPORAL_CYCLE)]] += 1
            specs.append({**counts, 0: h - temporal})
    elif isinstance(spec, Sequence) and spec and all(isinstance(s, (Sequence, Mapping)) for s in spec):
        specs = list(spec)
        if len(specs) != len(stage_heads):
            raise ValueError(
                f"head_offsets: {len(specs)} per-stage entries for a backbone with {len(stage_heads)} stages"
            )
    else:
        specs = [spec] * len(stage_heads)
    out = []
    for i, (s, h) in enumerate(zip(specs, stage_heads)):
        try:
            out.append(expand_head_offsets(s, h))
        except ValueError as e:
            raise ValueError(f"stage {i + 1} ({h} heads): {e}") from e
    return out


@functools.lru_cache(maxsize=64)
def _gather_index(
    num_frames: int, head_offsets: tuple[int, ...], device: torch.device, windows: int = 1
) -> torch.Tensor:
    """Flat index (T·W·h,) into a clip's (frame, window, head) triples: entry (t·W + w)·h + j holds
    (source frame of (t, j) · W + w) · h + j.

    Made outside inference mode: the cached tensor is reused by training after a prediction.
    """
    with torch.inference_mode(False):
        h = len(head_offsets)
        t = torch.arange(num_frames).unsqueeze(1)
        source = t + torch.tensor(head_offsets, dtype=torch.long).unsqueeze(0)
        source = torch.where((source >= 0) & (source < num_frames), source, t)
        index = (source.unsqueeze(1) * windows + torch.arange(windows).view(1, -1, 1)) * h + torch.arange(h)
        return index.reshape(-1).to(device)


def temporal_shift_kv(
    k: torch.Tensor, v: torch.Tensor, num_frames: int, head_offsets: Sequence[int], windows: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (B·T·W, h, N, d) where head j of frame t holds frame t+Δt_j's K/V (own K/V at the edges).

    Frames of a clip are contiguous in the batch, each as ``windows`` consecutive entries (its attention
    windows, index (b·T + t)·W + w; W = 1 for global attention); window w reads window w of the other
    frame. All offsets zero returns the inputs. One ``index_select`` per tensor over the clip's (frame,
    window, head) triples moves whole (N, d) slices.
    """
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"temporal_shift_kv: k and v must both be (B*T, h, N, d), got {k.shape} and {v.shape}"
        )
    BT, h, N, d = k.shape
    if num_frames < 1 or windows < 1 or BT % (num_frames * windows):
        raise ValueError(
            f"temporal_shift_kv: batch {BT} is not a whole number of {num_frames}-frame clips of "
            f"{windows} window(s) per frame"
        )
    if len(head_offsets) != h:
        raise ValueError(f"temporal_shift_kv: {len(head_offsets)} head offsets for {h} heads")
    if not any(head_offsets):
        return k, v
    index = _gather_index(num_frames, tuple(int(o) for o in head_offsets), k.device, windows)
    pairs = (BT // (num_frames * windows), num_frames * windows * h, N, d)
    k = k.reshape(pairs).index_select(1, index).reshape(BT, h, N, d)
    v = v.reshape(pairs).index_select(1, index).reshape(BT, h, N, d)
    return k, v


class STDHA:
    """Mixed into a family's attention class to make its STDHA: frames per clip and each head's Δt.

    The input is a batch of B·T frames (or their windows), clips contiguous; ``head_offsets[j]`` is head
    j's Δt. ``stdha_modules`` finds every such attention; ``set_temporal_heads`` changes them.
    """

    num_heads: int
    num_frames: int
    head_offsets: list[int]

    def set_temporal_heads(self, num_frames: int, head_offsets: Sequence[int]) -> None:
        offsets = [int(o) for o in head_offsets]
        _check_offsets(offsets, self.num_heads, num_frames)
        self.num_frames, self.head_offsets = num_frames, offsets

    def extra_repr(self) -> str:
        return f"num_frames={self.num_frames}, head_offsets={self.head_offsets}"


class STDHAttention(STDHA, Attention):
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
        self.set_temporal_heads(num_frames, head_offsets if head_offsets is not None else [0] * num_heads)

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


def _check_offsets(head_offsets: list[int], num_heads: int, num_frames: int) -> None:
    if len(head_offsets) != num_heads:
        raise ValueError(f"STDHA: {len(head_offsets)} head offsets {head_offsets} for {num_heads} heads")
    if num_frames < 1:
        raise ValueError(f"STDHA: num_frames must be >= 1, got {num_frames}")


def use_stdha(
    model: nn.Module,
    head_offsets: HeadOffsets,
    num_frames: int,
    blocks: Sequence[int] | None = None,
) -> nn.Module:
    """Swaps the ``attn`` of every block (or of the 0-based ``blocks``) for its family's STDHA, in place;
    keys unchanged. ``head_offsets`` is an explicit list or a multiset (see ``expand_head_offsets``).
    Returns ``model``.
    """
    # Imported here: the families import this module (their STDHA attentions mix in ``STDHA``).
    from stage1_extract.families import family_of

    family = family_of(model)
    all_blocks = family.blocks(model)
    indices = range(len(all_blocks)) if blocks is None else list(blocks)
    for i in indices:
        if not 0 <= i < len(all_blocks):
            raise ValueError(
                f"use_stdha: block index {i} out of range (the backbone has {len(all_blocks)} blocks)"
            )
        attn = all_blocks[i].attn
        offsets = expand_head_offsets(head_offsets, attn.num_heads)
        if isinstance(attn, STDHA):
            attn.set_temporal_heads(num_frames, offsets)
        else:
            all_blocks[i].attn = family.stdha(all_blocks[i], num_frames, offsets)
    return model


def use_stage_stdha(model: nn.Module, spec: StageOffsets, num_frames: int) -> list[list[int]]:
    """STDHA on every block, each stage's heads as ``spec`` assigns them (``stage_head_offsets``), in place.

    Returns the explicit offsets per stage (what a resolved config records).
    """
    from stage1_extract.families import family_of  # see use_stdha

    family = family_of(model)
    blocks, stages = family.blocks(model), family.stages(model)
    offsets = stage_head_offsets(spec, [blocks[s[0]].attn.num_heads for s in stages])
    for stage, stage_offsets in zip(stages, offsets):
        use_stdha(model, stage_offsets, num_frames, blocks=stage)
    return offsets


def stdha_modules(module: nn.Module) -> list[STDHA]:
    """Every STDHA attention inside ``module`` (to check or change their frame count)."""
    return [m for m in module.modules() if isinstance(m, STDHA)]
