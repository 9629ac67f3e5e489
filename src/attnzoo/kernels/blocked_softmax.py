"""Query-blocked softmax attention with hooks on the logits and on the weights.

Many softmax-form variants differ from softmax attention only in what they do to one row of logits before the
softmax (soft-capping, ALiBi, keeping the top k) or to one row of weights after it (a relative-position re-weighting).
This kernel computes ``O = post(softmax(select(mod(scale · Q Kᵀ) + bias, visible))) V`` one block of query rows at a
time, so memory is O(rows · Skv) instead of O(Sq · Skv), and each block is checkpointed under autograd
(:func:`attnzoo.kernels.blockwise.query_blocks`). GQA stacks the query heads of a group: no K/V copies.

Hooks see absolute query indices ``[start, end)`` so position-dependent terms can be built for the block alone:
- ``score_mod(s, start, end)``: on the scaled logits ``(B, H, rows, Skv)``, before the bias and the masks;
- ``select(s)``: on the logits after the bias and with hidden keys at ``-inf`` (may hide more keys with ``-inf``);
- ``prob_mod(p, start, end)``: on the normalised weights, before the product with V.

A row with no visible key gives weights 0 (never NaN, forward or backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnzoo import masks
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv, query_blocks

ScoreHook = Callable[[torch.Tensor, int, int], torch.Tensor]
SelectHook = Callable[[torch.Tensor], torch.Tensor]

SCORES_PER_BLOCK = 1 << 24


def block_rows(batch: int, heads: int, seq_q: int, seq_kv: int, scores_per_block: int = SCORES_PER_BLOCK) -> int:
    """Query rows per block so that one block's logits hold about ``scores_per_block`` elements (at least 16)."""
    return max(16, min(seq_q, scores_per_block // max(1, batch * heads * seq_kv)))


def safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; a row that is all ``-inf`` gives zeros (and zero gradients)."""
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def blocked_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    score_mod: ScoreHook | None = None,
    select: SelectHook | None = None,
    prob_mod: ScoreHook | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Softmax attention ``(B, H, Sq, Dv)`` computed by query blocks, with the hooks described in the module doc.

    ``causal`` is bottom-right aligned; ``mask`` (bool) and ``bias`` (float) broadcast to ``(B, H, Sq, Skv)``.
    """
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    rows = block if block is not None else block_rows(b, h, sq, skv)
    causal_mod = masks.causal(sq, skv) if causal else None
    # Scale q before the product: in fp16/bf16 the unscaled dot products could overflow where the logits do not.
    q_scaled = (q * scale).contiguous()

    def attend(q_rows: torch.Tensor, start: int) -> torch.Tensor:
        end = start + q_rows.shape[2]
        s = grouped_logits(q_rows, k, 1.0)
        if score_mod is not None:
            s = score_mod(s, start, end)
        if bias is not None:
            s = s + masks.rows(bias, start, end)
        hidden = None if mask is None else ~masks.rows(mask, start, end)
        if causal_mod is not None:
            future = ~masks.dense_rows(causal_mod, 1, 1, start, end, skv, q.device)
            hidden = future if hidden is None else hidden | future
        if hidden is not None:
            s = s.masked_fill(hidden, float("-inf"))
        if select is not None:
            s = select(s)
        p = safe_softmax(s)
        if prob_mod is not None:
            p = prob_mod(p, start, end)
        return grouped_pv(p, v)

    return query_blocks(attend, q_scaled, rows)
