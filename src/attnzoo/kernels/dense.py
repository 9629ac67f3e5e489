"""Dense softmax attention returning the log-sum-exp, for exact merges (see :mod:`attnzoo.kernels.merge`)."""

from __future__ import annotations

import torch

from attnzoo.kernels.blockwise import grouped_logits, grouped_pv


def softmax_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``(B, H, Sq, Dv)`` and its log-sum-exp ``(B, H, Sq)``; GQA without copies.

    Rows with no visible key give output 0 and log-sum-exp ``-inf``.
    """
    s = grouped_logits(q, k, scale)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - finite.unsqueeze(-1))
    return grouped_pv(p, v), lse
