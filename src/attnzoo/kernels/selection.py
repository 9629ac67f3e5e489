"""Block selections: which key blocks each query block sees, as an object users can inspect, store and reuse.

The D family's methods (dynamic, content-dependent sparsity; issue 12) are two parts: a *selection* rule, from the
inputs, and one shared *attend* kernel (:func:`attnzoo.kernels.block_sparse.selected_attention`) over any selection.
This module holds the selection object and the rules the papers share, so that each method file is only its scoring.

:class:`BlockSelection` is the layout FlexAttention's ``BlockMask.from_kv_blocks``, flash-attention's block-sparse
kernels and MInference use: per ``(batch, selection head, query block)`` the indices of the key blocks it sees
(``indices (B, Hs, Nq, K)``, int64, ``-1`` in unused slots). Query block ``a`` is queries ``[a·block_q,
(a+1)·block_q)``, key block ``b`` keys ``[b·block_k, (b+1)·block_k)``; the last of each may be partial. ``Hs`` is the
number of query heads (a selection per head), or of KV heads (a GQA group shares one selection, as in NSA: the K/V
gather then happens once per group), or 1 (every head shares it); query head ``h`` reads selection head
``h // (H / Hs)``, the GQA convention. A selection is block-level only: a causal call also applies the token-level
causal mask inside the blocks it selects (the attend kernel and :meth:`BlockSelection.dense` callers do).

Rules (all vectorised on the device; no Python loop per row), on block scores ``scores (B, Hs, Nq, Nk)``:

- :func:`topk_blocks`: the ``top_k`` highest-scoring allowed blocks per query block; ``always`` marks blocks that are
  always selected and counted in ``top_k`` (sink, diagonal/own block, local window); causal calls exclude future
  blocks (a key block is allowed iff its first key is visible to the block's last query, bottom-right aligned as
  attnzoo's causal mask: query ``i`` sees key ``j`` iff ``j ≤ i + seq_kv − seq_q``).
- :func:`threshold_blocks`: the fewest allowed blocks whose softmax-normalised block mass reaches ``tau`` (scores are
  block *logits*: ``p_b = softmax_b(scores)`` over the allowed blocks; blocks are taken by decreasing ``p_b``,
  ``always`` blocks first), as XAttention (arXiv:2503.16428) and FlexPrefill (arXiv:2502.20766) do.
- :func:`block_means`: the mean of each block's rows (pooled queries/keys: MoBA's key centroid, NSA's compression
  without its MLP); a ragged last block is averaged over its real rows.
- :func:`group_scores`: scores pooled over the query heads of each KV group (sum, as NSA's shared selection), so a
  rule then gives one selection per group; :func:`shared_by_group`: the union of the group's per-head selections.
- :func:`allowed_blocks`: the causal block-level visibility the rules use; :func:`random_selection`: a random
  top-k selection (tests, benchmarks).
- :func:`keys_at_density`: how many keys per query a budgeted method keeps so that it reads a given fraction of the
  (query, key) pairs the pattern allows (the ``at_density`` of top-k methods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attnzoo.errors import fail

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from attnzoo.masks import MaskMod


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockSelection:
    """Per ``(batch, selection head, query block)``, the key blocks it sees.

    ``indices (B, Hs, Nq, K)`` int64: key block indices in ``[0, Nk)``, ``-1`` for an unused slot, no index twice in
    a row (the rules here return each row's indices ascending, unused slots last; any order is accepted).
    ``Nq = ⌈seq_q / block_q⌉``, ``Nk = ⌈seq_kv / block_k⌉``. Build one with a rule (:func:`topk_blocks`,
    :func:`threshold_blocks`), from a boolean block mask (:meth:`from_blocks`), or by hand.
    """

    indices: torch.Tensor
    block_q: int
    block_k: int
    seq_q: int
    seq_kv: int

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, *, block_q: int, block_k: int, seq_q: int,
                    seq_kv: int) -> BlockSelection:
        """The selection of a boolean block mask ``blocks (B, Hs, Nq, Nk)`` (True = seen); ``K`` is the largest row
        count (at least 1)."""
        nk = blocks.shape[-1]
        width = max(1, int(blocks.sum(-1).max())) if blocks.numel() else 1
        # ascending indices of the True entries first: sort the keys (index if seen, nk if not)
        key = torch.where(blocks, torch.arange(nk, device=blocks.device), nk)
        idx = key.sort(dim=-1).values[..., :width]
        if idx.shape[-1] < width:  # fewer key blocks than one slot (nk == 0 never happens for a real call)
            idx = torch.nn.functional.pad(idx, (0, width - idx.shape[-1]), value=nk)
        return cls(idx.masked_fill(idx == nk, -1).long(), block_q, block_k, seq_q, seq_kv)

    def to(self, device: torch.device | str) -> BlockSelection:
        """This selection with its indices on ``device``."""
        return BlockSelection(self.indices.to(device), self.block_q, self.block_k, self.seq_q, self.seq_kv)

    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.seq_q, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.seq_kv, self.block_k)

    @property
    def counts(self) -> torch.Tensor:
        """The number of key blocks each ``(batch, selection head, query block)`` sees, ``(B, Hs, Nq)`` int64."""
        return (self.indices >= 0).sum(dim=-1)

    def blocks(self, heads: int | None = None) -> torch.Tensor:
        """The block-level mask ``(B, heads or Hs, Nq, Nk)`` (True = the query block sees the key block)."""
        b, hs, nq, _ = self.indices.shape
        out = torch.zeros(b, hs, nq, self.num_kv_blocks + 1, dtype=torch.bool, device=self.indices.device)
        # unused slots (-1) land in the extra last column, dropped below
        out.scatter_(3, self.indices.masked_fill(self.indices < 0, self.num_kv_blocks), True)
        out = out[..., : self.num_kv_blocks]
        return out if heads is None or heads == hs else out.repeat_interleave(heads // hs, dim=1)

    def dense(self, heads: int) -> torch.Tensor:
        """Block-level visibility at token level, ``(B, heads, seq_q, seq_kv)`` bool (for the reference; O(N²)
        memory). The causal mask inside blocks is not included: AND it for a causal call."""
        out = self.blocks(heads)
        out = out.repeat_interleave(self.block_q, dim=2)[:, :, : self.seq_q]
        return out.repeat_interleave(self.block_k, dim=3)[..., : self.seq_kv]

    def block_mask(self, heads: int, *, mask_mod: MaskMod | None = None) -> BlockMask:
        """A FlexAttention ``BlockMask`` (``BlockMask.from_kv_blocks``, block sizes ``(block_q, block_k)``) for
        ``heads`` query heads. The selected blocks are given as partial blocks: ``mask_mod`` (the causal predicate,
        say; None: every key of a selected block is seen) decides inside them. (Giving them as full blocks instead
        fails to compile in PyTorch 2.13's CPU FlexAttention when no partial block is left.)"""
        from torch.nn.attention.flex_attention import BlockMask

        b, hs, nq, _ = self.indices.shape
        indices = self.indices.sort(dim=-1, descending=True).values  # unused slots last
        counts = self.counts.to(torch.int32)
        kv_indices = torch.zeros(b, hs, nq, self.num_kv_blocks, dtype=torch.int32, device=indices.device)
        width = min(indices.shape[-1], self.num_kv_blocks)
        kv_indices[..., :width] = indices[..., :width].clamp(min=0).to(torch.int32)
        if heads != hs:
            counts = counts.repeat_interleave(heads // hs, dim=1)
            kv_indices = kv_indices.repeat_interleave(heads // hs, dim=1)
        return BlockMask.from_kv_blocks(counts, kv_indices, BLOCK_SIZE=(self.block_q, self.block_k),
                                        mask_mod=mask_mod, seq_lengths=(self.seq_q, self.seq_kv))

    def density(self) -> float:
        """The fraction of the ``B·Hs·seq_q·seq_kv`` (query, key) pairs inside selected blocks (ragged last blocks
        counted by their real rows and keys; the causal mask inside blocks not taken into account)."""
        nq, nk = self.num_q_blocks, self.num_kv_blocks
        q_rows = torch.full((nq,), self.block_q, device=self.indices.device)
        q_rows[-1] = self.seq_q - (nq - 1) * self.block_q
        k_cols = torch.full((nk + 1,), self.block_k, device=self.indices.device)
        k_cols[nk - 1], k_cols[nk] = self.seq_kv - (nk - 1) * self.block_k, 0  # the last slot: unused (-1)
        cols = k_cols[self.indices.masked_fill(self.indices < 0, nk)].sum(dim=-1)  # (B, Hs, Nq)
        b, hs = self.indices.shape[:2]
        return float((cols * q_rows).sum()) / (b * hs * self.seq_q * self.seq_kv)

    def __repr__(self) -> str:
        return (f"BlockSelection(indices {tuple(self.indices.shape)}, block_q={self.block_q}, "
                f"block_k={self.block_k}, seq_q={self.seq_q}, seq_kv={self.seq_kv})")

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise an :class:`~attnzoo.errors.AttnzooError` naming ``selection`` unless this selection fits
        ``q (B, H, Sq, D)`` and ``k (B, Hkv, Skv, D)``."""
        problem = self.mismatch(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2])
        if problem is not None:
            raise fail("selection", problem, repr(self))

    def mismatch(self, batch: int, heads: int, kv_heads: int, seq_q: int, seq_kv: int) -> str | None:
        """What a call of these sizes expects of this selection, if it does not fit (else None)."""
        idx = self.indices
        if not isinstance(idx, torch.Tensor) or idx.dim() != 4 or idx.dtype != torch.int64:
            return "indices an int64 tensor (batch, heads, query blocks, slots)"
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                return f"{name} a positive int"
        if (self.seq_q, self.seq_kv) != (seq_q, seq_kv):
            return f"seq_q, seq_kv = {seq_q}, {seq_kv} (from q, k)"
        bs, hs, nq, _ = idx.shape
        if bs != batch or heads % hs or (hs > kv_heads and hs % kv_heads) or (hs < kv_heads and kv_heads % hs):
            return (f"indices of shape ({batch}, heads: 1, a divisor or multiple of {kv_heads} dividing {heads}, "
                    f"{self.num_q_blocks}, ·)")
        if nq != self.num_q_blocks:
            return f"{self.num_q_blocks} query blocks (⌈{seq_q} / block_q {self.block_q}⌉) in indices"
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= self.num_kv_blocks):
            return f"key block indices in [0, {self.num_kv_blocks}) or -1"
        ordered = idx.sort(dim=-1).values
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
            return "each key block at most once per query block"
        return None


def allowed_blocks(*, causal: bool, seq_q: int, seq_kv: int, block_q: int, block_k: int,
                   device: torch.device | None = None) -> torch.Tensor | None:
    """``(Nq, Nk)`` bool: the key blocks a query block may select under the causal mask (bottom-right aligned: a key
    block is allowed iff its first key is visible to the block's last query), or None if not causal."""
    if not causal:
        return None
    nq, nk = _cdiv(seq_q, block_q), _cdiv(seq_kv, block_k)
    last_query = torch.clamp((torch.arange(nq, device=device) + 1) * block_q, max=seq_q) - 1
    first_key = torch.arange(nk, device=device) * block_k
    return first_key <= (last_query + seq_kv - seq_q).unsqueeze(1)


def _check_scores(scores: torch.Tensor, seq_q: int, seq_kv: int, block_q: int, block_k: int) -> None:
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise fail(name, "a positive int", repr(value))
    expected = (_cdiv(seq_q, block_q), _cdiv(seq_kv, block_k))
    if scores.dim() != 4 or tuple(scores.shape[2:]) != expected:
        raise fail("scores", f"a (batch, heads, {expected[0]}, {expected[1]}) tensor of block scores",
                   f"shape {tuple(scores.shape)}")


def _ranked(scores: torch.Tensor, allowed: torch.Tensor | None, always: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranking key (``always`` blocks +inf, disallowed −inf) and the allowed mask, both ``scores``-shaped."""
    ok = torch.ones_like(scores, dtype=torch.bool) if allowed is None else allowed.expand_as(scores)
    key = scores.float().masked_fill(~ok, float("-inf"))
    if always is not None:
        key = key.masked_fill(always.expand_as(scores) & ok, float("inf"))
    return key, ok


def _pack(idx: torch.Tensor, keep: torch.Tensor, nk: int, **sizes: int) -> BlockSelection:
    """Slots ``idx`` where ``keep`` as a selection, each row's kept indices ascending and unused slots last."""
    idx = torch.where(keep, idx, nk).sort(dim=-1).values
    return BlockSelection(idx.masked_fill(idx == nk, -1), sizes["block_q"], sizes["block_k"], sizes["seq_q"],
                          sizes["seq_kv"])


def topk_blocks(scores: torch.Tensor, top_k: int, *, causal: bool, seq_q: int, seq_kv: int, block_q: int,
                block_k: int, always: torch.Tensor | None = None) -> BlockSelection:
    """Per query block, the ``top_k`` allowed key blocks of highest score (fewer where fewer are allowed).

    ``scores (B, Hs, Nq, Nk)``; ``always`` (bool, broadcastable to it) marks blocks selected whatever their score and
    counted in ``top_k`` (if a row has more than ``top_k`` of them, ``top_k`` of them are kept, lowest scores first
    dropped in ``torch.topk``'s order); ``causal`` excludes future blocks (:func:`allowed_blocks`). Ties are broken
    by ``torch.topk`` (deterministic for given inputs on a device). ``top_k`` larger than ``Nk`` raises.
    """
    _check_scores(scores, seq_q, seq_kv, block_q, block_k)
    nk = scores.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= nk:
        raise fail("top_k", f"an int in [1, {nk}] (the number of key blocks)", repr(top_k))
    allowed = allowed_blocks(causal=causal, seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_k=block_k,
                             device=scores.device)
    key, ok = _ranked(scores, allowed, always)
    idx = key.topk(top_k, dim=-1).indices
    return _pack(idx, ok.gather(-1, idx), nk, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_kv=seq_kv)


def threshold_blocks(scores: torch.Tensor, tau: float, *, causal: bool, seq_q: int, seq_kv: int, block_q: int,
                     block_k: int, always: torch.Tensor | None = None) -> BlockSelection:
    """Per query block, the fewest allowed key blocks whose softmax-normalised mass reaches ``tau``.

    ``scores (B, Hs, Nq, Nk)`` are block logits: ``p_b = softmax_b(scores)`` over the allowed blocks. Blocks are
    taken by decreasing ``p_b`` (``always`` blocks first, their mass counted) until the cumulative mass reaches
    ``tau ∈ (0, 1]``; ``K`` of the result is the largest row count.
    """
    _check_scores(scores, seq_q, seq_kv, block_q, block_k)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise fail("tau", "a number in (0, 1]", repr(tau))
    nk = scores.shape[-1]
    allowed = allowed_blocks(causal=causal, seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_k=block_k,
                             device=scores.device)
    key, ok = _ranked(scores, allowed, always)
    mass = torch.softmax(scores.float().masked_fill(~ok, float("-inf")), dim=-1).nan_to_num_(0.0)
    order = key.argsort(dim=-1, descending=True, stable=True)
    before = mass.gather(-1, order).cumsum(dim=-1) - mass.gather(-1, order)  # mass of the blocks ranked above
    keep = (before < tau - 1e-6) & ok.gather(-1, order)
    if always is not None:
        keep |= (always.expand_as(scores) & ok).gather(-1, order)
    width = max(1, int(keep.sum(-1).max()))
    # kept slots are a prefix of each row's order except for always-blocks (ranked first anyway): trim to the widest
    return _pack(order[..., :width], keep[..., :width], nk, block_q=block_q, block_k=block_k, seq_q=seq_q,
                 seq_kv=seq_kv)


def random_selection(batch: int, heads: int, *, density: float, block_q: int, block_k: int, seq_q: int, seq_kv: int,
                     causal: bool = False, generator: torch.Generator | None = None) -> BlockSelection:
    """A random selection of ``round(density · Nk)`` key blocks (at least 1) per query block: :func:`topk_blocks` of
    uniform scores drawn from ``generator`` (tests and benchmarks)."""
    nq, nk = _cdiv(seq_q, block_q), _cdiv(seq_kv, block_k)
    scores = torch.rand(batch, heads, nq, nk, generator=generator)
    return topk_blocks(scores, max(1, round(density * nk)), causal=causal, seq_q=seq_q, seq_kv=seq_kv,
                       block_q=block_q, block_k=block_k)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """The mean of each block of ``block`` rows of ``x (B, H, S, D)``: ``(B, H, ⌈S / block⌉, D)``; the ragged last
    block is averaged over its real rows."""
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise fail("block", "a positive int", repr(block))
    b, h, s, d = x.shape
    n = _cdiv(s, block)
    pad = n * block - s
    sums = (torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x).reshape(b, h, n, block, d).sum(dim=3)
    rows = torch.full((n, 1), float(block), dtype=x.dtype, device=x.device)
    rows[-1] = block - pad
    return sums / rows


def group_scores(scores: torch.Tensor, kv_heads: int, reduce: str = "sum") -> torch.Tensor:
    """Block scores ``(B, H, Nq, Nk)`` pooled over the query heads of each of ``kv_heads`` groups (``"sum"``, as NSA
    sums its heads' importance, or ``"max"``): ``(B, kv_heads, Nq, Nk)``, for one selection per KV group."""
    b, h = scores.shape[:2]
    if kv_heads <= 0 or h % kv_heads:
        raise fail("kv_heads", f"a positive divisor of the {h} heads of scores", repr(kv_heads))
    if reduce not in ("sum", "max"):
        raise fail("reduce", "'sum' or 'max'", repr(reduce))
    grouped = scores.view(b, kv_heads, h // kv_heads, *scores.shape[2:])
    return grouped.sum(dim=2) if reduce == "sum" else grouped.amax(dim=2)


def shared_by_group(selection: BlockSelection, heads: int, kv_heads: int) -> BlockSelection:
    """One selection per KV group: the union of the key blocks its ``heads / kv_heads`` query heads select (a
    selection with ``Hs = heads``, or already shared, which is returned as it is)."""
    hs = selection.indices.shape[1]
    if kv_heads <= 0 or heads % kv_heads:
        raise fail("kv_heads", f"a positive divisor of heads {heads}", repr(kv_heads))
    if hs <= kv_heads:
        return selection
    if hs != heads:
        raise fail("selection", f"one selection per query head ({heads})", f"{hs} selection heads")
    blocks = selection.blocks()
    union = blocks.view(blocks.shape[0], kv_heads, heads // kv_heads, *blocks.shape[2:]).any(dim=2)
    return BlockSelection.from_blocks(union, block_q=selection.block_q, block_k=selection.block_k,
                                      seq_q=selection.seq_q, seq_kv=selection.seq_kv)


def keys_at_density(fraction: float, *, causal: bool, seq_q: int, seq_kv: int) -> int:
    """The per-query key budget ``T`` (``1 ≤ T ≤ seq_kv``) whose pairs are about ``fraction`` of those the pattern
    allows: noncausal, ``round(fraction · seq_kv)``; causal (query ``i`` sees ``v_i = clamp(i + 1 + seq_kv − seq_q, 0,
    seq_kv)`` keys and a budgeted method reads ``min(T, v_i)`` of them), the smallest ``T`` with ``Σ min(T, v_i) ≥
    fraction · Σ v_i``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise fail("fraction", "a number in (0, 1]", repr(fraction))
    if not causal:
        return min(seq_kv, max(1, round(fraction * seq_kv)))
    seen = torch.clamp(torch.arange(seq_q) + 1 + seq_kv - seq_q, 0, seq_kv)
    target = fraction * float(seen.sum())
    low, high = 1, max(1, seq_kv)
    while low < high:  # the pairs read grow with T: bisect for the smallest T that reaches the target
        mid = (low + high) // 2
        if float(torch.clamp(seen, max=mid).sum()) >= target:
            high = mid
        else:
            low = mid + 1
    return low
