"""The AM-flow feature model: scaled parallel adapters fed with AM flow on a frozen timm backbone (paper 000).

``build_amflow_extractor(cfg)`` assembles it in one visible function: timm's model (a ViT, or any family
of ``stage1_extract.families``, e.g. Hiera), its chosen blocks swapped for ``AMFlowBlock`` (which keeps
the block's own submodules, so timm's state-dict keys are unchanged). ``extract`` gives the features
stage 1 caches (``ClipFeatures``); stage 2 owns what maps them to logits (``stage2_temporal.heads``)
and the end-to-end model that adds its classifier to this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from foundation.features import ClipFeatures
from stage1_extract.families import family_of
from stage1_extract.families.attention import attention_probs
from stage1_extract.families.backbone import create_backbone, freeze
from stage1_extract.families.base import AttentionSplit, BlockGeometry
from stage1_extract.methods.am_flow import (
    am_flow,
    attention_scores_softmax_sum,
    attention_scores_sum_softmax,
    feature_difference,
)
from stage1_extract.methods.model_config import BackboneConfig
from stage1_extract.methods.stdha import expand_head_offsets, temporal_shift_kv, use_stdha

ALIGNER_REFERENCES = ("previous", "first")


@dataclass
class AMFlowConfig:
    """AM-flow features: backbone, which blocks get AM flow + adapters, aggregation, pooling, seed.

    A model YAML may also hold a classifier's keys: stage 2's end-to-end config extends this one with
    them; extraction reads only these fields (``stage1_extract.methods.models``).
    """

    kind: Literal["amflow"] = "amflow"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_frames: int = 8
    # 1-based block numbers with AM flow and adapters, as the paper writes AM/2(1,12); "all" = AM/L, every
    # block that can take AM flow (Hiera: all but each stage's first block, which pools).
    blocks: list[int] | Literal["all"] = "all"
    aggregation: Literal["sum_softmax", "softmax_sum"] = "sum_softmax"
    temperature: float | None = None  # sum_softmax: divides summed logits; None = N (mean over queries)
    aligning_encoder: bool = False
    aligner_heads: int = 12
    aligner_mlp_ratio: float = 4 / 3
    # What the aligner aligns frame t+1 to: frame t (paper 000's pairs, each flow map in frame t's view)
    # or the clip's first frame (every flow map in one view; our option, README "The aligning encoder").
    aligner_reference: Literal["previous", "first"] = "previous"
    # The aligner's own 2D sin-cos position embedding over the patch grid, added to both frames' tokens
    # inside it and learned from there ("sincos"; our option, README "The aligning encoder"), or none (the
    # tokens carry only the backbone's position embedding, which a random backbone's barely has).
    aligner_position: Literal["none", "sincos"] = "none"
    bottleneck: int | None = None  # adapter width r; None = the backbone width D
    pooling: Literal["mean", "cls", "flow"] = "mean"
    # What the per-token maps of the features hold: AM flow (h per token), or METHOD.md s7's control,
    # the frame-to-frame difference of the block's normed token features (1 per token).
    maps: Literal["am_flow", "feature_diff"] = "am_flow"
    seed: int = 0

    def validate(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.blocks != "all" and (not self.blocks or min(self.blocks) < 1):
            raise ValueError(f"blocks: expected 'all' or 1-based block numbers, got {self.blocks}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
        if self.aligner_position not in ("none", "sincos"):
            raise ValueError(f"aligner_position: expected 'none' or 'sincos', got {self.aligner_position!r}")
        if self.aligner_reference not in ALIGNER_REFERENCES:
            raise ValueError(
                f"aligner_reference: expected one of {list(ALIGNER_REFERENCES)}, "
                f"got {self.aligner_reference!r}"
            )


class ParallelAdapter(nn.Module):
    """Scaled parallel adapter (paper 000, eq. 5): ``s * W_up(E)``, ``E = ReLU(W_down(x))``.

    ``W_up`` is zero-initialised, so at initialisation the adapted block returns exactly the frozen
    block's output; ``W_down`` is random, so ``E`` is informative from the start.

    Args:
        in_dim: input features (D, or D + h for the attention adapter that also reads the AM flow).
        bottleneck: the embedding width r.
        out_dim: the block width D.
        scale: initial value of the learned scale s.
    """

    def __init__(self, in_dim: int, bottleneck: int, out_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.down = nn.Linear(in_dim, bottleneck)
        self.up = nn.Linear(bottleneck, out_dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def no_weight_decay(self) -> set[str]:
        """Trained without weight decay (timm's convention): the adapter's scale s."""
        return {"scale"}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., in) -> (residual update (..., out), embedding E (..., r))."""
        e = torch.relu(self.down(x))
        return self.scale * self.up(e), e


class AligningEncoder(nn.Module):
    """Aligns frame t+1 to frame t before its attention map is taken (moving cameras; METHOD.md s1).

    Starts as the identity (METHOD.md s9): both residual branches of its encoder layer end in
    zero-initialised projections and its output is ``x_{t+1}`` plus the layer's update only (the frame
    embeddings stay inside), so until training moves it the AM flow is exactly that of no aligner.

    Args:
        dim: token width D.
        num_heads: attention heads of its one encoder layer.
        mlp_ratio: feed-forward width over D.
        position: (N, D) start of its own position embedding, added to both frames' tokens inside it (None:
            none; see ``aligner_position_table``).
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, position: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=num_heads,
            dim_feedforward=round(dim * mlp_ratio),
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        for last in (self.layer.self_attn.out_proj, self.layer.linear2):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.frame_embed = nn.Parameter(torch.zeros(2, dim))
        nn.init.trunc_normal_(self.frame_embed, std=0.02)
        self.pos_embed = nn.Parameter(position.clone()) if position is not None else None

    def no_weight_decay(self) -> set[str]:
        """Trained without weight decay (timm's convention): the frame and position embeddings."""
        return {"frame_embed", "pos_embed"}

    def forward(self, x: torch.Tensor, reference: str = "previous") -> torch.Tensor:
        """x: (B, T, N, D) -> frames 2..T aligned to their predecessors (``reference="previous"``) or to
        frame 1 (``"first"``), (B, T-1, N, D)."""
        B, T, N, D = x.shape
        ref = x[:, :-1] if reference == "previous" else x[:, :1].expand(B, T - 1, N, D)
        embed = (
            self.frame_embed[:, None]
            if self.pos_embed is None
            else self.frame_embed[:, None] + self.pos_embed
        )
        pairs = torch.cat([ref + embed[0], x[:, 1:] + embed[1]], dim=2)
        pairs = pairs.reshape(B * (T - 1), 2 * N, D)
        update = (self.layer(pairs) - pairs)[:, N:]  # exactly 0 at initialisation
        return x[:, 1:] + update.reshape(B, T - 1, N, D)


def aligner_position_table(geometry: BlockGeometry, grid_positions: torch.Tensor | None) -> torch.Tensor:
    """(N, D) start of an aligner's position embedding: timm's 2D sin-cos table of the block's patch grid
    on the patch tokens (in the block's token order), zeros on the prefix tokens."""
    from timm.layers import build_sincos2d_pos_embed

    rows, cols = geometry.grid
    grid = build_sincos2d_pos_embed([rows, cols], geometry.width)  # row-major patches
    if grid_positions is not None:
        grid = torch.zeros_like(grid).index_copy_(0, grid_positions.to(torch.long), grid)
    return torch.cat([torch.zeros(geometry.prefix_tokens, geometry.width), grid])


@dataclass
class BlockOutput:
    """One AM-flow block's outputs besides its tokens: the two adapters' pooled E and its per-token maps.

    ``maps`` is the AM flow (B*T, h, N), or with ``maps: feature_diff`` the control (B*T, 1, N).
    """

    embeddings: tuple[torch.Tensor, torch.Tensor]
    maps: torch.Tensor


def pool_tokens(e: torch.Tensor, mode: str, num_prefix: int, flow: torch.Tensor) -> torch.Tensor:
    """Pools E (M, N, r) over the patch tokens to (M, r): mean, the CLS token, or AM-flow weights."""
    if mode == "cls":
        return e[:, 0]
    patches = e[:, num_prefix:]
    if mode == "mean":
        return patches.mean(dim=1)
    weights = flow[:, :, num_prefix:].sum(dim=1) + 1e-6  # (M, P); uniform when nothing moves
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("mp,mpr->mr", weights, patches)


class AMFlowBlock(nn.Module):
    """A timm pre-norm block with AM flow and two scaled parallel adapters (paper 000, eq. 5).

    Holds the original block's modules under their own names (``norm1``, ``attn``, ``ls1``, ...), so a
    plain timm checkpoint loads into it unchanged. The attention is computed once, in the family's
    steps (``split``): its q and k also give the block's AM flow, per attention window where the
    attention is local (Hiera's mask units; METHOD.md s8).

    Args:
        block: the timm block to wrap (its modules are taken over, not copied); same tokens in and out.
        geometry: the block's geometry (``families.base.BlockGeometry``): width, heads, prefix tokens.
        split: the family's attention in steps (``families.base.AttentionSplit``).
        grid_positions: where each row-major grid patch sits in the block's token order (None: it is
            row-major already); the maps the block returns are row-major.
        bottleneck: adapter width r (None: the block width D).
        aggregation: how attention maps become per-token scores (eq. 2-3): sum_softmax or softmax_sum.
        temperature: sum_softmax's divisor of the summed logits (None: the token count N).
        pooling: how E is pooled over tokens: mean, cls, or flow (AM-flow weights).
        maps: what the per-token maps hold: am_flow (h per token) or feature_diff (METHOD.md s7 control).
        aligner_heads: heads of the aligning encoder for moving cameras (None: no aligner).
        aligner_mlp_ratio: the aligning encoder's feed-forward width over D.
        aligner_reference: what frame t+1 is aligned to, ``previous`` (frame t) or ``first`` (frame 1).
        aligner_position: ``sincos``: the aligner's own position embedding (``aligner_position_table``).
        head_offsets: STDHA per-head frame offsets of this block's attention, or None.
    """

    def __init__(
        self,
        block: nn.Module,
        geometry: BlockGeometry,
        split: AttentionSplit,
        grid_positions: torch.Tensor | None = None,
        bottleneck: int | None = None,
        aggregation: str = "sum_softmax",
        temperature: float | None = None,
        pooling: str = "mean",
        maps: str = "am_flow",
        aligner_heads: int | None = None,
        aligner_mlp_ratio: float = 4 / 3,
        aligner_reference: str = "previous",
        aligner_position: str = "none",
        head_offsets: list[int] | None = None,
    ) -> None:
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        dim, heads = geometry.width, geometry.heads
        r = bottleneck or dim
        self.split = split
        self.aggregation = aggregation
        self.temperature = temperature
        self.pooling = pooling
        self.maps = maps
        self.num_prefix_tokens = geometry.prefix_tokens
        self.head_offsets = head_offsets
        self.register_buffer("grid_positions", grid_positions, persistent=False)
        self.adapter_attn = ParallelAdapter(dim + heads, r, dim)
        self.adapter_mlp = ParallelAdapter(dim, r, dim)
        position = aligner_position_table(geometry, grid_positions) if aligner_position == "sincos" else None
        self.aligner = (
            AligningEncoder(dim, aligner_heads, aligner_mlp_ratio, position) if aligner_heads else None
        )
        self.aligner_reference = aligner_reference
        # With ``track_alignment``, each training forward sets ``alignment_error``: the mean squared
        # distance of the aligned frame t+1 to frame t (normed patch tokens), for the optional auxiliary
        # alignment loss (our addition, METHOD.md s9). Its gradient reaches the aligner only.
        self.track_alignment = False
        self.alignment_error: torch.Tensor | None = None

    def _scores(self, q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        if self.aggregation == "softmax_sum":
            return attention_scores_softmax_sum(
                probs if probs is not None else attention_probs(self.attn, q, k)
            )
        return attention_scores_sum_softmax(q, k, self.temperature)

    def _alignment_error(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared distance of the aligned frames t+1 to their reference (frames t, or frame 1 with
        ``aligner_reference="first"``), normed patch tokens; x (B, T, N, D)
        detached, so the loss trains the aligner and nothing before it (no collapse of the tokens)."""
        p = self.num_prefix_tokens
        aligned = self.norm1(self.aligner(x, self.aligner_reference)[:, :, p:])
        ref = x[:, :-1, p:] if self.aligner_reference == "previous" else x[:, :1, p:]
        return (aligned - self.norm1(ref)).pow(2).mean()

    def forward(self, x: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, BlockOutput]:
        """x: (B*T, N, D), frames of a clip contiguous -> (x, BlockOutput)."""
        BT, N, D = x.shape
        B, T = BT // num_frames, num_frames
        a = self.norm1(x)
        q, k, v = self.split.project_qkv(self.attn, a)
        k_att, v_att = k, v
        if self.head_offsets is not None:
            k_att, v_att = temporal_shift_kv(k, v, T, self.head_offsets)
        probs = attention_probs(self.attn, q, k) if self.aggregation == "softmax_sum" else None
        attn_out = self.split.attend(
            self.attn, q, k_att, v_att, probs=probs if k_att is k else None, gate_input=a
        )

        scores = self._scores(q, k, probs)  # (B*T, h, [windows,] n): per attention window
        per_clip = (B, T, *scores.shape[1:])
        current, next_scores = scores.reshape(per_clip), None
        self.alignment_error = None
        if self.aligner is not None and T > 1:
            aligned = self.aligner(x.reshape(B, T, N, D), self.aligner_reference).reshape(B * (T - 1), N, D)
            qa, ka, _ = self.split.project_qkv(self.attn, self.norm1(aligned))
            next_scores = self._scores(qa, ka, None).reshape(B, T - 1, *per_clip[2:])
            if self.aligner_reference == "first":  # pair (t, t+1): both frames in frame 1's view
                current = torch.cat([current[:, :1], next_scores], dim=1)
            if self.training and self.track_alignment:
                self.alignment_error = self._alignment_error(x.detach().reshape(B, T, N, D))
        flow = am_flow(current, next_scores).flatten(0, 1)
        flow = self.split.to_tokens(self.attn, flow)  # (B*T, h, N) in the block's token order

        update_attn, e_attn = self.adapter_attn(torch.cat([a, flow.transpose(1, 2)], dim=-1))
        x = x + self.drop_path1(self.ls1(attn_out)) + update_attn
        m = self.norm2(x)
        update_mlp, e_mlp = self.adapter_mlp(m)
        x = x + self.drop_path2(self.ls2(self.mlp(m))) + update_mlp
        pooled = tuple(pool_tokens(e, self.pooling, self.num_prefix_tokens, flow) for e in (e_attn, e_mlp))
        maps = flow if self.maps == "am_flow" else feature_difference(a.reshape(B, T, N, D)).reshape(BT, 1, N)
        if self.grid_positions is not None:
            maps = maps[..., self.grid_positions]
        return x, BlockOutput(embeddings=pooled, maps=maps)


def block_indices(blocks: list[int] | str, depth: int, takes_flow: list[bool] | None = None) -> list[int]:
    """0-based indices of the AM-flow blocks from the config's 1-based list; "all" = every block that can
    take AM flow (``takes_flow``, default every block; Hiera: all but each stage's first block)."""
    takes_flow = takes_flow or [True] * depth
    if blocks == "all":
        return [i for i in range(depth) if takes_flow[i]]
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"blocks {bad} do not exist: the backbone has blocks 1..{depth}")
    return sorted({b - 1 for b in blocks})


class AMFlowExtractor(nn.Module):
    """Frozen timm backbone with AM-flow blocks: video -> the features stage 1 caches (``extract``).

    ``flow_geometry`` holds each flow block's geometry (its maps are (h, N) on its own grid);
    ``num_heads``, ``patch_grid`` and ``num_tokens`` are the first flow block's, every block's for a ViT.

    Args:
        vit: the timm backbone whose AM-flow blocks are already in place (``build_amflow_extractor``).
        cfg: the resolved feature config (recorded with the features).
    """

    def __init__(self, vit: nn.Module, cfg: AMFlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = vit
        self.family = family_of(vit)
        blocks = self.family.blocks(vit)
        geometry = self.family.block_geometry(vit)
        self.flow_block_indices = [i for i, b in enumerate(blocks) if isinstance(b, AMFlowBlock)]
        self.flow_geometry = [geometry[i] for i in self.flow_block_indices]
        first = self.flow_geometry[0]
        self.num_heads = first.heads
        self.embed_dim = self.family.embed_dim(vit)
        self.bottleneck = blocks[self.flow_block_indices[0]].adapter_mlp.down.out_features
        self.num_prefix_tokens = first.prefix_tokens
        self.patch_grid = first.grid
        self.adapter_names = [
            f"block{i + 1}.{place}" for i in self.flow_block_indices for place in ("attn", "mlp")
        ]
        self.flow_block_names = [f"block{i + 1}" for i in self.flow_block_indices]

    @property
    def map_channels(self) -> int:
        """Channels per token of the cached maps: h for AM flow, 1 for the feature-difference control."""
        return self.num_heads if self.cfg.maps == "am_flow" else 1

    @property
    def num_tokens(self) -> int:
        return self.flow_geometry[0].tokens

    @property
    def flow_shapes(self) -> list[tuple[int, int]]:
        """Per flow block, the (channels, tokens) of its maps: h or 1 (``maps``), then N."""
        return [(g.heads if self.cfg.maps == "am_flow" else 1, g.tokens) for g in self.flow_geometry]

    @property
    def flow_layout(self) -> dict[str, tuple[int, tuple[int, int]]]:
        """Per flow block name, its maps' channels and token grid (errors name them when they differ)."""
        return {
            n: (c, g.grid)
            for n, g, (c, _) in zip(self.flow_block_names, self.flow_geometry, self.flow_shapes)
        }

    @property
    def uniform_flow(self) -> bool:
        """Whether every flow block's maps have one shape and grid (every ViT; ``ClipFeatures.flow`` is then
        one tensor, else a list per block)."""
        return len({(g.grid, shape) for g, shape in zip(self.flow_geometry, self.flow_shapes)}) == 1

    def extract(self, video: torch.Tensor) -> ClipFeatures:
        """video: normalised float (B, T, 3, H, W) -> the features stage 1 caches (``ClipFeatures``)."""
        return self.encode(video)[1]

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, ClipFeatures]:
        """The final normed tokens (B*T, N, D), as timm's ``forward_features``, and the clip features.

        With ``vit.set_grad_checkpointing()`` every block's activations are recomputed in the backward
        pass (timm's own switch; used by end-to-end finetuning to save memory).
        """
        B, T = video.shape[:2]
        vit, family = self.vit, self.family
        checkpointing = getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled()
        x = family.embed(vit, video.flatten(0, 1))
        embeddings, flows = [], []
        for blk in family.blocks(vit):
            if isinstance(blk, AMFlowBlock):
                if checkpointing:
                    x, out = checkpoint(blk, x, T, use_reentrant=False)
                else:
                    x, out = blk(x, T)
                embeddings.extend(out.embeddings)
                flows.append(out.maps)
            else:
                x = checkpoint(blk, x, use_reentrant=False) if checkpointing else blk(x)
        x = family.final_norm(vit, x)
        r = embeddings[0].shape[-1]
        if self.uniform_flow:
            flow = torch.stack(flows, dim=1).reshape(B, T, len(flows), *flows[0].shape[1:]).transpose(1, 2)
        else:
            flow = [f.reshape(B, T, *f.shape[1:]) for f in flows]
        return x, ClipFeatures(
            embeddings=torch.stack(embeddings, dim=1).reshape(B, T, -1, r).transpose(1, 2),
            cls=family.pooled(vit, x.reshape(B, T, *x.shape[1:])[:, -1]),
            flow=flow,
        )

    def track_alignment(self, on: bool = True) -> None:
        """Whether training forwards record the aligners' errors for ``alignment_loss`` (costs one more
        aligner forward per block)."""
        for i in self.flow_block_indices:
            self.family.blocks(self.vit)[i].track_alignment = on

    def alignment_loss(self) -> torch.Tensor:
        """The last training forward's alignment error, averaged over the aligner blocks (the optional
        auxiliary loss, our addition); raises when there is none (no aligner, not tracked, not training)."""
        blocks = self.family.blocks(self.vit)
        errors = [blocks[i].alignment_error for i in self.flow_block_indices]
        if any(e is None for e in errors):
            raise RuntimeError(
                "alignment_loss: needs aligning encoders, track_alignment() and a training forward with T > 1"
            )
        return torch.stack(errors).mean()

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for the parameter report (``amflow model-info``)."""
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "amflow_linear": [], "aligning_encoder": []}
        for name, p in self.vit.named_parameters():
            if ".aligner." in name:
                groups["aligning_encoder"].append(p)
            elif ".adapter_" in name:
                groups["amflow_linear"].append(p)
            else:
                groups["backbone"].append(p)
        return groups


def assemble_amflow(cfg: AMFlowConfig, weights: str | None = None) -> AMFlowExtractor:
    """The AM-flow feature model of ``cfg``, initialised from the current RNG state (see the seeded
    ``build_amflow_extractor``); ``weights`` (or ``cfg.backbone.weights``) is a local timm checkpoint.

    Every adapter has the bottleneck ``cfg.bottleneck`` (None: the backbone's output width), so the
    temporal heads read (T, r) sequences whatever the width of the block they sit on.
    """
    bcfg = cfg.backbone
    vit = create_backbone(
        bcfg.name, bcfg.img_size, weights or bcfg.weights, bcfg.pretrained and not weights, **bcfg.timm_kwargs
    )
    freeze(vit)
    family = family_of(vit)
    blocks = family.blocks(vit)
    geometry = family.block_geometry(vit)
    takes_flow = [family.wrappable(b) and not g.pools for b, g in zip(blocks, geometry)]
    indices = block_indices(cfg.blocks, len(blocks), takes_flow)
    for i in indices:
        if not takes_flow[i]:
            why = "pools its tokens (a stage's first block)" if geometry[i].pools else "cannot be wrapped"
            can = [j + 1 for j, ok in enumerate(takes_flow) if ok]
            raise ValueError(
                f"blocks: block {i + 1} of {bcfg.name} ({type(blocks[i]).__name__}) {why}: AM flow needs a "
                f"block whose input and output tokens are the same; blocks that can take AM flow: {can}"
            )
    if not indices:
        raise ValueError(f"blocks: {bcfg.name} has no block that can take AM flow")
    widths = sorted({geometry[i].width for i in indices})
    if cfg.aligning_encoder and any(w % cfg.aligner_heads for w in widths):
        raise ValueError(
            f"aligner_heads={cfg.aligner_heads} must divide every AM-flow block's width {widths}"
        )
    if cfg.pooling == "cls" and family.num_prefix_tokens(vit) == 0:
        raise ValueError(f"pooling: 'cls' needs a CLS token and {bcfg.name} has none; use mean or flow")
    offsets = None
    if bcfg.head_offsets is not None:
        heads = sorted({g.heads for g in geometry})
        if len(heads) > 1:
            raise ValueError(
                f"backbone.head_offsets: STDHA with AM flow needs one head count in every block; "
                f"{bcfg.name} has {heads}"
            )
        offsets = expand_head_offsets(bcfg.head_offsets, heads[0])
        plain = [i for i in range(len(blocks)) if i not in indices]
        if plain:
            use_stdha(vit, offsets, cfg.num_frames, blocks=plain)
    for i in indices:
        blocks[i] = AMFlowBlock(
            blocks[i],
            geometry[i],
            family.split,
            family.grid_positions(vit, i),
            bottleneck=cfg.bottleneck or family.embed_dim(vit),
            aggregation=cfg.aggregation,
            temperature=cfg.temperature,
            pooling=cfg.pooling,
            maps=cfg.maps,
            aligner_heads=cfg.aligner_heads if cfg.aligning_encoder else None,
            aligner_mlp_ratio=cfg.aligner_mlp_ratio,
            aligner_reference=cfg.aligner_reference,
            aligner_position=cfg.aligner_position,
            head_offsets=offsets,
        )
    return AMFlowExtractor(vit, cfg)


def build_amflow_extractor(cfg: AMFlowConfig, weights: str | None = None) -> AMFlowExtractor:
    """The AM-flow feature model, its adapters initialised from ``cfg.seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return assemble_amflow(cfg, weights)
