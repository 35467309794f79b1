"""timm's ViT attention split in two steps, so adapters can read or edit Q, K, V in between.

``project_qkv`` then ``attend`` computes exactly what ``timm.layers.Attention.forward`` computes
(same projections, same fused or explicit kernel), which lets AM flow (eq. 1-4) read the block's own
q and k, and STDHA swap K/V between frames, without a second qkv projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention


def project_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``x`` (B, N, D), each (B, h, N, d), after timm's ``q_norm``/``k_norm``."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_probs(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities (B, h, N, N): only for modes that need the full map."""
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def attend(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    probs: torch.Tensor | None = None,
    gate_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (B, N, D) from q, k, v (B, h, N, d), then timm's norm, gate, proj and dropout.

    With ``probs`` (already computed, e.g. for ``softmax_sum`` AM flow) they are reused instead of a
    second attention pass. ``gate_input`` is the block input, needed only by gated timm attentions.
    """
    B, _, N, _ = q.shape
    if probs is not None:
        x = attn.attn_drop(probs) @ v
    elif attn.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        x = attn.attn_drop(attention_probs(attn, q, k)) @ v
    x = x.transpose(1, 2).reshape(B, N, attn.attn_dim)
    x = attn.norm(x)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        if gate_input is None:
            raise ValueError("this timm attention is gated: attend() needs gate_input (the block input)")
        x = x * gate(gate_input).sigmoid()
    return attn.proj_drop(attn.proj(x))


class TimmAttentionSplit:
    """timm's ``Attention`` in steps (``families.base.AttentionSplit``): global attention, one window."""

    project_qkv = staticmethod(project_qkv)
    attend = staticmethod(attend)

    @staticmethod
    def to_tokens(attn: Attention, values: torch.Tensor) -> torch.Tensor:
        """Per-key values (B, h, N) are already per token."""
        return values
