"""Banded / tiled attention: each tile of queries attends only to the keys it can see, never the full N×N scores.

A *tiling* is three tensors: ``q_tiles (n, T)`` (query indices of each tile), ``k_tiles (n, W)`` (the key indices the
tile may see, a superset of every visible key of its queries) and ``tile_mask (n, T, W)`` (which of those each query
sees). Index ``-1`` pads a tile that has fewer than ``T`` queries or ``W`` keys. :func:`tiled_attention` gathers the
keys of a chunk of tiles and runs one batched ``scaled_dot_product_attention`` over the chunk, so time is
O(n·T·W·d) and memory O(chunk·W·d) instead of O(N²).

Builders:
- :func:`band_tiles`: 1-D bands, for queries whose visible keys are ``[start_i, start_i + width)`` with
  ``start_{i+1} − start_i ∈ {0, 1}`` (sliding windows, neighborhoods, inside one dilation group): tile ``t`` of ``T``
  consecutive queries sees the ``T + width − 1`` keys from its first query's start (clamped into the sequence).
- :func:`product_tiles`: N-d tiles as the Cartesian product of per-axis tilings (each axis' tiles, key sets and
  masks), for layouts in row-major order: the tile mask is the AND of the per-axis masks.

Rows with no visible key give 0 (forward and backward, never NaN). Under autograd each chunk is checkpointed when
there is more than one, so training memory stays O(N·W/T·d) for the inputs of the recomputation only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 96 << 20

Tiling = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def band_tiles(starts: torch.Tensor, width: int, seq_kv: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of ``tile`` consecutive queries and the key band each can see.

    ``starts (Sq,)``: each query's first possibly visible key, unclamped, non-decreasing by steps of 0 or 1; every
    visible key of query ``i`` lies in ``[starts[i], starts[i] + width)``. Returns ``q_tiles (n, T)`` (``-1`` pads the
    last tile) and ``k_tiles (n, W)`` with ``W = min(T + width − 1, seq_kv)``: contiguous key ranges in the sequence.
    """
    seq_q = starts.shape[0]
    t = min(tile, seq_q)
    n = -(-seq_q // t)
    w = min(t + width - 1, seq_kv)
    q_tiles = torch.arange(n * t).view(n, t)
    q_tiles = torch.where(q_tiles < seq_q, q_tiles, -1)
    lo = torch.clamp(starts[:: t], min=0, max=seq_kv - w)
    return q_tiles, lo.unsqueeze(1) + torch.arange(w)


def concat_tiles(tilings: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack several ``(q_tiles, k_tiles)`` tilings into one, padding narrower ones with ``-1``."""
    t = max(q.shape[1] for q, _ in tilings)
    w = max(k.shape[1] for _, k in tilings)
    qs = [F.pad(q, (0, t - q.shape[1]), value=-1) for q, _ in tilings]
    ks = [F.pad(k, (0, w - k.shape[1]), value=-1) for _, k in tilings]
    return torch.cat(qs), torch.cat(ks)


def product_tiles(axes: Sequence[Tiling], layout: Sequence[int]) -> Tiling:
    """N-d tiling of a row-major layout from per-axis tilings ``(q_tiles_a, k_tiles_a, mask_a)`` over coordinates."""
    strides = [math.prod(layout[a + 1 :]) for a in range(len(layout))]
    q_flat = k_flat = mask = None
    for (qa, ka, ma), stride in zip(axes, strides, strict=True):
        qa_idx = torch.where(qa >= 0, qa * stride, -1)
        ka_idx = torch.where(ka >= 0, ka * stride, -1)
        if q_flat is None:
            q_flat, k_flat, mask = qa_idx, ka_idx, ma
            continue
        n0, t0 = q_flat.shape
        n1, t1 = qa_idx.shape
        w0, w1 = k_flat.shape[1], ka_idx.shape[1]
        q_flat = _combine(q_flat.view(n0, 1, t0, 1), qa_idx.view(1, n1, 1, t1)).reshape(n0 * n1, t0 * t1)
        k_flat = _combine(k_flat.view(n0, 1, w0, 1), ka_idx.view(1, n1, 1, w1)).reshape(n0 * n1, w0 * w1)
        mask = (mask.view(n0, 1, t0, 1, w0, 1) & ma.view(1, n1, 1, t1, 1, w1)).reshape(n0 * n1, t0 * t1, w0 * w1)
    assert q_flat is not None and k_flat is not None and mask is not None
    return q_flat, k_flat, mask


def _combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where((a >= 0) & (b >= 0), a + b, -1)


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_tiles: torch.Tensor,
    k_tiles: torch.Tensor,
    tile_mask: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, ·)`` restricted to a tiling.

    Every query index must appear exactly once in ``q_tiles``. ``mask``/``bias``: optional 4-D views broadcastable to
    ``(B, H, Sq, Skv)`` (gathered per tile, so a dense user mask costs O(N·W) reads, not O(N²) compute). GQA stacks the
    query heads of a group as extra rows: no K/V copies beyond the gathered bands.
    """
    b, h, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = h // hkv
    n, t = q_tiles.shape
    w = k_tiles.shape[1]
    device = q.device
    q_tiles, k_tiles, tile_mask = q_tiles.to(device), k_tiles.to(device), tile_mask.to(device)
    tile_mask = tile_mask & (k_tiles >= 0).unsqueeze(1)
    # (B, Hkv, Sq, G, D): the G query heads sharing a K/V head are the last-but-one axis, gathered as rows.
    q_rows = q.view(b, hkv, g, sq, d).transpose(2, 3)
    per_tile = b * hkv * (w * (d + dv) + 3 * t * g * w) * q.element_size()
    chunk = max(1, min(n, CHUNK_BYTES // max(per_tile, 1)))
    many = chunk < n and torch.is_grad_enabled()

    def run(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        qi, ki, tm = q_tiles[start : start + chunk], k_tiles[start : start + chunk], tile_mask[start : start + chunk]
        nc = qi.shape[0]
        kc = ki.clamp(min=0).flatten()
        qg = q_rows[:, :, qi.clamp(min=0).flatten()].reshape(b * hkv, nc, t * g, d)
        kg = k[:, :, kc].reshape(b * hkv, nc, w, d)
        vg = v[:, :, kc].reshape(b * hkv, nc, w, dv)
        seen = tm.view(1, 1, nc, t, 1, w)
        if mask is not None:
            seen = seen & _gather_pairs(mask, qi, ki, hkv, g)
        some = seen.any(dim=-1, keepdim=True)
        # An additive float mask broadcast over batch and heads is about twice as fast in SDPA as a boolean one.
        attn = torch.zeros(seen.shape, dtype=q.dtype, device=device).masked_fill_(~(seen | ~some), float("-inf"))
        if bias is not None:
            attn = attn + _gather_pairs(bias, qi, ki, hkv, g)
        attn = attn.expand(*attn.shape[:4], g, w)
        if attn.shape[0] * attn.shape[1] not in (1, b * hkv):
            attn = attn.expand(b, hkv, *attn.shape[2:])
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn.reshape(-1, nc, t * g, w), scale=scale)
        return out.view(b, hkv, nc, t, g, dv) * some.to(out.dtype)

    outs = []
    for start in range(0, n, chunk):
        if many:
            outs.append(checkpoint(run, q_rows, k, v, start, use_reentrant=False))
        else:
            outs.append(run(q_rows, k, v, start))
    out = torch.cat([o.view(b, hkv, -1, g, dv) for o in outs], dim=2)  # (B, Hkv, n·T, G, Dv)
    flat = q_tiles.flatten()
    valid = torch.nonzero(flat >= 0).squeeze(1)
    pos = torch.empty(sq, dtype=torch.long, device=device)
    pos[flat[valid]] = valid
    return out[:, :, pos].transpose(2, 3).reshape(b, h, sq, dv)


def _gather_pairs(t: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
    """A 4-D mask/bias view gathered at (query, key) pairs of tiles: ``(B', Hkv|1, nc, T, G|1, W)``."""
    rows = qi.clamp(min=0) if t.shape[2] > 1 else torch.zeros_like(qi)
    cols = ki.clamp(min=0) if t.shape[3] > 1 else torch.zeros_like(ki)
    picked = t[:, :, rows.unsqueeze(-1), cols.unsqueeze(1)]  # (B', H', nc, T, W)
    bb, hh, nc, tt, ww = picked.shape
    if hh == 1:
        return picked.view(bb, 1, nc, tt, 1, ww)
    return picked.view(bb, hkv, g, nc, tt, ww).permute(0, 1, 3, 4, 2, 5)
