"""Query-blocked softmax attention with hooks on the logits and on the weights.

Many softmax-form variants differ from softmax attention only in what they do to one row of logits before the
softmax (soft-capping, ALiBi, keeping the top k) or to one row of weights after it (a relative-position re-weighting).
This kernel computes ``O = post(softmax(select(mod(scale · Q Kᵀ) + bias, visible))) V`` one block of query rows at a
time, so memory is O(rows · Skv) instead of O(Sq · Skv), and each block is recomputed in the backward pass
(:func:`attnzoo.kernels.blockwise.query_blocks`). GQA stacks the query heads of a group: no K/V copies.

Hooks see absolute query indices ``[start, end)`` so position-dependent terms can be built for the block alone:
- ``score_mod(s, start, end, *hook_tensors)``: on the scaled logits ``(B, H, rows, keys)``, before the bias and masks;
- ``select(s)``: on the logits after the bias and with hidden keys at ``-inf`` (may hide more keys with ``-inf``);
- ``prob_mod(p, start, end, *hook_tensors)``: on the normalised weights, before the product with V.
A hook reads its tensors (e.g. learnable slopes) from ``hook_tensors``, never from its closure: under autograd the
backward pass recomputes each block with its own copies of them and differentiates those.
Hooks may work in place when :func:`inplace` says so (autograd off), which saves a pass over the block each. Without
autograd every step works in place on one scores buffer shared by the call's blocks, and rows go straight into one
output (:mod:`attnzoo.kernels.blockwise`): nothing score-sized is allocated per block.

Under the causal mask a block only computes the keys its last row can see, ``keys = [0, end + Skv − Sq)``, so hooks
must read the number of key columns from the tensor they get (keys always start at 0). A row with no visible key gives
weights 0 (never NaN, forward or backward).

``return_lse=True`` also returns each row's log-sum-exp ``L = log Σ exp(s)`` over the logits the softmax normalises
(after ``score_mod``, the bias, the masks and ``select``; ``prob_mod`` does not change it), ``-inf`` for a row with no
visible key, in at least fp32 and differentiable. It is read off the softmax rather than computed by a second pass of
exponentials: with ``m = max_j s_j`` the largest weight is ``p_max = e^{m − L}``, so ``L = m − log p_max`` (two row
maxima; ``p_max ≥ 1/Skv`` keeps the log well conditioned, and its gradient is ``e_argmax − (e_argmax − p) = p``, ties
included). Each block then returns its rows and their ``L`` side by side (one ``(rows, Dv + 1)`` tensor in at least
fp32, split afterwards), so the blocking and the recomputation in the backward pass are those of the plain call;
without it nothing extra is computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnzoo import masks
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv, query_blocks, scores_buffer

ScoreHook = Callable[..., torch.Tensor]  # (s, start, end, *hook_tensors) -> s
SelectHook = Callable[[torch.Tensor], torch.Tensor]

SCORES_PER_BLOCK = 1 << 22  # 16 MiB of fp32 logits per block: stays in a server L3 cache


def block_rows(batch: int, heads: int, seq_q: int, seq_kv: int, scores_per_block: int = SCORES_PER_BLOCK) -> int:
    """Query rows per block so that one block's logits hold about ``scores_per_block`` elements (at least 16)."""
    return max(16, min(seq_q, scores_per_block // max(1, batch * heads * seq_kv)))


def blocked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool, mask: torch.Tensor | None,
    bias: torch.Tensor | None, score_mod: ScoreHook | None = None, select: SelectHook | None = None,
    prob_mod: ScoreHook | None = None, hook_tensors: tuple[torch.Tensor, ...] = (), block: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``(B, H, Sq, Dv)`` computed by query blocks, with the hooks described in the module doc
    (and, with ``return_lse``, the rows' log-sum-exp ``(B, H, Sq)``).

    ``causal`` is bottom-right aligned; ``mask`` (bool) and ``bias`` (float) broadcast to ``(B, H, Sq, Skv)``.
    """
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    offset = skv - sq  # bottom-right causal: query i sees keys j <= i + offset
    rows = block if block is not None else block_rows(b, h, sq, skv)
    # Scale q before the product: in fp16/bf16 the unscaled dot products could overflow where the logits do not.
    q_scaled = (q * scale).contiguous()
    buffer = scores_buffer(q, rows, skv)
    in_place = inplace()
    dv = v.shape[-1]
    lse_dtype = torch.promote_types(q.dtype, torch.float32)

    def attend(q_rows: torch.Tensor, start: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               bias: torch.Tensor | None, *hook_tensors: torch.Tensor) -> torch.Tensor:
        end = start + q_rows.shape[2]
        # Under the causal mask the block's last query sees keys [0, end + offset): the rest is never computed, and
        # only the columns from `first` on are hidden from some row of the block (a rows × rows triangle at most).
        keys = min(skv, max(1, end + offset)) if causal else skv
        first = min(keys, max(0, start + offset + 1)) if causal else keys
        s = grouped_logits(q_rows, k[:, :, :keys], 1.0, buffer)
        if score_mod is not None:
            s = score_mod(s, start, end, *hook_tensors)
        if bias is not None:
            block_bias = _columns(masks.rows(bias, start, end), keys)
            s = s.add_(block_bias) if in_place else s + block_bias
        seen = None if mask is None else _columns(masks.rows(mask, start, end), keys)
        if seen is not None:
            s = s.masked_fill_(~seen, float("-inf")) if in_place else s.masked_fill(~seen, float("-inf"))
        future = None
        if first < keys:
            row_index = torch.arange(start, end, device=q.device).view(-1, 1)
            future = torch.arange(first, keys, device=q.device).view(1, -1) > row_index + offset
            s[..., first:].masked_fill_(future, float("-inf"))  # in place on the block's own logits
        if select is not None:
            s = select(s)
        empty = _empty_rows(seen, future, first, start, end, offset if causal else None, q.device)
        top = s.amax(dim=-1, keepdim=True) if return_lse else None  # before the softmax may overwrite s
        p = torch.softmax(s, dim=-1, out=s) if in_place else torch.softmax(s, dim=-1)
        if empty is not None:  # their softmax is NaN (all logits -inf); the masked_fills above stop its gradient
            p = p.masked_fill_(empty, 0.0) if in_place else p.masked_fill(empty, 0.0)
        lse = None if top is None else _row_lse(top, p.amax(dim=-1, keepdim=True), empty, lse_dtype)
        if prob_mod is not None:
            p = prob_mod(p, start, end, *hook_tensors)
        out = grouped_pv(p, v[:, :, :keys])
        return out if lse is None else torch.cat([out.to(lse_dtype), lse], dim=-1)

    if not return_lse:
        return query_blocks(attend, q_scaled, rows, dv, k, v, mask, bias, *hook_tensors)
    both = query_blocks(attend, q_scaled, rows, dv + 1, k, v, mask, bias, *hook_tensors, dtype=lse_dtype)
    return both[..., :dv].to(q.dtype), both[..., dv]


def _row_lse(top: torch.Tensor, p_top: torch.Tensor, empty: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``L = m − log p_max`` (see the module docstring) from the rows' largest logit ``top`` and largest weight
    ``p_top``, ``(…, rows, 1)`` columns, in ``dtype``; ``-inf`` on the ``empty`` rows (computed on 0 and 1 there, so
    that their gradient is 0, not NaN)."""
    top, p_top = top.to(dtype), p_top.to(dtype)
    if empty is None:
        return top - torch.log(p_top)
    return (top.masked_fill(empty, 0.0) - torch.log(p_top.masked_fill(empty, 1.0))).masked_fill(empty, float("-inf"))


def _empty_rows(
    seen: torch.Tensor | None, future: torch.Tensor | None, first: int, start: int, end: int, offset: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """A ``(…, rows, 1)`` bool of the block's rows that see no key, or None if there is none."""
    if seen is not None:
        visible = seen[..., :first].any(dim=-1, keepdim=True)
        if future is not None:
            visible = visible | (seen[..., first:] & ~future).any(dim=-1, keepdim=True)
        empty = ~visible
        return empty if bool(empty.any()) else None
    if offset is not None and start + offset < 0:  # causal rows i < -offset see no key at all
        return (torch.arange(start, end, device=device) + offset < 0).view(-1, 1)
    return None


def inplace() -> bool:
    """Whether hooks may overwrite their input: only when autograd is off (no op's backward needs it then)."""
    return not torch.is_grad_enabled()


def _columns(t: torch.Tensor, keys: int) -> torch.Tensor:
    return t if t.shape[-1] == 1 else t[..., :keys]
