"""Query-blocked attention pieces: compute one block of query rows at a time, never the full N×N scores.

GQA without copies: the ``G = heads / kv_heads`` query heads sharing a key head are stacked as extra rows, so one
``(B, Hkv, G·rows, D) @ (B, Hkv, D, Skv)`` matmul serves them all, and the result is viewed back as
``(B, H, rows, Skv)`` for free.

Without autograd, the kernels built on :func:`query_blocks` allocate nothing score-sized per block: each call makes one
scores buffer (:func:`scores_buffer`) that every block's logits are written into (``grouped_logits(..., buffer=)``),
works on it in place, and writes its rows into one preallocated output. So nothing a block allocates outlives it and
the peak does not depend on how the memory allocator reuses freed blocks (glibc's heap, handed one score-sized block
per query block with the block's small result kept after it, once grew to the size of the whole score matrix).
With autograd on, the same loop runs without autograd and each block is recomputed with autograd in the backward pass
(:class:`_RecomputedBlocks`), its gradients added into preallocated ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def scores_buffer(q: torch.Tensor, rows: int, seq_kv: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """One flat buffer for the logits of any block of ``rows`` query rows of ``q (B, H, Sq, D)`` over ``seq_kv`` keys,
    or None when autograd is on (its blocks then allocate their own, which autograd may keep)."""
    if torch.is_grad_enabled():
        return None
    b, h, sq, _ = q.shape
    return q.new_empty(b * h * min(rows, sq) * seq_kv, dtype=dtype or q.dtype)


def grouped_logits(
    q_rows: torch.Tensor, k: torch.Tensor, scale: float, buffer: torch.Tensor | None = None,
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
    fn: Callable[..., torch.Tensor], q: torch.Tensor, block: int, value_dim: int, *tensors: torch.Tensor | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``fn(q[..., s:s+block, :], s, *tensors)`` over query blocks, stacked along the query axis (last axis
    ``value_dim``).

    ``tensors`` must be every tensor ``fn`` reads besides the query rows (keys, values, masks, a hook's learnable
    parameters): when a gradient is needed they are what the backward pass differentiates. The output (of ``dtype``,
    default that of ``q``) is allocated before the first block and each block's rows are written into it. When some
    input needs a gradient, :class:`_RecomputedBlocks` runs the blocks without autograd and recomputes each block with
    autograd in the backward pass, so training memory stays O(block · Skv) rather than O(Sq · Skv).
    """
    inputs = (q, *tensors)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        if q.shape[-2] <= block:
            return fn(q, 0, *tensors)
        out: torch.Tensor = _RecomputedBlocks.apply(fn, block, value_dim, dtype, *inputs)
        return out
    with torch.no_grad():
        return _blocks_into(fn, q, block, value_dim, tensors, dtype)


def _blocks_into(
    fn: Callable[..., torch.Tensor], q: torch.Tensor, block: int, value_dim: int,
    tensors: tuple[torch.Tensor | None, ...], dtype: torch.dtype | None,
) -> torch.Tensor:
    out = q.new_empty(*q.shape[:-1], value_dim, dtype=dtype or q.dtype)
    for start in range(0, q.shape[-2], block):
        out[..., start : start + block, :] = fn(q[..., start : start + block, :], start, *tensors)
    return out


class _RecomputedBlocks(torch.autograd.Function):
    """Query blocks run without autograd; the backward recomputes one block at a time with autograd and accumulates
    its gradients into preallocated ones, so nothing a block allocates outlives it, forward or backward."""

    @staticmethod
    def forward(
        ctx: Any, fn: Callable[..., torch.Tensor], block: int, value_dim: int, dtype: torch.dtype | None,
        q: torch.Tensor, *tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.fn, ctx.block = fn, block
        ctx.save_for_backward(q, *tensors)
        return _blocks_into(fn, q, block, value_dim, tensors, dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, *tensors = ctx.saved_tensors
        wants = ctx.needs_input_grad[4:]
        grads: list[torch.Tensor | None] = [
            torch.zeros_like(t) if want else None for t, want in zip((q, *tensors), wants, strict=True)
        ]
        for start in range(0, q.shape[-2], ctx.block):
            with torch.enable_grad():
                q_rows = q[..., start : start + ctx.block, :].detach().requires_grad_(wants[0])
                leaves = [None if t is None else t.detach().requires_grad_(want) for t, want in zip(tensors, wants[1:])]
                rows = ctx.fn(q_rows, start, *leaves)
                asked = [x for x, want in zip((q_rows, *leaves), wants, strict=True) if want]
                got = iter(torch.autograd.grad(rows, asked, grad_out[..., start : start + ctx.block, :],
                                               allow_unused=True))
            for i, want in enumerate(wants):
                g = next(got) if want else None
                if g is None:
                    continue
                target = grads[i]
                assert target is not None
                (target[..., start : start + ctx.block, :] if i == 0 else target).add_(g)
        return (None, None, None, None, *grads)
