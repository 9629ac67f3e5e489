"""Block-sparse attention: query blocks attend to whole key blocks, with no per-element mask.

A :class:`BlockLayout` is built once from a boolean block mask ``(nq, nk)`` and a block size ``B``: query block ``a``
(queries ``[a·B, (a+1)·B)``) sees every key of the key blocks ``b`` with ``blocks[a, b]``. The last key block may be
partial (``nk = ⌈Skv / B⌉``), and queries from ``nq·B`` on (a *dense query tail*, e.g. text after a video) see every
key, so sequences need not be multiples of ``B``.

Approach (:func:`block_sparse_attention`): runs of up to ``RUN`` consecutive query blocks with equal rows are grouped by
their run length and number ``c`` of visible key blocks; each group is cut into chunks whose gathered blocks stay within
``GATHER_BYTES`` (Q, K, V and output blocks, plus the logits of a user mask/bias), and a chunk runs as one batched
fused-attention call of its runs' queries against their ``c·B`` gathered keys (``index_select`` of whole blocks), with
no mask but on the padding of a partial last key block: the work is exactly the visible blocks' ``Σ B²·d`` and the
kernel never sees a masked element. Per row, ``O_i = Σ_j softmax_j(scale·q_i·k_j + bias_ij) v_j`` over the keys of its
visible blocks that the user mask keeps. GQA stacks the query heads of a group as extra rows, so K/V are never repeated.
A user mask/bias is gathered at the chunk's (query, key) pairs (:func:`attnzoo.kernels.band.gather_pairs`); rows with no
visible key give 0 and zero gradients, never NaN. The dense query tail runs as one autograd SDPA call.

:func:`selected_attention` runs the same chunk machinery over a :class:`~attnzoo.kernels.selection.BlockSelection`
(a different set of key blocks per batch, head and query block, built on the device per call; the D family's attend
kernel): its units are ``(batch, head, query block)`` instead of runs, grouped by their number of selected blocks.

Two implementations of the block rows, same chunks:
- CPU with ``D == Dv`` (forward and training): :class:`_FlashBlocks`, an autograd Function around PyTorch's CPU flash
  kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel SDPA itself dispatches to; any float dtype).
  Forward: per chunk the kernel returns the output rows and their log-sum-exp ``L_i``; both are written into one
  preallocated ``(B, Hkv, nq, B·G, ·)`` output and LSE buffer, and the Function saves Q/K/V, O and L only. Backward: per
  chunk the blocks of Q/K/V/O/dO and L are gathered again and the kernel's backward computes ``dS = P ∘ (dO·Vᵀ −
  rowsum(dO ∘ O))`` with ``P = exp(scale·QKᵀ + bias − L)`` — no forward recomputation; the chunk gradients are scattered
  into dQ/dK/dV allocated once (``index_copy_`` for the rows, ``index_add_`` for the key blocks, which several runs
  share); first-order gradients only. Profiled before it (fwd+bwd, N=16384), a third of the time was autograd
  bookkeeping of the per-chunk version: full-size zero gradients per ``index_select`` backward and copies of the
  in-place output writes, plus the forward run twice (checkpointing).
- elsewhere (CUDA, ``D != Dv`` — the CPU kernel wants equal head dims — or a ``bias`` that needs a gradient):
  :func:`_autograd_blocks`, SDPA per chunk under autograd with each chunk checkpointed (recomputed in the backward pass)
  so that training memory stays O(N·d) plus one chunk.

``return_lse=True`` (both functions) also returns the rows' log-sum-exp ``(B, H, Sq)``: the flash Function returns
the buffer it fills anyway (``-inf`` on rows that see no key) and folds its gradient into the kernel's backward
(:func:`attnzoo.kernels.dense.lse_grad_inputs`); the autograd path runs
:func:`~attnzoo.kernels.dense.softmax_attention_lse` per chunk instead of SDPA; a dense query tail runs
:func:`~attnzoo.kernels.dense.attention_lse`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from attnzoo.kernels.band import gather_pairs
from attnzoo.kernels.dense import (
    attention_lse,
    flash_cpu,
    flash_cpu_backward,
    lse_grad_inputs,
    softmax_attention_lse,
)
from attnzoo.kernels.routed import routed_attention
from attnzoo.kernels.selection import BlockSelection

RUN = 4  # at most this many consecutive query blocks with equal key blocks attend as one
# Gathered K/V per SDPA call. Small on purpose: CPU allocations above glibc's mmap threshold (≤ 32 MiB) come back as
# fresh pages every call, and first-touch page faults then cost more than the copy (measured: 45 MiB gathers 12×
# slower than the same bytes in 4.5 MiB pieces).
GATHER_BYTES = 8 << 20
# selected_attention runs a selection key-block-major (kernels/routed.py) when key blocks are this many times larger
# than query blocks (gathering c key blocks for so few queries would copy more than it attends)
KEY_MAJOR = 4


class BlockLayout:
    """A block mask ``(nq, nk)`` regrouped for :func:`block_sparse_attention` (build once per configuration)."""

    def __init__(self, blocks: torch.Tensor, block: int) -> None:
        self.blocks, self.block = blocks, block
        self.nq, self.nk = blocks.shape
        # Runs of up to RUN consecutive query blocks with the same key blocks share one gathered key set.
        starts = [a for a in range(self.nq) if a == 0 or not torch.equal(blocks[a], blocks[a - 1])]
        runs: list[tuple[int, int]] = []  # (first query block, length)
        for a, end in zip(starts, [*starts[1:], self.nq][: len(starts)], strict=True):
            runs += [(x, min(RUN, end - x)) for x in range(a, end, RUN)]
        counts = blocks.sum(dim=1).tolist()
        by_shape: dict[tuple[int, int], list[int]] = {}
        for first, length in runs:
            by_shape.setdefault((length, counts[first]), []).append(first)
        # per (run length r, key block count c): query blocks (n, r) and their key blocks (n, c), in increasing order
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []
        for (length, c), firsts in sorted(by_shape.items()):
            first = torch.tensor(firsts, dtype=torch.long, device=blocks.device)
            self.groups.append((first.unsqueeze(1) + torch.arange(length, device=blocks.device),
                                torch.nonzero(blocks[first])[:, 1].view(len(firsts), c)))
        order = torch.cat([rows.flatten() for rows, _ in self.groups]) if self.groups else torch.zeros(
            0, dtype=torch.long, device=blocks.device)
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.shape[0], device=order.device)

    def to(self, device: torch.device) -> BlockLayout:
        return self if self.blocks.device == device else BlockLayout(self.blocks.to(device), self.block)

    def density(self, seq_q: int, seq_kv: int) -> float:
        """The fraction of the ``seq_q × seq_kv`` (query, key) pairs that are computed (padding not counted)."""
        b = self.block
        pad = self.nk * b - seq_kv
        sparse = int(self.blocks.sum()) * b * b - int(self.blocks[:, -1].sum()) * b * pad
        return (sparse + (seq_q - self.nq * b) * seq_kv) / (seq_q * seq_kv)


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, layout: BlockLayout,
    mask: torch.Tensor | None = None, bias: torch.Tensor | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, ·)`` restricted to a block layout.

    The layout covers the first ``nq·B ≤ Sq`` queries and all keys (``nk = ⌈Skv / B⌉``; the last key block may be
    partial: K/V are zero-padded once and the padded keys masked). ``mask``/``bias``: optional 4-D views
    broadcastable to ``(B, H, Sq, Skv)``, applied on top of the layout. On CPU with ``D == Dv`` the block rows run
    through :class:`_FlashBlocks` (flash forward/backward per chunk); elsewhere, and when ``bias`` needs a gradient,
    through autograd with checkpointed chunks (:func:`_autograd_blocks`). ``return_lse``: also each row's
    log-sum-exp ``(B, H, Sq)`` (see :func:`selected_attention`).
    """
    b, h, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    layout = layout.to(q.device)
    bs, nq, nk = layout.block, layout.nq, layout.nk
    pad = nk * bs - skv
    if not 0 <= pad < bs or nq * bs > sq:
        raise ValueError(f"block layout {nq}x{nk} of block {bs} does not fit {sq} queries and {skv} keys")
    # (B, Hkv, nq, B·G, D): the G query heads sharing a K/V head are stacked as rows of each query block.
    q_blocks = q[:, :, : nq * bs].reshape(b, hkv, g, nq * bs, d).transpose(2, 3).reshape(b, hkv, nq, bs * g, d)
    kp, vp = (F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))) if pad else (k, v)
    k_blocks, v_blocks = kp.reshape(b, hkv, nk, bs, d), vp.reshape(b, hkv, nk, bs, dv)
    rows_out, rows_lse = _run(q_blocks, k_blocks, v_blocks, scale,
                              _Plan(layout, b, hkv, g, skv, d, dv, mask, bias, q.dtype), return_lse)

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, nq, B·G, ·) rows as (B, H, nq·B, ·)
        if g == 1:
            return x.view(b, h, nq * bs, x.shape[-1])
        return x.view(b, hkv, nq * bs, g, x.shape[-1]).transpose(2, 3).reshape(b, h, nq * bs, x.shape[-1])

    rows = heads_first(rows_out)
    tail = None if sq == nq * bs else _dense_rows(q, k, v, nq * bs, scale, mask, bias, return_lse)
    if rows_lse is None:
        return rows if tail is None else torch.cat([rows, tail], dim=2)
    lse = heads_first(rows_lse.unsqueeze(-1)).squeeze(-1)
    if tail is None:
        return rows, lse
    return torch.cat([rows, tail[0]], dim=2), torch.cat([lse, tail[1].to(lse.dtype)], dim=2)


def _run(q_blocks: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, scale: float,
         plan: _Plan, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A plan's chunks through :class:`_FlashBlocks` on CPU with ``D == Dv`` and no bias needing a gradient, else
    through :func:`_autograd_blocks`: the output rows ``(·, ·, units, rows, Dv)`` and, with ``return_lse``, their
    log-sum-exp ``(·, ·, units, rows)`` (``-inf`` on rows that see no key; float32 at least), else None."""
    bias_grad = torch.is_grad_enabled() and plan.bias is not None and plan.bias.requires_grad
    if q_blocks.device.type == "cpu" and q_blocks.shape[-1] == v_blocks.shape[-1] and not bias_grad:
        if return_lse:
            return _FlashBlocks.apply(q_blocks, k_blocks, v_blocks, scale, plan, True)
        return _FlashBlocks.apply(q_blocks, k_blocks, v_blocks, scale, plan, False), None
    return _autograd_blocks(q_blocks, k_blocks, v_blocks, scale, plan, return_lse)


class _Plan:
    """The chunks of one call and what each needs: gathers from the block views and the chunk's additive logits.

    A chunk is ``(rows (n, r), cols (n, c) | None)``: ``n`` runs of ``r`` query blocks, each run seeing its ``c`` key
    blocks (``None``: they see no key). Chunks are cut so that one chunk's gathered Q/K/V/O (and logits) stay within
    ``GATHER_BYTES``.
    """

    def __init__(self, layout: BlockLayout, b: int, hkv: int, g: int, skv: int, d: int, dv: int,
                 mask: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.b, self.hkv, self.g, self.skv, self.mask, self.bias, self.dtype = b, hkv, g, skv, mask, bias, dtype
        self.bs = bs = layout.block
        self.positions = torch.arange(bs, device=layout.blocks.device)
        user = mask is not None or bias is not None
        unit = b * hkv * bs * torch.empty(0, dtype=dtype).element_size()
        self.chunks: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for rows, cols in layout.groups:
            r, c = rows.shape[1], cols.shape[1]
            if c == 0:  # these query blocks see no key at all
                self.chunks.append((rows, None))
                continue
            per_run = unit * ((c + r * g) * (d + dv) + (2 * r * bs * g * c if user else 0))
            step = max(1, GATHER_BYTES // per_run)
            self.chunks += [(rows[s : s + step], cols[s : s + step]) for s in range(0, rows.shape[0], step)]

    def gather(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks ``(n, ·)`` of ``x (B, Hkv, nblocks, T, ·)`` as ``(B·Hkv, n, ·×T, ·)`` (a copy)."""
        n = blocks.shape[0]
        return torch.index_select(x, 2, blocks.flatten()).view(self.b * self.hkv, n, -1, *x.shape[4:])

    def logits(self, chunk: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Chunk ``chunk``'s additive logits, broadcastable to ``(B·Hkv, n, r·B·G, c·B)`` (user mask/bias and the
        padding of the last key block; None if there is nothing to add), and with a user mask/bias which rows see a key
        ``(B'|1, Hkv|1, n·r·B, G|1, 1)`` (the others get 0 logits; the caller zeroes them)."""
        bs, b, hkv, g = self.bs, self.b, self.hkv, self.g
        rows, cols = self.chunks[chunk]
        assert cols is not None
        (n, r), width = rows.shape, cols.shape[1] * bs
        ki = (cols.unsqueeze(2) * bs + self.positions).view(n, width)
        if self.mask is not None or self.bias is not None:
            qi = (rows.unsqueeze(2) * bs + self.positions).view(n, r * bs)
            attn, some = _pair_logits(self.mask, self.bias, qi, ki, self.skv, hkv, g, self.dtype)
            attn = attn.expand(b, hkv, n, r * bs, g, width).reshape(b * hkv, n, r * bs * g, width)
            # (without a mask, ``some`` has one row per tile: expand it to the chunk's rows)
            some = some.expand(*some.shape[:2], n, r * bs, *some.shape[4:])
            return attn, some.reshape(some.shape[0], some.shape[1], n * r * bs, -1, 1)
        padding = ki >= self.skv
        if bool(padding.any()):
            return torch.zeros(1, n, 1, width, dtype=self.dtype, device=ki.device).masked_fill_(
                padding.view(1, n, 1, width), float("-inf")), None
        return None, None

    def keep(self, x: torch.Tensor, some: torch.Tensor | None) -> torch.Tensor:
        """``x (B·Hkv, n, r·B·G, Dv)`` with the rows that see no key zeroed."""
        if some is None:
            return x
        return (x.view(self.b, self.hkv, -1, self.g, x.shape[-1]) * some.to(x.dtype)).view(x.shape)

    def hide(self, lse: torch.Tensor, some: torch.Tensor | None) -> torch.Tensor:
        """A chunk's row log-sum-exps ``lse`` (its output rows without their last axis) with ``-inf`` on the rows that
        see no key (:meth:`keep` on ones marks them)."""
        if some is None:
            return lse
        seen = self.keep(torch.ones_like(lse).unsqueeze(-1), some).squeeze(-1) > 0
        return lse.masked_fill(~seen, float("-inf"))


class _FlashBlocks(torch.autograd.Function):
    """Block rows on CPU: per chunk, gathered Q/K/V blocks through PyTorch's CPU flash kernel, which returns the
    row log-sum-exp; the backward pass feeds the saved output and log-sum-exp to the kernel's backward per chunk (no
    forward recomputation) and scatters the chunk gradients into dQ/dK/dV allocated once.

    ``with_lse``: return ``(out, lse)``, ``lse`` ``-inf`` on the rows that see no key; its gradient rides along in
    the kernel's backward (:func:`attnzoo.kernels.dense.lse_grad_inputs`), and those rows get ``lse = +inf`` there
    (``P = 0``: no gradient reaches them)."""

    @staticmethod
    def forward(ctx: Any, q_blocks: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, scale: float,
                plan: _Plan, with_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, hkv, nq, rows_per_block, _ = q_blocks.shape
        out = q_blocks.new_empty(b, hkv, nq, rows_per_block, v_blocks.shape[-1])
        lse = q_blocks.new_empty(b, hkv, nq, rows_per_block, dtype=torch.promote_types(q_blocks.dtype, torch.float32))
        for i, (rows, cols) in enumerate(plan.chunks):
            index = rows.flatten()
            if cols is None:
                out.index_fill_(2, index, 0)
                lse.index_fill_(2, index, float("-inf") if with_lse else 0)
                continue
            attn, some = plan.logits(i)
            o, rows_lse = flash_cpu(plan.gather(q_blocks, rows), plan.gather(k_blocks, cols),
                                    plan.gather(v_blocks, cols), 0.0, False, attn_mask=attn, scale=scale)
            if with_lse:
                rows_lse = plan.hide(rows_lse, some)
            out.index_copy_(2, index, plan.keep(o, some).view(b, hkv, -1, *out.shape[3:]))
            lse.index_copy_(2, index, rows_lse.reshape(b, hkv, -1, rows_per_block))  # (B', L, n) strides
        ctx.save_for_backward(q_blocks, k_blocks, v_blocks, out, lse)
        ctx.scale, ctx.plan, ctx.with_lse = scale, plan, with_lse
        if not with_lse:
            return out
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor | None, grad_lse: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, ...]:
        q_blocks, k_blocks, v_blocks, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        b, hkv, _, rows_per_block, d = q_blocks.shape
        dv_dim = v_blocks.shape[-1]
        if grad is None:
            grad = torch.zeros_like(out)
        if ctx.with_lse:  # rows that see no key: P = exp(s − ∞) = 0
            empty = torch.isneginf(lse)
            lse = lse.masked_fill(empty, float("inf"))
            grad_lse = None if grad_lse is None else grad_lse.masked_fill(empty, 0)
        dq = q_blocks.new_empty(q_blocks.shape)
        dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (k_blocks, v_blocks))
        for i, (rows, cols) in enumerate(plan.chunks):
            if cols is None:
                dq.index_fill_(2, rows.flatten(), 0)
                continue
            attn, some = plan.logits(i)
            lse_rows = torch.index_select(lse, 2, rows.flatten()).view(b * hkv, rows.shape[0], -1)
            args = (plan.keep(plan.gather(grad, rows), some), plan.gather(q_blocks, rows),
                    plan.gather(k_blocks, cols), plan.gather(v_blocks, cols), plan.gather(out, rows))
            if grad_lse is not None:
                args = lse_grad_inputs(args[0], plan.gather(grad_lse.unsqueeze(-1), rows).squeeze(-1), *args[1:])
            dqg, dkg, dvg = flash_cpu_backward(*args, lse_rows, 0.0, False, attn_mask=attn, scale=ctx.scale)
            dqg, dkg, dvg = dqg[..., :d], dkg[..., :d], dvg[..., :dv_dim]
            # The kernel's gradients have (B·Hkv, L, n, D) strides: scattered run by run, as strided views (one
            # reshape of the whole chunk would copy it).
            for j in range(rows.shape[0]):
                dq.index_copy_(2, rows[j], dqg[:, j].view(b, hkv, -1, rows_per_block, d))
                dk.index_add_(2, cols[j], dkg[:, j].view(b, hkv, -1, plan.bs, d))
                dv.index_add_(2, cols[j], dvg[:, j].view(b, hkv, -1, plan.bs, dv_dim))
        needs = ctx.needs_input_grad
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None


def _autograd_blocks(q_blocks: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, scale: float,
                     plan: _Plan, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block rows through autograd (any device, any head dims, gradients for a bias): SDPA per chunk, chunks
    checkpointed under autograd (recomputed in the backward pass) so memory stays O(N·d) plus one chunk. With
    ``return_lse`` a chunk is :func:`~attnzoo.kernels.dense.softmax_attention_lse` instead (SDPA returns no
    log-sum-exp; the chunk's scores are materialised, within the same checkpointing)."""
    b, hkv, nq, rows_per_block, _ = q_blocks.shape
    dv = v_blocks.shape[-1]

    def run(q_blocks: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, chunk: int
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, cols = plan.chunks[chunk]
        attn, some = plan.logits(chunk)
        qg, kg, vg = plan.gather(q_blocks, rows), plan.gather(k_blocks, cols), plan.gather(v_blocks, cols)
        if not return_lse:
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn, scale=scale)
            return plan.keep(out, some).view(b, hkv, -1, rows_per_block, dv), None
        out, lse = softmax_attention_lse(qg, kg, vg, scale, None, attn)
        return (plan.keep(out, some).view(b, hkv, -1, rows_per_block, dv),
                plan.hide(lse, some).view(b, hkv, -1, rows_per_block))

    recompute = torch.is_grad_enabled() and len(plan.chunks) > 1
    # Results are written in place into one output (fresh allocations per piece cost page faults on CPU).
    out = q_blocks.new_empty(b, hkv, nq, rows_per_block, dv)
    lse = q_blocks.new_empty(b, hkv, nq, rows_per_block, dtype=torch.promote_types(q_blocks.dtype, torch.float32)
                             ) if return_lse else None
    for i, (rows, cols) in enumerate(plan.chunks):
        if cols is None:
            res = q_blocks.new_zeros(b, hkv, rows.numel(), rows_per_block, dv)
            res_lse = q_blocks.new_full(res.shape[:-1], float("-inf")) if return_lse else None
        elif recompute:
            res, res_lse = checkpoint(run, q_blocks, k_blocks, v_blocks, i, use_reentrant=False)
        else:
            res, res_lse = run(q_blocks, k_blocks, v_blocks, i)
        out.index_copy_(2, rows.flatten(), res)
        if lse is not None:
            assert res_lse is not None
            lse.index_copy_(2, rows.flatten(), res_lse.to(lse.dtype))
    return out, lse


def _pair_logits(mask: torch.Tensor | None, bias: torch.Tensor | None, qi: torch.Tensor, ki: torch.Tensor, skv: int,
                 hkv: int, g: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive logits ``(B', Hkv|1, n, T, G|1, W)`` of a user mask/bias at tile pairs (keys ``≥ skv`` are
    padding, never seen), and which rows see a key; a row that sees nothing gets 0 logits (the caller zeroes it)."""
    real = (ki < skv).view(1, 1, ki.shape[0], 1, 1, ki.shape[1])
    ki = ki.clamp(max=skv - 1)
    seen = real if mask is None else gather_pairs(mask, qi, ki, hkv, g) & real
    some = seen.any(dim=-1, keepdim=True)
    attn = torch.zeros(seen.shape, dtype=dtype, device=qi.device).masked_fill_(~seen & some, float("-inf"))
    if bias is not None:
        attn = attn + gather_pairs(bias, qi, ki, hkv, g)
    return attn, some


def _dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float,
                mask: torch.Tensor | None, bias: torch.Tensor | None, return_lse: bool = False,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[start, Sq)`` attending to every key (the dense query tail); ``return_lse``: with their log-sum-exp
    (:func:`~attnzoo.kernels.dense.attention_lse`)."""
    qt = q[:, :, start:]
    seen = None if mask is None else mask if mask.shape[2] == 1 else mask[:, :, start:]
    tail_bias = None if bias is None else bias if bias.shape[2] == 1 else bias[:, :, start:]
    if return_lse:
        return attention_lse(qt, k, v, causal=False, scale=scale, mask=seen, bias=tail_bias)
    attn = some = None
    if seen is not None:
        some = seen.any(dim=-1, keepdim=True)
        attn = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen & some, float("-inf"))
    if tail_bias is not None:
        attn = (0 if attn is None else attn) + tail_bias
    out = F.scaled_dot_product_attention(qt, k, v, attn_mask=attn, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out if some is None else out * some.to(out.dtype)


def selected_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: BlockSelection, *, scale: float, causal: bool,
    mask: torch.Tensor | None = None, bias: torch.Tensor | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, ·)`` restricted to a :class:`BlockSelection`
    (a different set of key blocks per batch, selection head and query block), AND the token-level causal mask when
    ``causal`` (bottom-right aligned), AND a user ``mask``/``bias`` (4-D, broadcastable to ``(B, H, Sq, Skv)``).

    ``O_i = Σ_j softmax_j(scale·q_i·k_j + bias_ij) v_j`` over the keys of the selected blocks of ``i``'s query block
    that the masks keep; rows that see no key give 0 (and zero gradients). Approach: every ``(batch, head, query
    block)`` is a *unit* (its ``block_q`` queries, with the query heads that share a selection and a K/V head stacked
    as extra rows, so K/V are never repeated); units are grouped by their number ``c`` of selected blocks (sorted on
    the device, one host sync for the distinct counts), and each group is cut into chunks within ``GATHER_BYTES``
    that run as one batched fused-attention call of the units' queries against their ``c·block_k`` gathered keys —
    no padded slots, no dense scores; the work is the selected blocks'. Logits are added only where a chunk has a
    masked element (causal diagonal, the padding of a partial last key block, a user mask/bias). Same CPU flash
    forward/backward (:class:`_FlashBlocks`) and autograd fallback (:func:`_autograd_blocks`) as
    :func:`block_sparse_attention`.

    Fine-grained query selections (``KEY_MAJOR · block_q ≤ block_k``: MoBA routes every query *token*) have too few
    queries per unit to pay for gathering their key blocks, so, without a user mask/bias, they run key-block-major
    instead (:func:`attnzoo.kernels.routed.routed_attention`): each key block, read in place, meets the queries that
    selected it, and each query's pieces are merged by log-sum-exp. Same result, same contract.

    ``return_lse``: return ``(out, lse)``, ``lse (B, H, Sq)`` each row's natural-log log-sum-exp over the keys it
    sees (``-inf`` for a row that sees none), in float32 at least, differentiable like ``out``: both schedules
    compute it anyway (the flash kernel returns it; the key-major merge needs it), and its gradient rides along in
    the kernel's backward (:func:`attnzoo.kernels.dense.lse_grad_inputs`); without it no extra work is done.
    """
    selection.check(q, k)
    if mask is None and bias is None and KEY_MAJOR * selection.block_q <= selection.block_k:
        return routed_attention(q, k, v, selection, scale=scale, causal=causal, return_lse=return_lse)
    b, h, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk, nq, nk = selection.block_q, selection.block_k, selection.num_q_blocks, selection.num_kv_blocks
    hs = selection.indices.shape[1]
    e = max(hs, hkv)  # selection heads as the kernel runs them: one per K/V head at least
    ge = h // e  # query heads stacked as rows of a unit
    indices = selection.indices.to(q.device)
    if hs < e:
        indices = indices.repeat_interleave(e // hs, dim=1)
    # (1, 1, B·E·nq, bq·Ge, D): unit (b, e, a) is row block (b·E + e)·nq + a, its rows position-major, head-minor
    qp = F.pad(q, (0, 0, 0, nq * bq - sq)) if nq * bq != sq else q
    q_blocks = qp.reshape(b, e, ge, nq * bq, d).transpose(2, 3).reshape(1, 1, b * e * nq, bq * ge, d)
    kp, vp = (F.pad(k, (0, 0, 0, nk * bk - skv)), F.pad(v, (0, 0, 0, nk * bk - skv))) if nk * bk != skv else (k, v)
    k_blocks, v_blocks = kp.reshape(1, 1, b * hkv * nk, bk, d), vp.reshape(1, 1, b * hkv * nk, bk, dv)
    out, lse = _run(q_blocks, k_blocks, v_blocks, scale,
                    _SelectionPlan(indices, selection, h, hkv, d, dv, causal, mask, bias, q.dtype), return_lse)

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # unit rows (1, 1, B·E·nq, bq·Ge, ·) as (B, H, Sq, ·)
        x = x.view(b, e, nq * bq, ge, x.shape[-1]).transpose(2, 3).reshape(b, h, nq * bq, x.shape[-1])
        return x[:, :, :sq] if nq * bq != sq else x

    if lse is None:
        return heads_first(out)
    return heads_first(out), heads_first(lse.unsqueeze(-1)).squeeze(-1)


class _SelectionPlan(_Plan):
    """The chunks of :func:`selected_attention`, with :class:`_Plan`'s interface (``chunks``, ``gather``,
    ``logits``, ``keep``, ``bs`` = key block size) over the flattened units: ``b = hkv = 1``, a chunk is ``rows (n,
    1)`` unit indices and ``cols (n, c)`` flat key block indices ``(b·Hkv + kv head)·Nk + block``, ascending.

    Units are grouped by their count and by whether they hold a *partial* block (one the causal mask cuts, or the
    padded last key block), so that chunks of whole blocks run with no logits at all. Without a user mask/bias,
    when ``block_q == block_k`` and the causal offset ``Skv − Sq`` is a multiple of the block, a unit whose only
    partial block is its diagonal block has it last (indices ascending), and its logits are one lower triangle in
    the last ``block_k`` columns, the same for every such unit: built once per width and broadcast over the chunk.
    """

    def __init__(self, indices: torch.Tensor, selection: BlockSelection, h: int, hkv: int, d: int, dv: int,
                 causal: bool, mask: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        b, e, nq, _ = indices.shape
        self.b, self.hkv, self.g, self.dtype = 1, 1, h // e, dtype
        self.bq, self.bs, self.nq, self.nk = selection.block_q, selection.block_k, nq, selection.num_kv_blocks
        self.sq, self.skv, self.causal, self.heads, self.e = selection.seq_q, selection.seq_kv, causal, h, e
        self.offset = self.skv - self.sq
        self.mask = None if mask is None else mask.expand(b, h, self.sq, self.skv)
        self.bias = None if bias is None else bias.expand(b, h, self.sq, self.skv)
        self.user = mask is not None or bias is not None
        self.triangle = (not self.user and causal and self.bq == self.bs and self.offset % self.bs == 0)
        self.triangles: dict[int, torch.Tensor] = {}
        device = indices.device
        nk = self.nk
        # (units, K): each unit's key blocks ascending, unused slots (as nk) last
        ordered = torch.where(indices < 0, nk, indices).sort(dim=-1).values.flatten(0, 2)
        valid = ordered < nk
        counts = valid.sum(dim=-1)
        unit = torch.arange(ordered.shape[0], device=device)
        partial = valid & (ordered == nk - 1) & (nk * self.bs != self.skv)
        if causal:  # the block's last key is after the unit's first query may see
            partial |= valid & ((ordered + 1) * self.bs - 1 > (unit % nq * self.bq + self.offset).unsqueeze(1))
        # 0: whole blocks only; 1: only the diagonal block, last, is cut (the shared triangle); 2: general logits
        diagonal = ordered.gather(1, (counts - 1).clamp(min=0).unsqueeze(1)).squeeze(1) == (
            unit % nq * self.bq + self.offset) // self.bs
        only_last = partial.sum(dim=-1) == partial.gather(1, (counts - 1).clamp(min=0).unsqueeze(1)).squeeze(1).long()
        kind = torch.where(partial.any(dim=-1), 2, 0)
        if self.triangle:
            kind = torch.where((kind == 2) & diagonal & only_last, 1, kind)
        if self.user:
            kind = torch.full_like(kind, 2)
        # flat key block index of each slot: the unit's (batch, K/V head) row of blocks
        group = unit // nq
        kv_row = (group // e) * hkv + (group % e) // (e // hkv)
        flat = ordered + (kv_row * nk).unsqueeze(1)
        key = counts * 3 + kind
        by_key = key.argsort(stable=True)
        distinct, sizes = torch.unique_consecutive(key[by_key], return_counts=True)
        elem = torch.empty(0, dtype=dtype).element_size()
        self.chunks: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.kinds: list[int] = []  # per chunk
        start = 0
        for k_, size in zip(distinct.tolist(), sizes.tolist(), strict=True):
            units, (c, chunk_kind) = by_key[start : start + size], divmod(k_, 3)
            start += size
            if c == 0:
                self.chunks.append((units.unsqueeze(1), None))
                continue
            per_unit = elem * (self.bq * self.g * (d + dv) + c * self.bs * (d + dv)
                               + (2 * self.bq * self.g * c * self.bs if chunk_kind == 2 else 0))
            step = max(1, GATHER_BYTES // per_unit)
            cols = flat[units, :c]
            self.chunks += [(units[s : s + step].unsqueeze(1), cols[s : s + step]) for s in range(0, size, step)]
            self.kinds += [chunk_kind] * (len(self.chunks) - len(self.kinds))
        self.q_pos = torch.arange(self.bq, device=device)
        self.positions = torch.arange(self.bs, device=device)

    def logits(self, chunk: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Chunk ``chunk``'s additive logits, broadcastable to ``(1, n, bq·G, c·bk)`` (None when no element is
        masked) and, when some row may see no key, which rows see one ``(n, bq, G|1)`` (the others get 0 logits;
        :meth:`keep` zeroes them)."""
        rows, cols = self.chunks[chunk]
        assert cols is not None
        n, c = cols.shape
        width = c * self.bs
        if self.kinds[chunk] == 0:
            return None, None
        if self.kinds[chunk] == 1:
            return self._triangle(width), None
        units = rows[:, 0]
        blocks = cols % self.nk
        first = units % self.nq * self.bq  # each unit's first query
        qi = first.unsqueeze(1) + self.q_pos  # (n, bq)
        ki = (blocks * self.bs).unsqueeze(2).add(self.positions).view(n, width)  # (n, W)
        seen = (ki < self.skv).view(n, 1, 1, width)
        if self.causal:
            seen = seen & (ki.view(n, 1, 1, width) <= (qi + self.offset).view(n, self.bq, 1, 1))
        if self.user:
            bi = (units // (self.nq * self.e)).view(n, 1, 1, 1)
            hi = ((units // self.nq) % self.e * self.g).view(n, 1, 1, 1) + torch.arange(
                self.g, device=units.device).view(1, 1, self.g, 1)
            qc, kc = qi.clamp(max=self.sq - 1).view(n, self.bq, 1, 1), ki.clamp(max=self.skv - 1).view(n, 1, 1, width)
            if self.mask is not None:
                seen = seen & self.mask[bi, hi, qc, kc]
        some = seen.any(dim=-1)  # (n, bq, G|1)
        attn = torch.zeros(seen.shape, dtype=self.dtype, device=cols.device).masked_fill_(
            ~seen & some.unsqueeze(-1), float("-inf"))
        if self.bias is not None:
            attn = attn + self.bias[bi, hi, qc, kc]
        attn = attn.expand(n, self.bq, self.g, width).reshape(1, n, self.bq * self.g, width)
        return attn, (None if bool(some.all()) else some)

    def _triangle(self, width: int) -> torch.Tensor:
        """``(1, 1, bq·G, width)`` logits: 0, but −inf above the diagonal of the last ``block_k`` columns."""
        if width not in self.triangles:
            above = torch.ones(self.bq, self.bs, dtype=torch.bool, device=self.q_pos.device).triu_(1)
            t = torch.zeros(self.bq, self.g, width, dtype=self.dtype, device=self.q_pos.device)
            t[..., width - self.bs :].masked_fill_(above.unsqueeze(1), float("-inf"))
            self.triangles[width] = t.view(1, 1, self.bq * self.g, width)
        return self.triangles[width]

    def keep(self, x: torch.Tensor, some: torch.Tensor | None) -> torch.Tensor:
        """``x (1, n, bq·G, Dv)`` with the rows that see no key zeroed."""
        if some is None:
            return x
        n = some.shape[0]
        return (x.view(n, self.bq, self.g, x.shape[-1]) * some.unsqueeze(-1).to(x.dtype)).view(x.shape)
