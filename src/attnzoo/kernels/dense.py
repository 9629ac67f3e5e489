"""Dense softmax attention: through PyTorch's fused SDPA, or returning the log-sum-exp for exact merges.

- :func:`sdpa_attention` — ``scaled_dot_product_attention`` with attnzoo's call conventions (bottom-right causal mask,
  boolean user mask, additive bias, GQA without K/V copies): the fast path of softmax attention and of the methods
  that reduce to it after transforming q, k or v;
- :func:`softmax_attention_lse` — output and log-sum-exp (see :mod:`attnzoo.kernels.merge`);
- :func:`safe_softmax` — a softmax over the visible entries whose fully hidden rows give zeros, not NaN;
- ``flash_cpu``/``flash_cpu_backward`` — PyTorch's CPU flash kernel and its backward (the blockwise kernels' calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnzoo import masks
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv

# PyTorch's CPU flash kernel (what SDPA dispatches to on CPU): returns the row log-sum-exp, and its backward takes it
flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention by ``scaled_dot_product_attention`` with ``enable_gqa`` (no K/V copies).

    A plain causal self-attention call uses ``is_causal=True`` (no mask tensor); other masks are materialised once as
    a boolean (or, with a bias, float) mask.
    """
    gqa = q.shape[1] != k.shape[1]
    if causal and mask is None and bias is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    attn_mask = masks.combine(causal, mask, q.shape[2], k.shape[2], q.device)
    if bias is not None:
        attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)


def softmax_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
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


def safe_softmax(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``seen``; a row that sees nothing gets all-zero weights."""
    s = scores.masked_fill(~seen, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))
