"""Temporal heads and the averaging classifier (paper 000, sec. 3.2; METHOD.md section 3).

Every head type is *grouped*: G independent heads (one per adapter or per AM-flow block) with their own
weights run as one batched computation on ``(B, G, T, F)`` inputs, so training 25 heads is one step,
not 25 Python loops. The same modules run inside the end-to-end model and in stage 2 on cached features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadsConfig:
    """Temporal heads, AM-flow map heads, last-frame branch and how branch logits are combined."""

    type: Literal["lstm", "tcn", "transformer"] = "lstm"
    hidden: int = 768  # LSTM / TCN hidden size; transformer width is the input size r
    layers: int = 3
    kernel: int = 3  # TCN kernel (dilation doubles per layer)
    attn_heads: int = 8  # transformer
    ff_dim: int = 1280  # transformer feed-forward width
    max_frames: int = 64  # transformer temporal position embedding length
    dropout: float = 0.0
    # AM-flow map heads (our addition): per flow block, maps pooled to a grid, a small encoder, a head.
    flow_maps: bool = False
    flow_grid: int = 8
    flow_embed: int = 128
    flow_hidden: int = 128
    flow_layers: int = 1
    last_frame: bool = True
    combine: Literal["mean", "voting"] = "mean"

    def validate(self) -> None:
        for key in ("hidden", "layers", "kernel", "attn_heads", "ff_dim", "max_frames"):
            if getattr(self, key) < 1:
                raise ValueError(f"heads.{key} must be >= 1, got {getattr(self, key)}")
        if self.flow_maps and min(self.flow_grid, self.flow_embed, self.flow_hidden, self.flow_layers) < 1:
            raise ValueError("heads.flow_grid, flow_embed, flow_hidden and flow_layers must be >= 1")


class GroupedLinear(nn.Module):
    """G independent linear layers applied to the G slots of ``(..., G, ..., in)`` in one einsum."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features)) if bias else None
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per group
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, G, *, in) -> (B, G, *, out)."""
        shape = x.shape
        x = x.reshape(shape[0], shape[1], -1, shape[-1])
        y = torch.einsum("bgni,gio->bgno", x, self.weight)
        if self.bias is not None:
            y = y + self.bias[None, :, None, :]
        return y.reshape(*shape[:-1], y.shape[-1])


class GroupedLayerNorm(nn.Module):
    """LayerNorm over the last dim with a separate affine per group; input (B, G, *, D)."""

    def __init__(self, groups: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups, dim))
        self.bias = nn.Parameter(torch.zeros(groups, dim))
        self.eps = eps

    def no_weight_decay(self) -> set[str]:
        """Trained without weight decay (timm's convention): a norm's gain and shift."""
        return {"weight", "bias"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        view = (1, x.shape[1]) + (1,) * (x.dim() - 3) + (x.shape[-1],)
        return y * self.weight.view(view) + self.bias.view(view)


class LSTMHeads(nn.Module):
    """G stacked LSTMs (nn.LSTM's equations and parameter count), last hidden state -> C logits."""

    def __init__(
        self, groups: int, in_dim: int, hidden: int, layers: int, num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.input_proj = nn.ModuleList(
            [GroupedLinear(groups, in_dim if i == 0 else hidden, 4 * hidden) for i in range(layers)]
        )
        self.recurrent = nn.ModuleList([GroupedLinear(groups, hidden, 4 * hidden) for _ in range(layers)])
        for lin in (*self.input_proj, *self.recurrent):  # nn.LSTM initialises all with 1/sqrt(hidden)
            nn.init.uniform_(lin.weight, -(hidden**-0.5), hidden**-0.5)
            nn.init.uniform_(lin.bias, -(hidden**-0.5), hidden**-0.5)
        self.dropout = nn.Dropout(dropout)
        self.classifier = GroupedLinear(groups, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, G, T, in) -> logits (B, G, C)."""
        B, G, T, _ = x.shape
        for layer, (inp, rec) in enumerate(zip(self.input_proj, self.recurrent)):
            if layer > 0:
                x = self.dropout(x)
            gates_in = inp(x)  # all time steps at once: (B, G, T, 4H)
            h = x.new_zeros(B, G, self.hidden)
            c = x.new_zeros(B, G, self.hidden)
            outputs = []
            for t in range(T):
                i, f, g, o = (gates_in[:, :, t] + rec(h)).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=2)
        return self.classifier(self.dropout(h))


class TCNHeads(nn.Module):
    """G temporal convolution stacks: 1x1 projection, residual dilated convs, mean over time -> logits."""

    def __init__(
        self,
        groups: int,
        in_dim: int,
        hidden: int,
        layers: int,
        num_classes: int,
        kernel: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.input_proj = GroupedLinear(groups, in_dim, hidden)
        self.convs = nn.ModuleList([GroupedLinear(groups, kernel * hidden, hidden) for _ in range(layers)])
        self.dropout = nn.Dropout(dropout)
        self.classifier = GroupedLinear(groups, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, G, T, in) -> logits (B, G, C)."""
        x = self.input_proj(x)
        T = x.shape[2]
        for layer, conv in enumerate(self.convs):
            dilation = 2**layer
            pad = dilation * (self.kernel - 1) // 2
            xp = F.pad(x, (0, 0, pad, dilation * (self.kernel - 1) - pad))  # "same" padding in time
            taps = torch.cat([xp[:, :, j * dilation : j * dilation + T] for j in range(self.kernel)], dim=-1)
            x = x + self.dropout(F.relu(conv(taps)))
        return self.classifier(x.mean(dim=2))


class TransformerHeads(nn.Module):
    """G pre-norm transformer encoders over [CLS; frames] with a temporal position embedding."""

    def __init__(
        self,
        groups: int,
        dim: int,
        layers: int,
        num_classes: int,
        attn_heads: int = 8,
        ff_dim: int = 1280,
        max_frames: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % attn_heads:
            raise ValueError(f"heads.attn_heads={attn_heads} must divide the input size {dim}")
        self.attn_heads = attn_heads
        self.cls_token = nn.Parameter(torch.zeros(groups, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(groups, max_frames + 1, dim) * 0.02)
        self.norm1 = nn.ModuleList([GroupedLayerNorm(groups, dim) for _ in range(layers)])
        self.qkv = nn.ModuleList([GroupedLinear(groups, dim, 3 * dim) for _ in range(layers)])
        self.proj = nn.ModuleList([GroupedLinear(groups, dim, dim) for _ in range(layers)])
        self.norm2 = nn.ModuleList([GroupedLayerNorm(groups, dim) for _ in range(layers)])
        self.fc1 = nn.ModuleList([GroupedLinear(groups, dim, ff_dim) for _ in range(layers)])
        self.fc2 = nn.ModuleList([GroupedLinear(groups, ff_dim, dim) for _ in range(layers)])
        self.norm = GroupedLayerNorm(groups, dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = GroupedLinear(groups, dim, num_classes)

    def no_weight_decay(self) -> set[str]:
        """Trained without weight decay (timm's convention): the class token and the time positions."""
        return {"cls_token", "pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, G, T, dim) -> logits (B, G, C)."""
        B, G, T, D = x.shape
        if self.pos_embed.shape[1] < T + 1:
            raise ValueError(f"{T} frames exceed heads.max_frames={self.pos_embed.shape[1] - 1}")
        x = torch.cat([self.cls_token.unsqueeze(0).expand(B, -1, -1, -1), x], dim=2)
        x = x + self.pos_embed[None, :, : T + 1]
        h, d = self.attn_heads, D // self.attn_heads
        for norm1, qkv, proj, norm2, fc1, fc2 in zip(
            self.norm1, self.qkv, self.proj, self.norm2, self.fc1, self.fc2
        ):
            q, k, v = qkv(norm1(x)).reshape(B * G, T + 1, 3, h, d).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout.p if self.training else 0.0)
            x = x + self.dropout(proj(a.transpose(1, 2).reshape(B, G, T + 1, D)))
            x = x + self.dropout(fc2(F.gelu(fc1(norm2(x)))))
        return self.classifier(self.norm(x[:, :, 0]))


def build_temporal_heads(
    cfg: HeadsConfig,
    groups: int,
    in_dim: int,
    num_classes: int,
    hidden: int | None = None,
    layers: int | None = None,
) -> nn.Module:
    """The ``cfg.type`` heads for ``groups`` sequences of ``in_dim`` features (sizes overridable)."""
    hidden = cfg.hidden if hidden is None else hidden
    layers = cfg.layers if layers is None else layers
    if cfg.type == "lstm":
        return LSTMHeads(groups, in_dim, hidden, layers, num_classes, cfg.dropout)
    if cfg.type == "tcn":
        return TCNHeads(groups, in_dim, hidden, layers, num_classes, cfg.kernel, cfg.dropout)
    if cfg.type == "transformer":
        return TransformerHeads(
            groups, in_dim, layers, num_classes, cfg.attn_heads, cfg.ff_dim, cfg.max_frames, cfg.dropout
        )
    raise ValueError(f"heads.type: expected lstm, tcn or transformer, got {cfg.type!r}")


class FlowMapEncoder(nn.Module):
    """Per flow block: each token's flow summed over heads (as the ``flow`` pooling weighs tokens), the map
    pooled to a small grid and layer-normalised, then a 2-layer MLP.

    Summing over heads mattered: on the demo's motion-only clips (random-init ViT-Tiny, static camera) LSTM
    heads reading the h per-head maps stayed near chance (31%) while the head-summed maps reached 81%. The
    layer norm makes the heads see where things move whatever the flow's overall scale (tiny for a
    random-init backbone, whose attention is nearly uniform).
    """

    def __init__(self, groups: int, grid: tuple[int, int], out_grid: int, embed: int) -> None:
        super().__init__()
        self.grid = grid
        self.out_grid = (min(out_grid, grid[0]), min(out_grid, grid[1]))
        in_dim = self.out_grid[0] * self.out_grid[1]
        self.norm = GroupedLayerNorm(groups, in_dim)
        self.fc1 = GroupedLinear(groups, in_dim, embed)
        self.fc2 = GroupedLinear(groups, embed, embed)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """maps: (B, G, T, h, P) over the P = gh*gw patch tokens -> (B, G, T, embed)."""
        B, G, T, h, P = maps.shape
        x = maps.sum(dim=3).reshape(B * G * T, 1, *self.grid)
        x = F.adaptive_avg_pool2d(x, self.out_grid).reshape(B, G, T, -1)
        return self.fc2(F.relu(self.fc1(self.norm(x))))


@dataclass
class ClipFeatures:
    """What stage 1 computes per clip and stage 2 reads back from the cache.

    ``embeddings``: (B, A, T, r) pooled adapter embeddings E; ``flow``: (B, F, T, h, N) AM-flow maps of
    the flow blocks (all N tokens, prefix tokens first) or None; ``cls``: (B, D) final normed CLS of
    the last frame.
    """

    embeddings: torch.Tensor
    cls: torch.Tensor
    flow: torch.Tensor | None = None


class AveragingClassifier(nn.Module):
    """All branches -> logits averaged (or a frozen random voting layer): paper 000, sec. 3.2.

    Branches: one temporal head per adapter sequence, optional AM-flow map heads (one per flow block),
    and a linear classifier on the last frame's CLS.
    """

    def __init__(
        self,
        cfg: HeadsConfig,
        num_classes: int,
        num_adapters: int,
        embed_dim: int,
        cls_dim: int,
        flow_blocks: int = 0,
        patch_grid: tuple[int, int] | None = None,
        num_prefix_tokens: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_prefix_tokens = num_prefix_tokens
        self.temporal_heads = (
            build_temporal_heads(cfg, num_adapters, embed_dim, num_classes) if num_adapters else None
        )
        self.flow_encoder = self.flow_heads = None
        if cfg.flow_maps:
            if not flow_blocks or patch_grid is None:
                raise ValueError("heads.flow_maps is on but the features hold no AM-flow maps")
            self.flow_encoder = FlowMapEncoder(flow_blocks, patch_grid, cfg.flow_grid, cfg.flow_embed)
            self.flow_heads = build_temporal_heads(
                cfg, flow_blocks, cfg.flow_embed, num_classes, cfg.flow_hidden, cfg.flow_layers
            )
        self.last_frame_head = nn.Linear(cls_dim, num_classes) if cfg.last_frame else None
        self.num_branches = num_adapters * (self.temporal_heads is not None) + flow_blocks * cfg.flow_maps
        self.num_branches += int(cfg.last_frame)
        if self.num_branches == 0:
            raise ValueError("the classifier has no branch: no adapters, no flow maps and no last-frame head")
        self.voting = None
        if cfg.combine == "voting":
            generator = torch.Generator().manual_seed(seed)
            self.voting = nn.Linear(self.num_branches * num_classes, num_classes)
            bound = 1.0 / math.sqrt(self.num_branches * num_classes)
            with torch.no_grad():
                self.voting.weight.uniform_(-bound, bound, generator=generator)
                self.voting.bias.uniform_(-bound, bound, generator=generator)
            self.voting.requires_grad_(False)

    def branch_logits(self, features: ClipFeatures) -> torch.Tensor:
        """Every branch's logits, stacked: (B, K, C) in the order adapters, flow blocks, last frame."""
        parts = []
        if self.temporal_heads is not None:
            parts.append(self.temporal_heads(features.embeddings))
        if self.flow_heads is not None:
            if features.flow is None:
                raise ValueError("heads.flow_maps is on but these features carry no AM-flow maps")
            maps = features.flow[..., self.num_prefix_tokens :]
            parts.append(self.flow_heads(self.flow_encoder(maps)))
        if self.last_frame_head is not None:
            parts.append(self.last_frame_head(features.cls).unsqueeze(1))
        return torch.cat(parts, dim=1)

    def forward(self, features: ClipFeatures) -> torch.Tensor:
        """Clip logits (B, C): the mean of the branch logits, or the voting layer over them."""
        logits = self.branch_logits(features)
        if self.voting is not None:
            return self.voting(logits.flatten(1))
        return logits.mean(dim=1)
