"""Dense softmax attention: through PyTorch's fused SDPA, or returning the log-sum-exp for exact merges.

- :func:`sdpa_attention` — ``scaled_dot_product_attention`` with attnzoo's call conventions (bottom-right causal mask,
  boolean user mask, additive bias, GQA without K/V copies): the fast path of softmax attention and of the methods
  that reduce to it after transforming q, k or v;
- :func:`softmax_attention_lse` — output and log-sum-exp (see :mod:`attnzoo.kernels.merge`), dense scores;
- :func:`attention_lse` — the same with linear memory, differentiable through both outputs: the CPU flash kernel
  with the log-sum-exp's gradient folded into its backward (:func:`lse_grad_inputs`), elsewhere query chunks;
- :func:`safe_softmax` — a softmax over the visible entries whose fully hidden rows give zeros, not NaN;
- ``flash_cpu``/``flash_cpu_backward`` — PyTorch's CPU flash kernel and its backward (the blockwise kernels' calls).
"""

from __future__ import annotations

from typing import Any

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

    Rows with no visible key give output 0 and log-sum-exp ``-inf``, with zero (not NaN) gradients.
    """
    s = grouped_logits(q, k, scale)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    some = (s > float("-inf")).any(dim=-1, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(~some, 0.0), dim=-1, keepdim=True)  # finite everywhere: a safe backward
    p = torch.exp(s - lse)
    return grouped_pv(p, v), lse.squeeze(-1).masked_fill(~some.squeeze(-1), float("-inf"))


# query rows per chunk of attention_lse's portable path: chunk · keys · heads · batch logits at a time
LSE_CHUNK_LOGITS = 1 << 24


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``(B, H, Sq, Dv)`` and its log-sum-exp ``(B, H, Sq)`` without the whole score matrix.

    attnzoo's conventions (bottom-right causal mask, boolean ``mask``, additive ``bias``, GQA). Rows with no visible
    key give 0 and ``-inf``. On CPU with ``D == Dv`` and no ``bias`` needing a gradient: PyTorch's flash kernel
    (:class:`_FlashLSE`, GQA by repeating the K/V heads); elsewhere :func:`softmax_attention_lse` over chunks of
    query rows (:data:`LSE_CHUNK_LOGITS` logits at a time), differentiable by autograd.
    """
    b, h, sq, d = q.shape
    skv = k.shape[2]
    seen = masks.combine(causal, mask, sq, skv, q.device)
    if q.device.type == "cpu" and d == v.shape[-1] and not (bias is not None and bias.requires_grad):
        g = h // k.shape[1]
        k, v = (k, v) if g == 1 else (k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1))
        # the flash kernel reads the last dim as unit-stride: a transposed view gives wrong results, not an error
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        plain_causal = causal and mask is None and bias is None and sq == skv
        attn = None if plain_causal or (seen is None and bias is None) else _additive(seen, bias, q.dtype)
        empty = None if attn is None else (attn == float("-inf")).all(dim=-1).expand(b, h, sq)
        return _FlashLSE.apply(q, k, v, scale, attn, plain_causal, empty)
    rows = max(1, LSE_CHUNK_LOGITS // max(1, b * h * skv))
    parts = []
    for start in range(0, sq, rows):
        stop = min(sq, start + rows)
        part_mask = None if seen is None else seen[..., start:stop, :] if seen.shape[-2] > 1 else seen
        part_bias = None if bias is None else bias[..., start:stop, :] if bias.shape[-2] > 1 else bias
        parts.append(softmax_attention_lse(q[:, :, start:stop], k, v, scale, part_mask, part_bias))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)


def _additive(seen: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``bias`` (or 0) with ``-inf`` where ``seen`` is False: the float mask the CPU flash kernel takes."""
    if seen is None:
        assert bias is not None
        return bias
    zero = torch.zeros((), dtype=dtype, device=seen.device)
    base = zero.expand(seen.shape) if bias is None else bias
    return base.masked_fill(~seen, float("-inf"))


def lse_grad_inputs(
    grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_out, q, k, v, out)`` for a flash backward that also carries the log-sum-exp's gradient ``grad_lse``.

    ``∂L_i/∂s_ij = p_ij``, so the logits' gradient becomes ``p ∘ (dP − δ + g)`` with ``dP = dO Vᵀ`` and
    ``δ = rowsum(dO ∘ O)``. A flash backward computes ``δ`` from the ``out`` it is given: appending a column of ones
    to V and ``g`` to dO adds ``g`` to ``dP``, while the 0 appended to O keeps ``δ`` as it was. A zero column appended
    to q and k keeps the logits and equal head dims. The kernel's ``dq[..., :D]``, ``dk[..., :D]``, ``dv[..., :Dv]``
    are then the gradients of ``⟨dO, O⟩ + ⟨g, L⟩``. ``grad_lse`` must be 0 on rows with no visible key.
    """
    def widen(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], dim=-1)

    dv = v.shape[-1]
    if q.shape[-1] != dv:  # the appended column must keep the CPU kernel's equal head dims
        raise ValueError(f"q, v: expected equal head dims for the flash backward, got {q.shape[-1]} and {dv}")
    return (torch.cat([grad_out, grad_lse.unsqueeze(-1).to(grad_out.dtype)], dim=-1), widen(q, 0.0), widen(k, 0.0),
            widen(v, 1.0), widen(out, 0.0))


class _FlashLSE(torch.autograd.Function):
    """PyTorch's CPU flash kernel returning ``(out, lse)``, both differentiable (``empty``: rows seeing no key)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                attn: torch.Tensor | None, is_causal: bool, empty: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        out, lse = flash_cpu(q, k, v, 0.0, is_causal, attn_mask=attn, scale=scale)[:2]
        if empty is not None:
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(empty, float("-inf"))
        ctx.save_for_backward(q, k, v, out, lse, attn, empty)
        ctx.scale, ctx.is_causal = scale, is_causal
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse, attn, empty = ctx.saved_tensors
        d, dv = q.shape[-1], v.shape[-1]
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        if empty is not None:  # rows that saw nothing: p = exp(s − ∞) = 0, so no gradient reaches them
            lse = lse.masked_fill(empty, float("inf"))
        args = (grad_out, q, k, v, out)
        if grad_lse is not None:
            grad_lse = grad_lse if empty is None else grad_lse.masked_fill(empty, 0.0)
            args = lse_grad_inputs(grad_out, grad_lse, q, k, v, out)
        dq, dk, dvv = flash_cpu_backward(*args, lse, 0.0, ctx.is_causal, attn_mask=attn, scale=ctx.scale)
        return dq[..., :d], dk[..., :d], dvv[..., :dv], None, None, None, None


def safe_softmax(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``seen``; a row that sees nothing gets all-zero weights."""
    s = scores.masked_fill(~seen, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))
