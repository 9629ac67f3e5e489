"""Query-blocked attention pieces: compute one block of query rows at a time, never the full N×N scores.

GQA without copies: the ``G = heads / kv_heads`` query heads sharing a key head are stacked as extra rows, so one
``(B, Hkv, G·rows, D) @ (B, Hkv, D, Skv)`` matmul serves them all, and the result is viewed back as
``(B, H, rows, Skv)`` for free.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def grouped_logits(q_rows: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · q kᵀ`` for ``q_rows (B, H, r, D)`` and ``k (B, Hkv, Skv, D)``: a ``(B, H, r, Skv)`` tensor."""
    b, h, r, d = q_rows.shape
    hkv = k.shape[1]
    stacked = q_rows.reshape(b, hkv, (h // hkv) * r, d)
    s = torch.matmul(stacked, k.transpose(-1, -2))
    return (s if scale == 1.0 else s.mul_(scale)).view(b, h, r, k.shape[2])


def grouped_pv(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p v`` for weights ``p (B, H, r, Skv)`` and ``v (B, Hkv, Skv, Dv)``: a ``(B, H, r, Dv)`` tensor."""
    b, h, r, skv = p.shape
    hkv = v.shape[1]
    return torch.matmul(p.reshape(b, hkv, (h // hkv) * r, skv), v).view(b, h, r, v.shape[-1])


def query_blocks(
    fn: Callable[[torch.Tensor, int], torch.Tensor], q: torch.Tensor, block: int, *, save_memory: bool = True
) -> torch.Tensor:
    """Concatenate ``fn(q[..., s:s+block, :], s)`` over query blocks.

    With autograd on and ``save_memory``, each block is checkpointed: its scores are recomputed in the backward pass
    instead of being kept, so training memory stays O(block · Skv) rather than O(Sq · Skv).
    """
    seq_q = q.shape[-2]
    grad = torch.is_grad_enabled()
    outs = []
    for start in range(0, seq_q, block):
        q_rows = q[..., start : start + block, :]
        if grad and save_memory and seq_q > block:
            outs.append(checkpoint(fn, q_rows, start, use_reentrant=False))
        else:
            outs.append(fn(q_rows, start))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
