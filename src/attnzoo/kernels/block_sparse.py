"""Block-sparse attention: query blocks attend to whole key blocks, with no per-element mask.

A :class:`BlockLayout` is built once from a boolean block mask ``(nq, nk)`` and a block size ``B``: query block ``a``
(queries ``[a·B, (a+1)·B)``) sees every key of the key blocks ``b`` with ``blocks[a, b]``. The last key block may be
partial (``nk = ⌈Skv / B⌉``), and queries from ``nq·B`` on (a *dense query tail*, e.g. text after a video) see every
key, so sequences need not be multiples of ``B``.

:func:`block_sparse_attention` groups runs of up to ``RUN`` consecutive query blocks with equal rows by their run
length and number ``c`` of visible key blocks; each group runs as batched ``scaled_dot_product_attention`` calls of a
run's queries against its ``c·B`` gathered keys, with no mask (but on the padding of a partial last key block): the
work is exactly the visible blocks' ``Σ B²·d`` and the fused kernel never sees a masked element.
Gathered K/V copies are bounded to ``CHUNK_BYTES`` per call and, under autograd, recomputed in the backward pass
(checkpointed) instead of kept, so memory stays O(N·d) plus one chunk. A user mask/bias is gathered at the chunk's
(query, key) pairs (:func:`attnzoo.kernels.band.gather_pairs`); rows with no visible key give 0, never NaN.
GQA stacks the query heads of a group as extra rows, so K/V are never repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnzoo.kernels.band import gather_pairs

RUN = 4  # at most this many consecutive query blocks with equal key blocks attend as one
# Gathered K/V per SDPA call. Small on purpose: CPU allocations above glibc's mmap threshold (≤ 32 MiB) come back as
# fresh pages every call, and first-touch page faults then cost more than the copy (measured: 45 MiB gathers 12×
# slower than the same bytes in 4.5 MiB pieces).
GATHER_BYTES = 8 << 20


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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    layout: BlockLayout,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, ·)`` restricted to a block layout.

    The layout covers the first ``nq·B ≤ Sq`` queries and all keys (``nk = ⌈Skv / B⌉``; the last key block may be
    partial: K/V are zero-padded once and the padded keys masked). ``mask``/``bias``: optional 4-D views
    broadcastable to ``(B, H, Sq, Skv)``, applied on top of the layout.
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
    positions = torch.arange(bs, device=q.device)

    def run(q_blocks: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, rows: torch.Tensor,
            cols: torch.Tensor) -> torch.Tensor:
        (n, r), c = rows.shape, cols.shape[1]
        width = c * bs
        qg = torch.index_select(q_blocks, 2, rows.flatten()).view(b * hkv, n, r * bs * g, d)
        kg = torch.index_select(k_blocks, 2, cols.flatten()).view(b * hkv, n, width, d)
        vg = torch.index_select(v_blocks, 2, cols.flatten()).view(b * hkv, n, width, dv)
        ki = (cols.unsqueeze(2) * bs + positions).view(n, width)
        attn = some = None
        if mask is not None or bias is not None:
            qi = (rows.unsqueeze(2) * bs + positions).view(n, r * bs)
            attn, some = _pair_logits(mask, bias, qi, ki, skv, hkv, g, q.dtype)
            attn = attn.expand(b, hkv, n, r * bs, g, width).reshape(b * hkv, n, r * bs * g, width)
        elif pad and bool((cols == nk - 1).any()):
            attn = torch.zeros(1, n, 1, width, dtype=q.dtype, device=q.device).masked_fill_(
                (ki >= skv).view(1, n, 1, width), float("-inf"))
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn, scale=scale)
        if some is not None:
            out = out.view(b, hkv, n * r * bs, g, dv) * some.reshape(some.shape[0], some.shape[1], n * r * bs, -1,
                                                                     1).to(out.dtype)
        return out.view(b, hkv, n * r, bs * g, dv)

    chunks = []
    for rows, cols in layout.groups:
        r, c = rows.shape[1], cols.shape[1]
        if c == 0:  # these query blocks see no key at all
            chunks.append((rows, None))
            continue
        per_run = b * hkv * c * bs * (d + dv + (0 if mask is None and bias is None else 2 * r * bs * g))
        step = max(1, GATHER_BYTES // max(1, per_run * q.element_size()))
        chunks += [(rows[s : s + step], cols[s : s + step]) for s in range(0, rows.shape[0], step)]
    recompute = torch.is_grad_enabled() and len(chunks) > 1
    # Results are written in place into one output (fresh allocations per piece cost page faults on CPU).
    out = q.new_empty(b, h, sq, dv)
    rows_out = out[:, :, : nq * bs].view(b, hkv, nq, bs, dv) if g == 1 else q.new_empty(b, hkv, nq, bs * g, dv)
    for rows, cols in chunks:
        if cols is None:
            res = q.new_zeros(b, hkv, rows.numel(), bs * g, dv)
        elif recompute:
            res = checkpoint(run, q_blocks, k_blocks, v_blocks, rows, cols, use_reentrant=False)
        else:
            res = run(q_blocks, k_blocks, v_blocks, rows, cols)
        rows_out.index_copy_(2, rows.flatten(), res.view(b, hkv, rows.numel(), *rows_out.shape[3:]))
    if g > 1:
        out[:, :, : nq * bs] = rows_out.view(b, hkv, nq * bs, g, dv).transpose(2, 3).reshape(b, h, nq * bs, dv)
    if sq > nq * bs:
        out[:, :, nq * bs :] = _dense_rows(q, k, v, nq * bs, scale, mask, bias)
    return out


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
                mask: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Rows ``[start, Sq)`` attending to every key (the dense query tail)."""
    qt = q[:, :, start:]
    attn = some = None
    if mask is not None:
        seen = mask if mask.shape[2] == 1 else mask[:, :, start:]
        some = seen.any(dim=-1, keepdim=True)
        attn = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen & some, float("-inf"))
    if bias is not None:
        attn = (0 if attn is None else attn) + (bias if bias.shape[2] == 1 else bias[:, :, start:])
    out = F.scaled_dot_product_attention(qt, k, v, attn_mask=attn, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out if some is None else out * some.to(out.dtype)
