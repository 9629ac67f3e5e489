"""Query-blocked attention pieces: compute one block of query rows at a time, never the full N×N scores.

GQA without copies: the ``G = heads / kv_heads`` query heads sharing a key head are stacked as extra rows, so one
``(B, Hkv, G·rows, D) @ (B, Hkv, D, Skv)`` matmul serves them all, and the result is viewed back as
``(B, H, rows, Skv)`` for free.

Without autograd, the kernels built on :func:`query_blocks` allocate nothing score-sized per block: each call makes one
scores buffer (:func:`scores_buffer`) that every block's logits are written into (``grouped_logits(..., buffer=)``),
works on it in place, and writes its rows into one preallocated output. So nothing a block allocates outlives it and
the peak does not depend on how the memory allocator reuses freed blocks (glibc's heap, handed one score-sized block
per query block with the block's small result kept after it, once grew to the size of the whole score matrix).
With autograd on, blocks are checkpointed and their results concatenated (autograd cannot record ``out=`` writes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def scores_buffer(q: torch.Tensor, rows: int, seq_kv: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """One flat buffer for the logits of any block of ``rows`` query rows of ``q (B, H, Sq, D)`` over ``seq_kv`` keys,
    or None when autograd is on (its blocks then allocate their own, which autograd may keep)."""
    if torch.is_grad_enabled():
        return None
    b, h, sq, _ = q.shape
    return q.new_empty(b * h * min(rows, sq) * seq_kv, dtype=dtype or q.dtype)


def grouped_logits(
    q_rows: torch.Tensor, k: torch.Tensor, scale: float, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale · q kᵀ`` for ``q_rows (B, H, r, D)`` and ``k (B, Hkv, Skv, D)``: a ``(B, H, r, Skv)`` tensor.

    With a ``buffer`` (see :func:`scores_buffer`) the logits are written into its first elements.
    """
    b, h, r, d = q_rows.shape
    hkv, skv = k.shape[1], k.shape[2]
    stacked = q_rows.reshape(b, hkv, (h // hkv) * r, d)
    out = None if buffer is None else buffer[: b * h * r * skv].view(b, hkv, (h // hkv) * r, skv)
    s = torch.matmul(stacked, k.transpose(-1, -2), out=out)
    return (s if scale == 1.0 else s.mul_(scale)).view(b, h, r, skv)


def grouped_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p v`` for weights ``p (B, H, r, Skv)`` and ``v (B, Hkv, Skv, Dv)``: a ``(B, H, r, Dv)`` tensor."""
    b, h, r, skv = p.shape
    hkv = v.shape[1]
    return torch.matmul(p.reshape(b, hkv, (h // hkv) * r, skv), v).view(b, h, r, v.shape[-1])


def query_blocks(
    fn: Callable[[torch.Tensor, int], torch.Tensor],
    q: torch.Tensor,
    block: int,
    value_dim: int,
    *,
    dtype: torch.dtype | None = None,
    save_memory: bool = True,
) -> torch.Tensor:
    """``fn(q[..., s:s+block, :], s)`` over query blocks, stacked along the query axis: ``(…, Sq, value_dim)``.

    Without autograd the rows are written into one output allocated before the first block (of ``dtype``, default
    that of ``q``). With autograd on and ``save_memory``, each block is checkpointed: its scores are recomputed in the
    backward pass instead of being kept, so training memory stays O(block · Skv) rather than O(Sq · Skv).
    """
    seq_q = q.shape[-2]
    if not torch.is_grad_enabled():
        out = q.new_empty(*q.shape[:-1], value_dim, dtype=dtype or q.dtype)
        for start in range(0, seq_q, block):
            out[..., start : start + block, :] = fn(q[..., start : start + block, :], start)
        return out
    outs = []
    for start in range(0, seq_q, block):
        q_rows = q[..., start : start + block, :]
        if save_memory and seq_q > block:
            outs.append(checkpoint(fn, q_rows, start, use_reentrant=False))
        else:
            outs.append(fn(q_rows, start))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
