"""Attention over a block selection made per query *token*, grouped by key block (MoBA's "varlen" trick).

A selection whose rows are single tokens (``block_q = 1``: MoBA routes every query token to its own ``top_k`` key
blocks) has no query blocks to gather key blocks for: gathering ``top_k`` key blocks per token would copy
``N·top_k·block_k·d`` keys. Instead, as MoBA's efficient kernel and FlashMoBA do, the (query token, key block)
pairs are grouped by key block: each key block meets the queries that chose it, like an expert meets its tokens in
a mixture of experts. Here the queries of a group are cut into tiles of :data:`TILE` rows (the last tile of a group
padded), so that one batched matmul computes every tile's scores against its key block. The softmax over each query's
selected keys is exact: its row maximum and normaliser are gathered across the tiles holding the query
(``scatter_reduce``/``index_add`` per query), and the outputs are added back per query. Time
``O(pairs·block_k·d)``, memory ``O(pairs·block_k)``; autograd through plain torch ops.

The causal mask is token-level inside the selected blocks (query ``i`` sees key ``j ≤ i + seq_kv − seq_q``); keys
past ``seq_kv`` in a ragged last block are never seen; a query with nothing selected (or nothing visible) gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnzoo.kernels.selection import BlockSelection

TILE = 64


def _pairs(selection: BlockSelection, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every selected (query row, key block) pair: the row in ``(B·heads·seq_q)`` order and the key block."""
    idx = selection.indices
    if idx.shape[1] != heads:
        idx = idx.repeat_interleave(heads // idx.shape[1], dim=1)
    if selection.block_q != 1:
        idx = idx.repeat_interleave(selection.block_q, dim=2)[:, :, : selection.seq_q]
    slots = idx.shape[-1]
    flat = idx.reshape(-1)
    kept = (flat >= 0).nonzero().squeeze(1)
    return kept // slots, flat[kept]


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: BlockSelection, *,
                     scale: float, causal: bool) -> torch.Tensor:
    """``softmax(scale·q·kᵀ)v`` of ``q (B, H, Sq, D)`` over the keys of ``k (B, Hkv, Skv, D)`` in the blocks that
    ``selection`` gives each query (and, if ``causal``, at or before it): ``(B, H, Sq, Dv)``."""
    b, h, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[-1]
    bk = selection.block_k
    nb = selection.num_kv_blocks
    rows = b * h * sq
    row, block = _pairs(selection, h)
    # group = (batch, kv head, key block); pairs sorted by group, then cut into tiles of TILE rows per group
    head = (row // sq) % h
    group = ((row // (h * sq)) * hkv + head // (h // hkv)) * nb + block
    order = group.argsort(stable=True)
    row, group = row[order], group[order]
    counts = torch.bincount(group, minlength=b * hkv * nb)
    tiles = (counts + TILE - 1) // TILE
    first_pair = counts.cumsum(0) - counts
    first_tile = tiles.cumsum(0) - tiles
    n_tiles = int(tiles.sum())
    rank = torch.arange(row.numel(), device=q.device) - first_pair[group]
    lane = (first_tile[group] + rank // TILE) * TILE + rank % TILE  # each pair's row in the tiled layout
    tile_group = torch.repeat_interleave(torch.arange(b * hkv * nb, device=q.device), tiles)
    lane_row = torch.full((n_tiles * TILE,), rows, dtype=torch.long, device=q.device)  # padding lanes: row `rows`
    lane_row[lane] = row

    qt = F.pad(q.reshape(rows, d), (0, 0, 0, 1))[lane_row].view(n_tiles, TILE, d)
    pad = nb * bk - skv
    kt = F.pad(k, (0, 0, 0, pad)).reshape(b * hkv * nb, bk, d)[tile_group]
    vt = F.pad(v, (0, 0, 0, pad)).reshape(b * hkv * nb, bk, dv)[tile_group]
    s = (qt @ kt.transpose(1, 2)) * scale  # (tiles, TILE, bk)

    key_pos = ((tile_group % nb) * bk).view(-1, 1) + torch.arange(bk, device=q.device)  # (tiles, bk)
    seen = (key_pos < skv).unsqueeze(1) & (lane_row != rows).view(n_tiles, TILE, 1)
    if causal:
        query_pos = (lane_row % sq + skv - sq).view(n_tiles, TILE, 1)
        seen = seen & (key_pos.unsqueeze(1) <= query_pos)
    s = s.masked_fill(~seen, float("-inf"))

    # exact softmax per query across the tiles holding it: shared maximum (a constant shift), summed normaliser
    lane_max = s.detach().amax(dim=-1).reshape(-1)
    top = torch.full((rows + 1,), float("-inf"), dtype=s.dtype, device=q.device)
    top = top.scatter_reduce(0, lane_row, lane_max, "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(s - top[lane_row].view(n_tiles, TILE, 1))
    norm = torch.zeros(rows + 1, dtype=s.dtype, device=q.device).index_add(0, lane_row, e.sum(-1).reshape(-1))
    p = e / norm.clamp_min(torch.finfo(s.dtype).tiny)[lane_row].view(n_tiles, TILE, 1)
    out = torch.zeros(rows + 1, dv, dtype=q.dtype, device=q.device)
    out = out.index_add(0, lane_row, (p.to(vt.dtype) @ vt).reshape(-1, dv))
    return out[:rows].view(b, h, sq, dv)
