"""Attention of each query over a disjoint union of key sets ("parts"), merged by log-sum-exp, on the CPU flash kernel.

A query's visible keys are split into disjoint *parts*; each part is a list of :class:`TileGroup` s — tiles of query
indices ``q (n, T)`` (``-1`` pads a short tile), the key indices every tile of the part sees ``k (n, W)`` (real keys,
no padding) and a boolean mask ``(n|1, T, W)`` of which of them each query sees (``None``: all). Inside one part a
query appears at most once; across parts its key sets must be disjoint (their union is what it sees). Nothing is
ever computed on the ``N × N`` scores.

Forward (:class:`_UnionAttention`): per chunk of tiles, the Q/K/V rows are gathered and the CPU flash kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``) returns the chunk output ``o_p`` and its log-sum-exp
``lse_p``; they are merged into one global output ``O`` and log-sum-exp ``L`` by the online rule
``L' = logaddexp(L, lse_p)``, ``O ← O·e^{L − L'} + o_p·e^{lse_p − L'}``. Masked logits are a large finite negative
(``−finfo.max / 2``), not ``−inf``: a tile row that sees no key of its part gets a finite ``lse_p`` about that low,
which weighs 0 in the merge, never NaN. Rows in no part keep ``O = 0`` (their ``L`` stays ``−inf``).

Backward (the ring-attention identity; no gradient of ``L`` needed): per chunk the flash kernel's backward gets
``dO``, the *global* ``O`` and the *global* ``L`` rows. It then forms ``P = exp(S − L)`` — the global softmax
probabilities restricted to the part's keys — and ``D = rowsum(dO ∘ O)``, so ``dS = P ∘ (dO·Vᵀ − D)`` is exactly the
part's share of the full gradient: ``dQ`` contributions add over parts and ``dK``/``dV`` scatter-add (``index_add_``
into buffers allocated once). Saved: Q, K, V, O and L only. Per-chunk temporaries stay within ``GATHER_BYTES`` (fresh
CPU allocations above ~32 MiB page-fault on every call).

Layout: Q, K, V, O and L are held row-major, ``(S, G, B·Hkv, ·)`` (one copy of the inputs per call), so a gather of
positions copies whole contiguous rows of every batch and head (``index_select`` on dim 0: ~4× faster than along the
sequence axis of ``(B, H, S, D)``) and the kernel reads the result as a strided ``(B·Hkv, n, rows, ·)`` view. Tiles
whose query or key indices are ``first + t·step + arange(w)`` (detected when a group is built) are not gathered at
all: they are strided (possibly overlapping) views of those tensors, and a chunk whose query rows form one range is
merged in place on that slice.

Log-sum-exp (``return_lse=True``): ``L`` is the merged log-sum-exp the forward keeps anyway (``-inf`` for rows in no
part); its gradient ``g`` joins every chunk's flash backward through
:func:`attnzoo.kernels.dense.lse_grad_inputs` (a ones column appended to V, ``g`` to dO, 0 to O, zero columns to Q
and K, once for the whole row-major tensors), since ``∂L/∂s_j`` is the same global ``P`` restricted to the part. With
``return_lse=False`` the outputs are the same and the backward gets no ``g`` (nothing is widened). A row that lies in
some part must see at least one key of its parts (radial: its own frame), else its ``L`` would be the finite masked
value rather than ``-inf``.

GQA: the ``G`` query heads that share a K/V head are stacked as rows of a tile (``T·G`` rows), K/V never repeated.
Requires ``D == Dv`` (the CPU flash kernel's constraint); any float dtype (the merge runs in at least fp32).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from attnzoo.kernels.block_sparse import GATHER_BYTES
from attnzoo.kernels.dense import flash_cpu, flash_cpu_backward, lse_grad_inputs


class TileGroup:
    """Tiles of one part that share their shape: queries ``q (n, T)`` (``-1`` pads), keys ``k (n, W)`` and the mask
    ``(n|1, T, W)`` of which keys each query sees (``None``: every key). Additive masks are cached per dtype and G."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        if mask is not None and bool(mask.all()):
            mask = None
        self.q, self.k, self.mask = q, k, mask
        # (first, step) when tile t's queries / keys are the consecutive indices from first + t·step: such tiles are
        # read as strided views (no gathered copies) and, when the query rows of a chunk are contiguous, merged in
        # place on a slice
        self.q_steps, self.k_steps = _progression(q), _progression(k)
        self._additive: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def to(self, device: torch.device) -> TileGroup:
        if self.q.device == device:
            return self
        return TileGroup(self.q.to(device), self.k.to(device), None if self.mask is None else self.mask.to(device))

    def additive(self, dtype: torch.dtype, g: int) -> torch.Tensor | None:
        """The mask as ``0 / −finfo.max/2`` logits ``(1, n|1, T·G, W)`` (rows stacked as (T, G))."""
        if self.mask is None:
            return None
        key = (dtype, g)
        if key not in self._additive:
            m, t, w = self.mask.shape
            neg = -torch.finfo(dtype).max / 2
            add = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill_(~self.mask, neg)
            self._additive[key] = add.unsqueeze(2).expand(m, t, g, w).reshape(1, m, t * g, w)
        return self._additive[key]


Part = list[TileGroup]


def _progression(index: torch.Tensor) -> tuple[int, int] | None:
    """``(first, step)`` if ``index (n, w)`` is ``first + t·step + arange(w)`` for every row ``t`` (``step ≥ 0``),
    else None."""
    n, w = index.shape
    if n == 0 or bool((index < 0).any()):
        return None
    starts = index[:, 0]
    step = int(starts[1] - starts[0]) if n > 1 else 0
    windows = starts.unsqueeze(1) + torch.arange(w, device=index.device)
    if step < 0 or not torch.equal(index, windows) or not torch.equal(
            starts, starts[0] + step * torch.arange(n, device=index.device)):
        return None
    return int(starts[0]), step


class UnionPlan:
    """Parts cut into chunks for given batch/head/dim sizes (build per call; cheap)."""

    def __init__(self, parts: list[Part], seq_q: int, b: int, hkv: int, g: int, d: int, dv: int,
                 dtype: torch.dtype) -> None:
        self.seq_q, self.b, self.hkv, self.g = seq_q, b, hkv, g
        size = torch.empty(0, dtype=dtype).element_size()
        self.chunks: list[tuple[TileGroup, int, int]] = []  # (group, first tile, end tile)
        for part in parts:
            for group in part:
                n, t = group.q.shape
                w = group.k.shape[1]
                # gathered Q, O, dO rows (+ output, LSE) and K, V rows, plus a per-tile mask if not shared
                per_tile = b * hkv * size * (t * g * (2 * d + 2 * dv + 2) + (0 if group.k_steps else w * (d + dv))
                                             + (t * g * w if group.mask is not None and group.mask.shape[0] > 1
                                                else 0))
                step = max(1, GATHER_BYTES // max(per_tile, 1))
                self.chunks += [(group, s, min(s + step, n)) for s in range(0, n, step)]

    def rows(self, group: TileGroup, start: int, end: int) -> torch.Tensor:
        """Query rows of tiles ``[start, end)``, padding mapped to the dummy row ``seq_q``."""
        qi = group.q[start:end].flatten()
        return torch.where(qi >= 0, qi, self.seq_q)

    def contiguous(self, group: TileGroup, start: int, end: int) -> tuple[int, int] | None:
        """The row range ``[r0, r1)`` when the chunk's query rows are exactly that range (merged on a slice)."""
        steps = group.q_steps
        t = group.q.shape[1]
        if steps is None or (steps[1] != t and end - start > 1):
            return None
        r0 = steps[0] + start * steps[1]
        return r0, r0 + (end - start) * t

    def mask(self, group: TileGroup, start: int, end: int, dtype: torch.dtype) -> torch.Tensor | None:
        add = group.additive(dtype, self.g)
        if add is None or add.shape[1] == 1:
            return add
        return add[:, start:end]


def union_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, parts: list[Part],
                    return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, D)`` where query ``i`` sees the union of its
    key sets in ``parts`` (disjoint; see the module docstring). Rows in no part give 0 (log-sum-exp ``-inf``). CPU,
    ``D == Dv``. With ``return_lse``, also the rows' log-sum-exp ``(B, H, Sq)`` (at least fp32)."""
    b, h, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    if d != dv:
        raise ValueError(f"union_attention needs equal query/key and value head dims, got {d} and {dv}")
    g = h // hkv
    device = q.device
    parts = [[group.to(device) for group in part] for part in parts]
    plan = UnionPlan(parts, sq, b, hkv, g, d, dv, q.dtype)
    out, lse = _UnionAttention.apply(q, k, v, scale, plan)  # (Sq, G, B·Hkv, Dv), (Sq, G, B·Hkv)
    out = out.view(sq, g, b, hkv, dv).permute(2, 3, 1, 0, 4).reshape(b, h, sq, dv)
    return (out, lse.view(sq, g, b, hkv).permute(2, 3, 1, 0).reshape(b, h, sq)) if return_lse else out


def _row_major(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``(B, H, S, E)`` as a contiguous ``(S, G, B·Hkv, E)`` (``H = Hkv·G``): a position's rows of every batch and
    head are adjacent, so a gather of positions copies whole contiguous rows."""
    b, h, s, e = x.shape
    return x.view(b, hkv, h // hkv, s, e).permute(3, 2, 0, 1, 4).reshape(s, h // hkv, b * hkv, e).contiguous()


def _gather(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``index`` (of ``n`` tiles) of a row-major ``x (S, [G,] B·Hkv, E)`` as the kernel's ``(B·Hkv, n, rows, E)``:
    a strided view of one contiguous gather (whole rows of every batch and head are copied at once, ~4× faster than
    gathering along the sequence axis of ``(B, H, S, E)``); the CPU flash kernel reads such strides directly."""
    picked = torch.index_select(x, 0, index)
    return picked.view(n, -1, x.shape[-2], x.shape[-1]).permute(2, 0, 1, 3)


def _take(x: torch.Tensor, index: torch.Tensor, n: int, steps: tuple[int, int] | None, start: int) -> torch.Tensor:
    """:func:`_gather`, or for tiles at constant steps (``steps = (first, step)`` of the whole group, this chunk from
    tile ``start``) the same ``(B·Hkv, n, rows, E)`` as a strided view of ``x`` (overlapping windows included)."""
    if steps is None:
        return _gather(x, index, n)
    row = x[0].numel()
    bh, e = x.shape[-2], x.shape[-1]
    rows = index.numel() // n * (row // (bh * e))
    first, step = steps
    return x.as_strided((bh, n, rows, e), (e, step * row, bh * e, 1), x.storage_offset() + (first + start * step) * row)


class _UnionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, plan: UnionPlan
                ) -> tuple[torch.Tensor, torch.Tensor]:
        bh, g, sq = plan.b * plan.hkv, plan.g, plan.seq_q
        dv = v.shape[-1]
        acc = torch.promote_types(q.dtype, torch.float32)
        qr = _row_major(q, plan.hkv)
        kr, vr = (_row_major(x, plan.hkv).view(x.shape[2], bh, x.shape[-1]) for x in (k, v))
        # one extra (dummy) row receives the padding of short tiles
        out = torch.zeros(sq + 1, g, bh, dv, dtype=acc, device=q.device)
        lse = torch.full((sq + 1, g, bh, 1), float("-inf"), dtype=acc, device=q.device)
        for group, start, end in plan.chunks:
            n = end - start
            rows = plan.rows(group, start, end)
            keys = group.k[start:end].flatten()
            o, chunk_lse = flash_cpu(_take(qr, rows.clamp(max=sq - 1), n, group.q_steps, start),
                                  _take(kr, keys, n, group.k_steps, start), _take(vr, keys, n, group.k_steps, start),
                                  0.0, False, attn_mask=plan.mask(group, start, end, q.dtype), scale=scale)
            # (B·Hkv, n, T·G, ·) -> rows (n·T, G, B·Hkv, ·)
            o = o.permute(1, 2, 0, 3).reshape(-1, g, bh, dv)
            chunk_lse = chunk_lse.permute(1, 2, 0).reshape(-1, g, bh, 1).to(acc)
            span = plan.contiguous(group, start, end)
            if span is not None:  # merge in place on the rows' slice
                old_l, old_o = lse[span[0] : span[1]], out[span[0] : span[1]]
                new_l = torch.logaddexp(old_l, chunk_lse)
                old_o.mul_((old_l - new_l).exp_()).addcmul_(o, (chunk_lse - new_l).exp_())
                old_l.copy_(new_l)
                continue
            old_l = torch.index_select(lse, 0, rows)
            new_l = torch.logaddexp(old_l, chunk_lse)
            merged = torch.index_select(out, 0, rows).mul_((old_l - new_l).exp_()).addcmul_(
                o, (chunk_lse - new_l).exp_())
            out.index_copy_(0, rows, merged)
            lse.index_copy_(0, rows, new_l)
        result = out[:sq].to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse[:sq])
        ctx.scale, ctx.plan = scale, plan
        ctx.set_materialize_grads(False)  # an unused log-sum-exp gets no gradient: nothing to widen
        return result, lse[:sq].squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor | None, grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        plan: UnionPlan = ctx.plan
        bh, g, sq = plan.b * plan.hkv, plan.g, plan.seq_q
        d, dv_ = q.shape[-1], v.shape[-1]
        qr = _row_major(q, plan.hkv)
        kr, vr = (_row_major(x, plan.hkv).view(x.shape[2], bh, x.shape[-1]) for x in (k, v))
        grad = torch.zeros_like(out) if grad is None else grad
        if grad_lse is not None:  # rows in no part (L = −inf) take no gradient
            grad_lse = grad_lse.masked_fill(torch.isneginf(lse.squeeze(-1)), 0.0)
            grad, qr, kr, vr, out = lse_grad_inputs(grad, grad_lse, qr, kr, vr, out)
        pad = (0, 0, 0, 0, 0, 0, 0, 1)  # a dummy row for the padding of short tiles: dO = 0 and L huge there, so P = 0
        grad = torch.nn.functional.pad(grad, pad)  # (also makes it contiguous, as strided views assume)
        out_p = torch.nn.functional.pad(out, pad)
        lse_p = torch.nn.functional.pad(lse, pad, value=torch.finfo(lse.dtype).max / 4)
        dq = torch.zeros(sq + 1, g, bh, qr.shape[-1], dtype=q.dtype, device=q.device)
        dk, dv = torch.zeros_like(kr), torch.zeros_like(vr)

        for group, start, end in plan.chunks:
            n = end - start
            rows = plan.rows(group, start, end)
            keys = group.k[start:end].flatten()
            qs, ks = group.q_steps, group.k_steps
            lse_rows = _take(lse_p, rows, n, qs, start).squeeze(-1)
            dqg, dkg, dvg = flash_cpu_backward(
                _take(grad, rows, n, qs, start), _take(qr, rows.clamp(max=sq - 1), n, qs, start),
                _take(kr, keys, n, ks, start), _take(vr, keys, n, ks, start), _take(out_p, rows, n, qs, start),
                lse_rows, 0.0, False, attn_mask=plan.mask(group, start, end, q.dtype), scale=ctx.scale)
            span = plan.contiguous(group, start, end)
            dqg = dqg.permute(1, 2, 0, 3).reshape(-1, g, bh, dqg.shape[-1])
            if span is not None:
                dq[span[0] : span[1]] += dqg
            else:
                dq.index_add_(0, rows, dqg)
            dk.index_add_(0, keys, dkg.permute(1, 2, 0, 3).reshape(-1, bh, dkg.shape[-1]))
            dv.index_add_(0, keys, dvg.permute(1, 2, 0, 3).reshape(-1, bh, dvg.shape[-1]))
        b, hkv = plan.b, plan.hkv
        dq = dq[:sq, ..., :d].reshape(sq, g, b, hkv, d).permute(2, 3, 1, 0, 4).reshape(q.shape)
        dk, dv = (x[..., :width].reshape(x.shape[0], b, hkv, width).permute(1, 2, 0, 3)
                  for x, width in ((dk, d), (dv, dv_)))
        needs = ctx.needs_input_grad
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None
