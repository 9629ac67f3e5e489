"""Query-blocked softmax attention with hooks on the logits and on the weights.

Many softmax-form variants differ from softmax attention only in what they do to one row of logits before the
softmax (soft-capping, ALiBi, keeping the top k) or to one row of weights after it (a relative-position re-weighting).
This kernel computes ``O = post(softmax(select(mod(scale · Q Kᵀ) + bias, visible))) V`` one block of query rows at a
time, so memory is O(rows · Skv) instead of O(Sq · Skv), and each block is checkpointed under autograd
(:func:`attnzoo.kernels.blockwise.query_blocks`). GQA stacks the query heads of a group: no K/V copies.

Hooks see absolute query indices ``[start, end)`` so position-dependent terms can be built for the block alone:
- ``score_mod(s, start, end)``: on the scaled logits ``(B, H, rows, keys)``, before the bias and the masks;
- ``select(s)``: on the logits after the bias and with hidden keys at ``-inf`` (may hide more keys with ``-inf``);
- ``prob_mod(p, start, end)``: on the normalised weights, before the product with V.
Hooks may work in place when :func:`inplace` says so (autograd off), which saves a pass over the block each.

Under the causal mask a block only computes the keys its last row can see, ``keys = [0, end + Skv − Sq)``, so hooks
must read the number of key columns from the tensor they get (keys always start at 0). A row with no visible key gives
weights 0 (never NaN, forward or backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnzoo import masks
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv, query_blocks

ScoreHook = Callable[[torch.Tensor, int, int], torch.Tensor]
SelectHook = Callable[[torch.Tensor], torch.Tensor]

SCORES_PER_BLOCK = 1 << 22  # 16 MiB of fp32 logits per block: stays in a server L3 cache


def block_rows(batch: int, heads: int, seq_q: int, seq_kv: int, scores_per_block: int = SCORES_PER_BLOCK) -> int:
    """Query rows per block so that one block's logits hold about ``scores_per_block`` elements (at least 16)."""
    return max(16, min(seq_q, scores_per_block // max(1, batch * heads * seq_kv)))


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
        # Under the causal mask the block's last query sees keys [0, end + skv − sq): the rest is never computed.
        keys = min(skv, max(1, end + skv - sq)) if causal else skv
        s = grouped_logits(q_rows, k[:, :, :keys], 1.0)
        if score_mod is not None:
            s = score_mod(s, start, end)
        if bias is not None:
            s = s + _columns(masks.rows(bias, start, end), keys)
        hidden = None if mask is None else ~_columns(masks.rows(mask, start, end), keys)
        if causal_mod is not None:
            future = ~masks.dense_rows(causal_mod, 1, 1, start, end, keys, q.device)
            hidden = future if hidden is None else hidden | future
        if hidden is not None:
            s = s.masked_fill_(hidden, float("-inf")) if inplace() else s.masked_fill(hidden, float("-inf"))
        if select is not None:
            s = select(s)
        p = torch.softmax(s, dim=-1)
        if hidden is not None:
            # Rows with no visible key are NaN after the softmax; they become 0. (Their gradient stays finite: the
            # masked_fill above passes none back to the hidden logits.)
            empty = hidden.all(dim=-1, keepdim=True)
            if bool(empty.any()):
                p = p.masked_fill(empty, 0.0)
        if prob_mod is not None:
            p = prob_mod(p, start, end)
        return grouped_pv(p, v[:, :, :keys])

    return query_blocks(attend, q_scaled, rows)


def inplace() -> bool:
    """Whether hooks may overwrite their input: only when autograd is off (no op's backward needs it then)."""
    return not torch.is_grad_enabled()


def _columns(t: torch.Tensor, keys: int) -> torch.Tensor:
    return t if t.shape[-1] == 1 else t[..., :keys]
