"""S2 — sigmoid attention.

Paper: "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram et al., arXiv:2409.04431).

Formula as implemented: ``O = (σ(scale · Q Kᵀ + bias + b) ⊙ M) V`` with ``M`` the 0/1 visibility (user mask,
bottom-right causal) and no row normalisation. ``b = sigmoid_bias`` defaults to ``−log(seq_kv)``, the paper's choice
that keeps the initial attention norm near that of softmax attention. A row with no visible key gives 0.

Fast path ``torch``: since rows are not normalised, any split of the work simply adds up. Query blocks of ``r`` rows
are computed as one ``matmul → sigmoid (in place) → matmul``, with ``r`` chosen so one block's scores stay under 2²²
elements (16 MiB in fp32, measured faster than larger blocks on a 2-core EPYC: the block stays in cache between
passes). Scale and ``b`` ride inside the first matmul on an extra feature
(``[scale·q, 1]·[k, b]ᵀ``), so the scores are touched only by the matmuls and the sigmoid; causal blocks stop at their
last visible key, halving the work (causal calls use at least ``CAUSAL_BLOCKS`` blocks so the skipped triangle is
most of the upper half). Blocks are checkpointed under autograd, so forward and backward memory are
O(r · Skv) instead of O(Sq · Skv). GQA stacks the query heads of a group as rows: no K/V copies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from attnzoo import masks
from attnzoo.methods.common import dense_scores, repeat_kv, visible
from attnzoo.registry import ALL_PATTERNS, Backend, MethodSpec, Param, register

SCORES_PER_BLOCK = 1 << 22  # 16 MiB of fp32 scores per block: the block stays in cache between its passes
CAUSAL_BLOCKS = 16  # causal calls use at least this many blocks, so the skipped upper triangle is large

SPEC = MethodSpec(
    name="sigmoid",
    family="softmax",
    mechanism="S2",
    paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
    arxiv="2409.04431",
    summary="σ(QKᵀ·scale + b)V with no row normalisation; b = −log(seq_kv) by default",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param("sigmoid_bias", (float,), None, "the scalar b added to every logit; None means −log(seq_kv)"),
    ),
    complexity="O(N²d) time, O(N·r) memory (query blocks of r rows)",
    subquadratic_memory=True,
)


def _bias_value(sigmoid_bias: float | None, seq_kv: int) -> float:
    return -math.log(seq_kv) if sigmoid_bias is None else float(sigmoid_bias)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sigmoid_bias: float | None,
) -> torch.Tensor:
    s = dense_scores(q, k, scale) + _bias_value(sigmoid_bias, k.shape[2])
    if bias is not None:
        s = s + bias
    w = torch.sigmoid(s) * visible(causal, mask, q, k)
    return w @ repeat_kv(v, q.shape[1])


@dataclass(frozen=True)
class _Plan:
    """How one call is cut into blocks, and what every block applies to its scores.

    A block is ``heads`` key/value heads of one batch row (with their ``group`` query heads stacked as rows) times
    ``rows`` query rows; its scores ``(heads, group·rows, keys)`` fill at most ``SCORES_PER_BLOCK`` elements.
    """

    batch: int
    kv_heads: int
    group: int
    seq_q: int
    seq_kv: int
    heads: int  # key/value heads per block
    rows: int  # query rows per block
    offset: float  # the sigmoid bias b
    causal: bool
    mask: torch.Tensor | None
    bias: torch.Tensor | None

    def blocks(self) -> Iterator[tuple[int, int, int, int, int]]:
        """``(batch row, first kv head, last kv head + 1, first query row, last query row + 1)`` of every block."""
        for b in range(self.batch):
            for h0 in range(0, self.kv_heads, self.heads):
                for start in range(0, self.seq_q, self.rows):
                    yield b, h0, min(self.kv_heads, h0 + self.heads), start, min(self.seq_q, start + self.rows)

    def keys(self, end: int) -> int:
        """Keys (from 0) that rows before ``end`` can see: causally none past ``end − 1 + Skv − Sq``."""
        return max(0, min(self.seq_kv, end + self.seq_kv - self.seq_q)) if self.causal else self.seq_kv


def _plan(q: torch.Tensor, k: torch.Tensor, causal: bool, mask: torch.Tensor | None, bias: torch.Tensor | None,
          offset: float) -> _Plan:
    b, h, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = h // hkv
    rows = max(16, min(sq, SCORES_PER_BLOCK // (g * skv)))
    if causal:
        rows = min(rows, max(16, -(-sq // CAUSAL_BLOCKS)))
    heads = max(1, min(hkv, SCORES_PER_BLOCK // (g * rows * skv)))  # small calls batch several heads per block
    return _Plan(b, hkv, g, sq, skv, heads, rows, offset, causal, mask, bias)


def _block_of(t: torch.Tensor, plan: _Plan, b: int, h0: int, h1: int, start: int, end: int, keys: int) -> torch.Tensor:
    """A 4-D mask or bias (or its gradient) at one block: broadcastable to ``(heads·group, rows, keys)``."""
    t = t[b if t.shape[0] > 1 else 0]
    t = t[h0 * plan.group : h1 * plan.group] if t.shape[0] > 1 else t
    return masks.rows(t.unsqueeze(0), start, end)[0, ..., :keys]


def _weights(qf: torch.Tensor, kf: torch.Tensor, plan: _Plan, block: tuple[int, int, int, int, int],
             buffer: torch.Tensor) -> torch.Tensor:
    """``σ(q kᵀ + b + bias)`` of one block, masked entries 0, written into ``buffer``: ``(heads, group·rows, keys)``.

    ``qf (B·Hkv, G, Sq, D)`` holds the already scaled queries and ``kf (B·Hkv, Skv, D)`` the keys.
    """
    b, h0, h1, start, end = block
    keys = plan.keys(end)
    first = b * plan.kv_heads
    q_rows = qf[first + h0 : first + h1, :, start:end].reshape(h1 - h0, -1, qf.shape[-1])
    s = buffer[: q_rows.shape[0] * q_rows.shape[1] * keys].view(q_rows.shape[0], q_rows.shape[1], keys)
    torch.baddbmm(buffer.new_tensor(plan.offset), q_rows, kf[first + h0 : first + h1, :keys].transpose(1, 2), out=s)
    by_head = s.view((h1 - h0) * plan.group, end - start, keys)
    if plan.bias is not None:
        by_head.add_(_block_of(plan.bias, plan, b, h0, h1, start, end, keys))
    if plan.mask is not None:
        by_head.masked_fill_(_block_of(plan.mask, plan, b, h0, h1, start, end, keys).logical_not(), float("-inf"))
    diagonal = max(0, start + plan.seq_kv - plan.seq_q + 1)  # causal: only keys from here on are hidden from some row
    if plan.causal and diagonal < keys:
        row = torch.arange(start, end, device=s.device).view(-1, 1) + plan.seq_kv - plan.seq_q
        by_head[..., diagonal:].masked_fill_(torch.arange(diagonal, keys, device=s.device) > row, float("-inf"))
    return s.sigmoid_()


class _SigmoidBlocks(torch.autograd.Function):
    """Sigmoid attention block by block with one reused scores buffer; the backward recomputes each block's weights.

    Nothing score-sized is allocated per block, forward or backward, and nothing per block outlives its block, so the
    peak does not depend on how the memory allocator reuses freed blocks (glibc's heap kept every freed block once,
    growing to the full score matrix). Inputs: scaled ``q (B, H, Sq, D)``, ``k``, ``v``, the user's ``bias`` (or
    None) and the :class:`_Plan`.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                plan: _Plan) -> torch.Tensor:
        n, g, dv = plan.batch * plan.kv_heads, plan.group, v.shape[-1]
        qf, kf, vf = _flat(q, k, v, plan)
        out = q.new_zeros(n, g, plan.seq_q, dv)
        buffer = q.new_empty(plan.heads * g * plan.rows * plan.seq_kv)
        for block in plan.blocks():
            b, h0, h1, start, end = block
            keys = plan.keys(end)
            if keys == 0:  # causal rows that see no key stay 0
                continue
            p = _weights(qf, kf, plan, block, buffer)
            heads = slice(b * plan.kv_heads + h0, b * plan.kv_heads + h1)
            rows = out[heads, :, start:end]
            if g == 1:
                torch.bmm(p, vf[heads, :keys], out=rows[:, 0])
            else:
                rows.copy_(torch.bmm(p, vf[heads, :keys]).view(h1 - h0, g, end - start, dv))
        ctx.save_for_backward(q, k, v, bias)
        ctx.plan = plan
        return out.view(plan.batch, plan.kv_heads * g, plan.seq_q, dv)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, bias = ctx.saved_tensors
        plan: _Plan = ctx.plan
        n, g, d, dv = plan.batch * plan.kv_heads, plan.group, q.shape[-1], v.shape[-1]
        qf, kf, vf = _flat(q, k, v, plan)
        grad_rows = grad_out.reshape(n, g, plan.seq_q, dv)
        dq, dk, dv_ = q.new_zeros(n, g, plan.seq_q, d), torch.zeros_like(kf), torch.zeros_like(vf)
        dbias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[3] else None
        buffer = q.new_empty(plan.heads * g * plan.rows * plan.seq_kv)
        grad_scores = torch.empty_like(buffer)
        for block in plan.blocks():
            b, h0, h1, start, end = block
            keys = plan.keys(end)
            if keys == 0:
                continue
            heads = slice(b * plan.kv_heads + h0, b * plan.kv_heads + h1)
            p = _weights(qf, kf, plan, block, buffer)
            do = grad_rows[heads, :, start:end].reshape(h1 - h0, -1, dv)
            dv_[heads, :keys].baddbmm_(p.transpose(1, 2), do)
            ds = torch.bmm(do, vf[heads, :keys].transpose(1, 2), out=grad_scores[: p.numel()].view(p.shape))
            torch.ops.aten.sigmoid_backward.grad_input(ds, p, grad_input=ds)  # ds ← dP · p · (1 − p), one pass
            if dbias is not None:
                target = _block_of(dbias, plan, b, h0, h1, start, end, keys)
                target.add_(ds.view((h1 - h0) * g, end - start, keys).sum_to_size(target.shape))
            q_rows = qf[heads, :, start:end].reshape(h1 - h0, -1, d)
            dk[heads, :keys].baddbmm_(ds.transpose(1, 2), q_rows)
            dq[heads, :, start:end] = torch.bmm(ds, kf[heads, :keys]).view(h1 - h0, g, end - start, d)
        shape = plan.batch, plan.kv_heads, plan.seq_kv
        return dq.view(q.shape), dk.view(*shape, d), dv_.view(*shape, dv), dbias, None


def _flat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q (B·Hkv, G, Sq, D)``, ``k (B·Hkv, Skv, D)``, ``v (B·Hkv, Skv, Dv)``, contiguous."""
    n = plan.batch * plan.kv_heads
    return (q.contiguous().view(n, plan.group, plan.seq_q, q.shape[-1]), k.contiguous().view(n, plan.seq_kv, -1),
            v.contiguous().view(n, plan.seq_kv, -1))


def blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sigmoid_bias: float | None,
) -> torch.Tensor:
    plan = _plan(q, k, causal, mask, bias, _bias_value(sigmoid_bias, k.shape[2]))
    out: torch.Tensor = _SigmoidBlocks.apply(q * scale, k, v, bias, plan)
    return out


register(SPEC, reference, [Backend("torch", blockwise)])
