"""Banded / tiled attention: each tile of queries attends only to the keys it can see, never the full N×N scores.

A :class:`Tiling` is three tensors: ``q_tiles (n, T)`` (query indices of each tile), ``k_tiles (n, W)`` (the key
indices the tile may see, a superset of every visible key of its queries) and ``mask (n, T, W)`` (which of those each
query sees). Index ``-1`` pads a tile that has fewer than ``T`` queries or ``W`` keys. :func:`tiled_attention` reads
the keys of a chunk of tiles (strided views for 1-D bands, a gather otherwise) and runs one batched
``scaled_dot_product_attention`` over the chunk with an additive tile mask, so time is O(n·T·W·d) and memory
O(chunk·W·d) instead of O(N²).

Builders:
- :func:`band_tiles`: 1-D bands, for queries whose visible keys are ``[start_i, start_i + width)`` with
  ``start_{i+1} − start_i ∈ {0, 1}`` (sliding windows, neighborhoods, inside one dilation group): tile ``t`` of ``T``
  consecutive queries sees the ``T + width − 1`` keys from its first query's start (clamped into the sequence).
- :func:`product_tiles`: N-d tiles as the Cartesian product of per-axis tilings (each axis' tiles, key sets and
  masks), for layouts in row-major order: the tile mask is the AND of the per-axis masks.
- :func:`neighborhood_tiles`: the tiling of NATTEN neighborhoods and their strided generalisation (GNA): per axis and
  dilation group, bands of consecutive (whole stride groups of) positions, then their product.

:func:`cached_tiling` keeps a configuration's :class:`Tiling` in the shared cache (:mod:`attnzoo.kernels.cache`).

Rows with no visible key give 0 (forward and backward, never NaN). Under autograd, chunks whose keys are gathered
copies are checkpointed (recomputed in the backward pass), so training memory stays O(N·d) plus one chunk.

``return_lse=True`` also returns each row's log-sum-exp over its visible keys (``-inf`` for a row that sees none),
differentiable. A query lies in exactly one tile, so its row log-sum-exp is its tile's: each chunk then runs
:func:`attnzoo.kernels.dense.attention_lse` (the CPU flash kernel, whose backward also carries the log-sum-exp's
gradient; elsewhere dense per-tile scores) on the same gathered tiles with every hidden logit at ``-inf`` (fully
hidden rows included: the kernel returns ``0`` and ``-inf`` for them), always in bounded chunks. The plain call's
path is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnzoo.kernels.cache import cached
from attnzoo.kernels.dense import attention_lse
from attnzoo.masks.neighborhood import neighborhood_axis, stride_leader

CHUNK_BYTES = 96 << 20
NEIGHBORHOOD_TILES = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}  # query tile per axis of a 1-D, 2-D, 3-D neighborhood

Tiles = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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


def strided_band_tiles(
    length: int, dilation: int, starts: Callable[[int], torch.Tensor], width: int, tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`band_tiles` inside each residue class ``x ≡ g (mod dilation)`` of ``[0, length)``, over coordinates.

    ``starts(group_len)`` gives the (group-position) starts of a class of ``group_len`` positions; the classes' tiles
    are mapped back to coordinates ``g + dilation · u`` and stacked (:func:`concat_tiles`).
    """
    groups = []
    for g in range(min(dilation, length)):
        group_len = (length - g + dilation - 1) // dilation
        qu, ku = band_tiles(starts(group_len), width, group_len, tile)
        groups.append((torch.where(qu >= 0, g + dilation * qu, -1), g + dilation * ku))
    return concat_tiles(groups)


def concat_tiles(tilings: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack several ``(q_tiles, k_tiles)`` tilings into one, padding narrower ones with ``-1``."""
    t = max(q.shape[1] for q, _ in tilings)
    w = max(k.shape[1] for _, k in tilings)
    qs = [F.pad(q, (0, t - q.shape[1]), value=-1) for q, _ in tilings]
    ks = [F.pad(k, (0, w - k.shape[1]), value=-1) for _, k in tilings]
    return torch.cat(qs), torch.cat(ks)


def product_tiles(axes: Sequence[Tiles], layout: Sequence[int]) -> Tiles:
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


def neighborhood_tiles(
    layout: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
    causal: Sequence[bool],
) -> Tiles:
    """The tiling of the strided neighborhood :func:`attnzoo.masks.neighborhood.generalized_neighborhood`.

    Per axis and dilation group, tiles of consecutive group positions whose size is a multiple of the stride
    (:data:`NEIGHBORHOOD_TILES`, rounded down to a multiple of ``s``, at least ``s``). A tile holds whole stride groups,
    so its queries' windows lie in the ``tile + k − 1`` positions from its first query's window start; the tile mask
    is the predicate's axis rule. N-d tiles are the per-axis products. Stride 1 is plain neighborhood attention.
    """
    per_axis = []
    for length, k, s, d, c, tile in zip(layout, kernel, stride, dilation, causal, NEIGHBORHOOD_TILES[len(layout)],
                                        strict=True):

        def starts(group_len: int, k: int = k, s: int = s, c: bool = c) -> torch.Tensor:
            leader = stride_leader(torch.arange(group_len), group_len, s, c)
            return leader - k + 1 if c else torch.clamp(leader - k // 2, min=0, max=group_len - k)

        q_tiles, k_tiles = strided_band_tiles(length, d, starts, k, s * max(1, tile // s))
        seen = neighborhood_axis(q_tiles.unsqueeze(2), k_tiles.unsqueeze(1), length, k, d, c, s)
        per_axis.append((q_tiles, k_tiles, seen))
    return product_tiles(per_axis, layout)


def cached_tiling(key: Hashable, device: torch.device, build: Callable[[], Tiles]) -> Tiling:
    """The :class:`Tiling` of the tiles ``build()`` makes for a configuration ``key`` (which must identify them),
    built once per device (O(n·T·W)) and kept in the shared configuration cache."""
    return cached(("tiling", key), device, lambda: Tiling(*(t.to(device) for t in build())))


def _combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where((a >= 0) & (b >= 0), a + b, -1)


class Tiling:
    """A tiling ``(q_tiles (n, T), k_tiles (n, W), mask (n, T, W))`` plus what :func:`tiled_attention` derives from it.

    Build once per configuration and reuse (the derived additive masks are cached per dtype). When every tile's keys
    are a contiguous range (1-D bands), runs of tiles whose ranges start at a constant step are read as strided views
    of K and V (``unfold``): no gathered copies.
    """

    def __init__(self, q_tiles: torch.Tensor, k_tiles: torch.Tensor, mask: torch.Tensor) -> None:
        self.q_tiles, self.k_tiles = q_tiles, k_tiles
        self.mask = mask & (k_tiles >= 0).unsqueeze(1)
        flat = q_tiles.flatten()
        valid = torch.nonzero(flat >= 0).squeeze(1)
        self.position = torch.empty(int(flat.max()) + 1, dtype=torch.long, device=flat.device)
        self.position[flat[valid]] = valid  # row of the flattened tiles holding each query
        self.empty_rows = bool(((~self.mask.any(dim=-1)) & (q_tiles >= 0)).any())
        w = k_tiles.shape[1]
        lo = k_tiles[:, 0]
        contiguous = bool((k_tiles == lo.unsqueeze(1) + torch.arange(w, device=lo.device)).all())
        self.lo: list[int] | None = lo.tolist() if contiguous else None
        self._additive: dict[torch.dtype, torch.Tensor] = {}

    def to(self, device: torch.device) -> Tiling:
        return self if self.q_tiles.device == device else Tiling(*(t.to(device) for t in (
            self.q_tiles, self.k_tiles, self.mask)))

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as 0 / −inf logits ``(n, T, W)``; rows with no visible key are all 0 (their output is zeroed)."""
        if dtype not in self._additive:
            hidden = ~self.mask & self.mask.any(dim=-1, keepdim=True)
            self._additive[dtype] = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill_(
                hidden, float("-inf"))
        return self._additive[dtype]

    def chunks(self, size: int) -> list[tuple[int, int, int | None]]:
        """``(start, end, step)`` runs of at most ``size`` tiles; ``step`` is the constant key-range step of a run of
        contiguous key ranges (``None``: gather the keys)."""
        n = self.q_tiles.shape[0]
        if self.lo is None:
            return [(s, min(s + size, n), None) for s in range(0, n, size)]
        out: list[tuple[int, int, int | None]] = []
        start = 0
        while start < n:
            end = start + 1
            step = self.lo[end] - self.lo[start] if end < n else 0
            while end < n and end - start < size and self.lo[end] - self.lo[end - 1] == step:
                end += 1
            out.append((start, end, step))
            start = end
        return out


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, tiling: Tiling,
    mask: torch.Tensor | None = None, bias: torch.Tensor | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, ·)`` restricted to a tiling (and, with
    ``return_lse``, the rows' log-sum-exp ``(B, H, Sq)``).

    Every query index must appear exactly once in the tiling. ``mask``/``bias``: optional 4-D views broadcastable to
    ``(B, H, Sq, Skv)`` (gathered per tile: a dense user mask costs O(N·W) reads, not O(N²) compute). GQA stacks the
    query heads of a group as extra rows, so K/V are never repeated. The tile mask is an additive float mask shared by
    batch and heads (about twice as fast in SDPA as a boolean one).
    """
    b, h, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    device = q.device
    tiling = tiling.to(device)
    t, w = tiling.q_tiles.shape[1], tiling.k_tiles.shape[1]
    additive = tiling.additive(q.dtype)
    zero_empty = tiling.empty_rows or mask is not None
    # (B, Hkv, Sq, G, D): the G query heads sharing a K/V head are the last-but-one axis, gathered as rows.
    q_rows = q.reshape(b, hkv, g, sq, d).transpose(2, 3)
    kk, vv = k.reshape(b * hkv, skv, d), v.reshape(b * hkv, skv, dv)
    # Strided K/V views with the cached tile mask cost no memory per tile (SDPA never stores the scores), so such runs
    # go whole: one SDPA each, and the backward does not zero-fill full-size gradients once per chunk. Gathered K/V and
    # gathered user masks/biases are copies, so those chunks are bounded to CHUNK_BYTES.
    per_tile = b * hkv * (w * (d + dv) + 2 * t * g * w) * q.element_size()
    bounded = mask is not None or bias is not None or tiling.lo is None or return_lse
    chunks = tiling.chunks(max(1, CHUNK_BYTES // max(per_tile, 1)) if bounded else tiling.q_tiles.shape[0])

    def run(q_rows: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, start: int, end: int, step: int | None
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        qi, ki = tiling.q_tiles[start:end], tiling.k_tiles[start:end]
        nc = end - start
        qg = q_rows[:, :, qi.clamp(min=0).flatten()].reshape(b * hkv, nc, t * g, d)
        if step is None:
            kc = ki.clamp(min=0).flatten()
            kg, vg = kk[:, kc].view(b * hkv, nc, w, d), vv[:, kc].view(b * hkv, nc, w, dv)
        else:
            kg, vg = _bands(kk, tiling.lo[start], nc, w, step), _bands(vv, tiling.lo[start], nc, w, step)
        attn = additive[start:end].view(1, 1, nc, t, 1, w)
        some = None
        if return_lse or zero_empty:
            seen = tiling.mask[start:end].view(1, 1, nc, t, 1, w)
            if mask is not None:
                seen = seen & gather_pairs(mask, qi, ki, hkv, g)
            if return_lse:  # every hidden logit at -inf, fully hidden rows too (attention_lse gives them 0, -inf)
                attn = attn.masked_fill(~seen, float("-inf"))
            else:
                if mask is not None:
                    attn = attn.masked_fill(~seen & seen.any(dim=-1, keepdim=True), float("-inf"))
                some = seen.any(dim=-1, keepdim=True)
        if bias is not None:
            attn = attn + gather_pairs(bias, qi, ki, hkv, g)
        if g > 1:
            attn = attn.expand(*attn.shape[:4], g, w)
        if attn.shape[0] * attn.shape[1] not in (1, b * hkv):
            attn = attn.expand(b, hkv, *attn.shape[2:])
        attn = attn.reshape(-1, nc, t * g, w)
        if return_lse:
            out, lse = attention_lse(qg, kg, vg, causal=False, scale=scale, mask=None, bias=attn)
            return out.reshape(b, hkv, nc * t, g, dv), lse.reshape(b, hkv, nc * t, g)
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn, scale=scale)
        out = out.reshape(b, hkv, nc * t, g, dv)
        return out if some is None else out * some.reshape(some.shape[0], some.shape[1], nc * t, -1, 1).to(out.dtype)

    rows = tiling.q_tiles.shape[0] * t
    if torch.is_grad_enabled():
        # Gathered K/V bands are copies: under autograd they are recomputed in the backward pass instead of being kept.
        recompute = len(chunks) > 1
        results = [
            checkpoint(run, q_rows, kk, vv, *c, use_reentrant=False) if recompute and c[2] is None
            else run(q_rows, kk, vv, *c)
            for c in chunks
        ]
        parts = [r if isinstance(r, tuple) else (r,) for r in results]
        # (B, Hkv, n·T, G, Dv) and, with return_lse, (B, Hkv, n·T, G)
        outs = [p[0] if len(parts) == 1 else torch.cat(p, dim=2) for p in zip(*parts, strict=True)]
    else:  # outputs written chunk by chunk: nothing a chunk allocates outlives it
        outs = [q.new_empty(b, hkv, rows, g, dv)]
        if return_lse:
            outs.append(q.new_empty(b, hkv, rows, g, dtype=torch.promote_types(q.dtype, torch.float32)))
        for c in chunks:
            result = run(q_rows, kk, vv, *c)
            for buffer, x in zip(outs, result if isinstance(result, tuple) else (result,), strict=True):
                buffer[:, :, c[0] * t : c[1] * t] = x
    out = outs[0][:, :, tiling.position].transpose(2, 3).reshape(b, h, sq, dv)
    if not return_lse:
        return out
    return out, outs[1][:, :, tiling.position].transpose(2, 3).reshape(b, h, sq)


def _bands(x: torch.Tensor, lo: int, count: int, width: int, step: int) -> torch.Tensor:
    """Ranges `[lo + i·step, lo + i·step + width)`, i < count, of `x (BH, S, D)` as a view `(BH, count, W, D)`."""
    if step == 0:
        return x[:, lo : lo + width].unsqueeze(1).expand(-1, count, -1, -1)
    span = x[:, lo : lo + (count - 1) * step + width]
    return span.unfold(1, width, step).transpose(-1, -2)


def gather_pairs(t: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
    """A 4-D mask/bias view gathered at (query, key) pairs of tiles: ``(B', Hkv|1, nc, T, G|1, W)``."""
    rows = qi.clamp(min=0) if t.shape[2] > 1 else torch.zeros_like(qi)
    cols = ki.clamp(min=0) if t.shape[3] > 1 else torch.zeros_like(ki)
    picked = t[:, :, rows.unsqueeze(-1), cols.unsqueeze(1)]  # (B', H', nc, T, W)
    bb, hh, nc, tt, ww = picked.shape
    if hh == 1:
        return picked.view(bb, 1, nc, tt, 1, ww)
    return picked.view(bb, hkv, g, nc, tt, ww).permute(0, 1, 3, 4, 2, 5)
