"""AM flow: the change of attention maps between consecutive frames (paper 000, eqs. 1-4; METHOD.md s1)."""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["sum_softmax", "softmax_sum"]


def attention_scores_sum_softmax(
    q: torch.Tensor, k: torch.Tensor, temperature: float | None = None
) -> torch.Tensor:
    """``s = softmax_j( sum_i X_A[i, j] / tau )`` with ``X_A = q k^T / sqrt(d)`` (eq. 1), in O(N*d).

    Uses ``sum_i q_i . k_j = (sum_i q_i) . k_j``: no N x N matrix. ``tau`` defaults to N (a mean over
    queries, METHOD.md's temperature); ``temperature=1`` is the plain sum. q, k: (B, h, N, d) -> (B, h, N);
    with local attention (B, h, windows, n, d) -> (B, h, windows, n), one distribution per window over
    its own n keys (METHOD.md s8).
    """
    N, d = q.shape[-2], q.shape[-1]
    tau = float(N) if temperature is None else temperature
    logits = torch.einsum("...d,...nd->...n", q.sum(dim=-2), k) / (d**0.5 * tau)
    return logits.softmax(dim=-1)


def attention_scores_softmax_sum(probs: torch.Tensor) -> torch.Tensor:
    """``s = (1/N) sum_i softmax_j(X_A)[i, j]``, the mean attention each key gets: (B,h,N,N) -> (B,h,N);
    per window with local attention, (B, h, windows, n, n) -> (B, h, windows, n)."""
    return probs.mean(dim=-2)


def am_flow(scores: torch.Tensor, next_scores: torch.Tensor | None = None) -> torch.Tensor:
    """eq. 4: ``AMFlow_t = N * |s_t - s_{t+1}|`` for scores (B, T, h, N); the last frame repeats (T-1, T).

    ``next_scores`` (B, T-1, h, N) are frame t+1's scores as seen from frame t (e.g. after an aligning
    encoder); by default frame t+1's own scores. A static clip gives exactly zero flow. Scores per
    attention window (B, T, h, windows, n) use N = n, the keys each distribution is over.
    """
    T, N = scores.shape[1], scores.shape[-1]
    if T == 1:
        return torch.zeros_like(scores)
    following = scores[:, 1:] if next_scores is None else next_scores
    flow = N * (scores[:, :-1] - following).abs()
    return torch.cat([flow, flow[:, -1:]], dim=1)


def feature_difference(x: torch.Tensor) -> torch.Tensor:
    """The control of METHOD.md s7: mean |x_{t+1} - x_t| per token, (B, T, N, D) -> (B, T, 1, N).

    Like eq. 4, the last frame repeats the (T-1, T) pair.
    """
    if x.shape[1] == 1:
        return x.new_zeros(x.shape[0], 1, 1, x.shape[2])
    diff = (x[:, 1:] - x[:, :-1]).abs().mean(dim=-1)
    return torch.cat([diff, diff[:, -1:]], dim=1).unsqueeze(2)
