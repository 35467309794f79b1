"""The AM-flow model: scaled parallel adapters fed with AM flow on a frozen timm ViT (paper 000).

``build_amflow(cfg)`` assembles it in one visible function: timm's ViT, its chosen blocks swapped for
``AMFlowBlock`` (which keeps the block's own submodules, so timm's state-dict keys are unchanged), and
an ``AveragingClassifier``. ``extract`` gives the features stage 1 caches; ``classifier`` maps them to
logits, so stage 2 trains the very same modules from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from stage1_extract.am_flow import (
    am_flow,
    attention_scores_softmax_sum,
    attention_scores_sum_softmax,
    feature_difference,
)
from stage1_extract.attention import attend, attention_probs, project_qkv
from stage1_extract.backbone import create_vit, freeze
from stage1_extract.heads import AveragingClassifier, ClipFeatures, HeadsConfig
from stage1_extract.model_config import BackboneConfig
from stage1_extract.stdha import expand_head_offsets, temporal_shift_kv, use_stdha


@dataclass
class AMFlowConfig:
    """An AM-flow model: backbone, which blocks get AM flow + adapters, and the classifier's heads."""

    kind: Literal["amflow"] = "amflow"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_frames: int = 8
    num_classes: int = 31
    # 1-based block numbers with AM flow and adapters, as the paper writes AM/2(1,12); "all" = AM/L.
    blocks: list[int] | Literal["all"] = "all"
    aggregation: Literal["sum_softmax", "softmax_sum"] = "sum_softmax"
    temperature: float | None = None  # sum_softmax: divides summed logits; None = N (mean over queries)
    aligning_encoder: bool = False
    aligner_heads: int = 12
    aligner_mlp_ratio: float = 4 / 3
    bottleneck: int | None = None  # adapter width r; None = the backbone width D
    pooling: Literal["mean", "cls", "flow"] = "mean"
    # What the per-token maps of the features hold: AM flow (h per token), or METHOD.md s7's control,
    # the frame-to-frame difference of the block's normed token features (1 per token).
    maps: Literal["am_flow", "feature_diff"] = "am_flow"
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    seed: int = 0

    def validate(self) -> None:
        if self.num_frames < 1 or self.num_classes < 1:
            raise ValueError("num_frames and num_classes must be >= 1")
        if self.blocks != "all" and (not self.blocks or min(self.blocks) < 1):
            raise ValueError(f"blocks: expected 'all' or 1-based block numbers, got {self.blocks}")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")


class ParallelAdapter(nn.Module):
    """Scaled parallel adapter (paper 000, eq. 5): ``s * W_up(E)``, ``E = ReLU(W_down(x))``.

    ``W_up`` is zero-initialised, so at initialisation the adapted block returns exactly the frozen
    block's output; ``W_down`` is random, so ``E`` is informative from the start.
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
    """Aligns frame t+1 to frame t before its attention map is taken (moving cameras; METHOD.md s1)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=num_heads,
            dim_feedforward=round(dim * mlp_ratio),
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.frame_embed = nn.Parameter(torch.zeros(2, dim))
        nn.init.trunc_normal_(self.frame_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Trained without weight decay (timm's convention): the two frames' position embeddings."""
        return {"frame_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, N, D) -> frames 2..T aligned to their predecessors, (B, T-1, N, D)."""
        B, T, N, D = x.shape
        pairs = torch.cat([x[:, :-1] + self.frame_embed[0], x[:, 1:] + self.frame_embed[1]], dim=2)
        out = self.layer(pairs.reshape(B * (T - 1), 2 * N, D))
        return out[:, N:].reshape(B, T - 1, N, D)


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
    """A timm ViT block with AM flow and two scaled parallel adapters (paper 000, eq. 5).

    Holds the original block's modules under their own names (``norm1``, ``attn``, ``ls1``, ...), so a
    plain timm checkpoint loads into it unchanged. The attention is computed once: its q and k also
    give the block's AM flow.
    """

    def __init__(self, block: Block, cfg: AMFlowConfig, num_prefix_tokens: int) -> None:
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        dim, heads = block.norm1.normalized_shape[0], block.attn.num_heads
        r = cfg.bottleneck or dim
        self.aggregation = cfg.aggregation
        self.temperature = cfg.temperature
        self.pooling = cfg.pooling
        self.maps = cfg.maps
        self.num_prefix_tokens = num_prefix_tokens
        self.head_offsets: list[int] | None = None  # STDHA, set by build_amflow when configured
        self.adapter_attn = ParallelAdapter(dim + heads, r, dim)
        self.adapter_mlp = ParallelAdapter(dim, r, dim)
        self.aligner = (
            AligningEncoder(dim, cfg.aligner_heads, cfg.aligner_mlp_ratio) if cfg.aligning_encoder else None
        )

    def _scores(self, q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        if self.aggregation == "softmax_sum":
            return attention_scores_softmax_sum(
                probs if probs is not None else attention_probs(self.attn, q, k)
            )
        return attention_scores_sum_softmax(q, k, self.temperature)

    def forward(self, x: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, BlockOutput]:
        """x: (B*T, N, D), frames of a clip contiguous -> (x, BlockOutput)."""
        BT, N, D = x.shape
        B, T = BT // num_frames, num_frames
        a = self.norm1(x)
        q, k, v = project_qkv(self.attn, a)
        k_att, v_att = k, v
        if self.head_offsets is not None:
            k_att, v_att = temporal_shift_kv(k, v, T, self.head_offsets)
        probs = attention_probs(self.attn, q, k) if self.aggregation == "softmax_sum" else None
        attn_out = attend(self.attn, q, k_att, v_att, probs=probs if k_att is k else None, gate_input=a)

        h = q.shape[1]
        scores = self._scores(q, k, probs).reshape(B, T, h, N)
        next_scores = None
        if self.aligner is not None and T > 1:
            aligned = self.aligner(x.reshape(B, T, N, D)).reshape(B * (T - 1), N, D)
            qa, ka, _ = project_qkv(self.attn, self.norm1(aligned))
            next_scores = self._scores(qa, ka, None).reshape(B, T - 1, h, N)
        flow = am_flow(scores, next_scores).reshape(BT, h, N)

        update_attn, e_attn = self.adapter_attn(torch.cat([a, flow.transpose(1, 2)], dim=-1))
        x = x + self.drop_path1(self.ls1(attn_out)) + update_attn
        m = self.norm2(x)
        update_mlp, e_mlp = self.adapter_mlp(m)
        x = x + self.drop_path2(self.ls2(self.mlp(m))) + update_mlp
        pooled = tuple(pool_tokens(e, self.pooling, self.num_prefix_tokens, flow) for e in (e_attn, e_mlp))
        maps = flow if self.maps == "am_flow" else feature_difference(a.reshape(B, T, N, D)).reshape(BT, 1, N)
        return x, BlockOutput(embeddings=pooled, maps=maps)


def block_indices(blocks: list[int] | str, depth: int) -> list[int]:
    """0-based indices of the AM-flow blocks from the config's 1-based list (or "all")."""
    if blocks == "all":
        return list(range(depth))
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"blocks {bad} do not exist: the backbone has blocks 1..{depth}")
    return sorted({b - 1 for b in blocks})


class AMFlowModel(nn.Module):
    """Frozen timm ViT + AM-flow adapters (``extract``) + averaging classifier (``classifier``)."""

    def __init__(self, vit: VisionTransformer, cfg: AMFlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = vit
        self.flow_block_indices = [i for i, b in enumerate(vit.blocks) if isinstance(b, AMFlowBlock)]
        first = vit.blocks[self.flow_block_indices[0]]
        self.num_heads = first.attn.num_heads
        self.embed_dim = vit.embed_dim
        self.bottleneck = first.adapter_mlp.down.out_features
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.patch_grid = tuple(vit.patch_embed.grid_size)
        self.adapter_names = [
            f"block{i + 1}.{place}" for i in self.flow_block_indices for place in ("attn", "mlp")
        ]
        self.flow_block_names = [f"block{i + 1}" for i in self.flow_block_indices]
        self.classifier = AveragingClassifier(
            cfg.heads,
            num_classes=cfg.num_classes,
            num_adapters=len(self.adapter_names),
            embed_dim=self.bottleneck,
            cls_dim=self.embed_dim,
            flow_blocks=len(self.flow_block_indices),
            patch_grid=self.patch_grid,
            num_prefix_tokens=self.num_prefix_tokens,
            seed=cfg.seed,
        )

    @property
    def map_channels(self) -> int:
        """Channels per token of the cached maps: h for AM flow, 1 for the feature-difference control."""
        return self.num_heads if self.cfg.maps == "am_flow" else 1

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.patch_grid[0] * self.patch_grid[1]

    def extract(self, video: torch.Tensor) -> ClipFeatures:
        """video: normalised float (B, T, 3, H, W) -> the features stage 1 caches (``ClipFeatures``)."""
        return self.encode(video)[1]

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, ClipFeatures]:
        """The final normed tokens (B*T, N, D), as timm's ``forward_features``, and the clip features."""
        B, T = video.shape[:2]
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(video.flatten(0, 1)))))
        embeddings, flows = [], []
        recompute = vit.grad_checkpointing and torch.is_grad_enabled()  # timm's set_grad_checkpointing
        for blk in vit.blocks:
            args = (x, T) if isinstance(blk, AMFlowBlock) else (x,)
            y = checkpoint(blk, *args, use_reentrant=False) if recompute else blk(*args)
            if isinstance(blk, AMFlowBlock):
                x, out = y
                embeddings.extend(out.embeddings)
                flows.append(out.maps)
            else:
                x = y
        x = vit.norm(x)
        r = embeddings[0].shape[-1]
        return x, ClipFeatures(
            embeddings=torch.stack(embeddings, dim=1).reshape(B, T, -1, r).transpose(1, 2),
            cls=x.reshape(B, T, *x.shape[1:])[:, -1, 0],
            flow=torch.stack(flows, dim=1).reshape(B, T, len(flows), *flows[0].shape[1:]).transpose(1, 2),
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, T, 3, H, W) -> clip logits (B, C)."""
        return self.classifier(self.extract(video))

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for the parameter report (``amflow model-info``)."""
        groups: dict[str, list[nn.Parameter]] = {
            "backbone": [],
            "amflow_linear": [],
            "aligning_encoder": [],
            "temporal_heads": [],
            "last_frame_head": [],
        }
        for name, p in self.vit.named_parameters():
            if ".aligner." in name:
                groups["aligning_encoder"].append(p)
            elif ".adapter_" in name:
                groups["amflow_linear"].append(p)
            else:
                groups["backbone"].append(p)
        for name, p in self.classifier.named_parameters():
            key = "last_frame_head" if name.startswith("last_frame_head.") else "temporal_heads"
            groups[key].append(p)
        return groups


def build_amflow(cfg: AMFlowConfig, weights: str | None = None) -> AMFlowModel:
    """Builds the AM-flow model from its config: frozen timm ViT, adapted blocks, classifier.

    Adapters and heads are initialised from ``cfg.seed``; ``weights`` (or ``cfg.backbone.weights``) is a
    local plain-timm checkpoint loaded with its keys unchanged.
    """
    torch.manual_seed(cfg.seed)
    bcfg = cfg.backbone
    vit = create_vit(bcfg.name, bcfg.img_size, weights or bcfg.weights, **bcfg.timm_kwargs)
    freeze(vit)
    indices = block_indices(cfg.blocks, len(vit.blocks))
    offsets = None
    if bcfg.head_offsets is not None:
        offsets = expand_head_offsets(bcfg.head_offsets, vit.blocks[0].attn.num_heads)
        plain = [i for i in range(len(vit.blocks)) if i not in indices]
        if plain:
            use_stdha(vit, offsets, cfg.num_frames, blocks=plain)
    for i in indices:
        block = vit.blocks[i]
        if type(block) is not Block:
            raise ValueError(f"block {i + 1} of {bcfg.name} is a {type(block).__name__}, not timm's Block")
        adapted = AMFlowBlock(block, cfg, vit.num_prefix_tokens)
        adapted.head_offsets = offsets
        vit.blocks[i] = adapted
    return AMFlowModel(vit, cfg)
