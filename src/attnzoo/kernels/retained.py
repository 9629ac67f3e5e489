"""Causal softmax attention over a *retained subset* of the keys (a sparse KV cache), without the dense scores.

``keep (B, Hkv, N)`` marks the keys each key head retains. :func:`compact` gathers them, in position order, into a
padded ``(B, Hkv, T, ·)`` cache (``T`` = the largest retained count over batch and heads), with their positions
(padding slots get position ``N``, which no query sees). :func:`attend` then runs query-blocked softmax attention of
``q (B, H, Sq, D)`` at positions ``offset + i`` over the cache, each query seeing the retained keys at positions
``≤`` its own; a query block reads the cache only up to the last slot that its last position sees (about half of the
cache on average, causally). Cost O(Sq·T·D) time and O(block·T) memory (blocks are recomputed in the backward pass),
so a cache that keeps a fraction ``r`` of the keys costs about ``r`` of dense causal attention. A row that sees no
retained key gives 0. GQA without copies (:mod:`attnzoo.kernels.blockwise`); fp16/bf16 inputs are computed in fp32.
"""

from __future__ import annotations

import torch

from attnzoo.kernels.blockwise import grouped_logits, grouped_pv, query_blocks, scores_buffer
from attnzoo.kernels.linear_scan import accumulation_dtype

QUERY_BLOCK = 256


def compact(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Positions ``(B, Hkv, T)`` of the retained keys and each ``(B, Hkv, N[, F])`` tensor gathered at them."""
    n = keep.shape[-1]
    count = int(keep.sum(dim=-1).max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :count]  # retained first, in order
    slot_kept = torch.gather(keep, -1, order)
    pos = torch.where(slot_kept, order, torch.full_like(order, n))
    out = []
    for t in tensors:
        if t.dim() == keep.dim():
            out.append(torch.gather(t, -1, order))
        else:
            out.append(torch.gather(t, 2, order[..., None].expand(*order.shape, t.shape[-1])))
    return pos, tuple(out)


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, scale: float, *,
    key_bias: torch.Tensor | None = None, offset: int = 0, block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """Softmax attention of ``q`` (positions ``offset + i``) over the cache, keys at ``pos ≤`` the query's position.

    ``key_bias (B, Hkv, T)`` is added to every query's logit of that key (e.g. a straight-through router term).
    """
    acc = accumulation_dtype(q.dtype)
    b, h, sq, _ = q.shape
    hkv, t = keys.shape[1], keys.shape[2]
    if t == 0:
        return q.new_zeros(b, h, sq, values.shape[-1])
    keys, values = keys.to(acc), values.to(acc)
    g = h // hkv
    kb = None if key_bias is None else key_bias.to(acc)[:, :, None, None, :]

    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, keys, values, kb))
    # a query block needs the cache only up to the last slot its last position sees
    last = torch.arange(offset, offset + sq, block, device=q.device).add_(block - 1).clamp_max_(offset + sq - 1)
    slot = torch.arange(1, t + 1, device=q.device)[:, None]
    reach = torch.where(pos[..., None] <= last, slot, 0).amax(dim=(0, 1, 2)).tolist()
    buffer = None if grad else scores_buffer(q, block, t, acc)

    def one_block(q_rows: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                  kb: torch.Tensor | None) -> torch.Tensor:
        r, m = q_rows.shape[2], reach[start // block]
        if m == 0:  # nothing retained yet: these rows are 0
            return q_rows.new_zeros(b, h, r, values.shape[-1], dtype=acc)
        s = grouped_logits(q_rows.to(acc), keys[:, :, :m], scale, buffer).view(b, hkv, g, r, m)
        where = torch.arange(offset + start, offset + start + r, device=q.device)
        hidden = pos[:, :, None, None, :m] > where[:, None]  # (B, Hkv, 1, r, m)
        if grad:
            s = (s if kb is None else s + kb[..., :m]).masked_fill(hidden, float("-inf"))
        else:  # no autograd: every step in place on the one scores buffer
            s = (s if kb is None else s.add_(kb[..., :m])).masked_fill_(hidden, float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
        e = torch.exp(s - row_max) if grad else s.sub_(row_max).exp_()
        total = e.sum(dim=-1, keepdim=True)
        total = torch.where(total > 0, total, torch.ones_like(total))
        p = e / total if grad else e.div_(total)
        return grouped_pv(p.view(b, h, r, m), values[:, :, :m])

    return query_blocks(one_block, q, block, values.shape[-1], keys, values, pos, kb, dtype=acc).to(q.dtype)
