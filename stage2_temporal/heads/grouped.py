"""Grouped layers: G independent layers with their own weights applied in one batched computation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupedLinear(nn.Module):
    """G independent linear layers applied to the G slots of ``(..., G, ..., in)`` in one einsum.

    Args:
        groups: number of independent layers G.
        in_features: input size per group.
        out_features: output size per group.
        bias: whether each group has a bias.
    """

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
    """LayerNorm over the last dim with a separate affine per group; input (B, G, *, D).

    Args:
        groups: number of groups G.
        dim: normalised size D.
        eps: added to the variance, as ``nn.LayerNorm``.
    """

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
