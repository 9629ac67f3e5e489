"""A KV cache whose rows hold different numbers of tokens, in memory proportional to the tokens kept.

:class:`RaggedKVCache` is what a press that gives each ``(sequence, kv head)`` row its own budget returns
(:class:`~attnzoo.kv.presses.adakv.AdaKVPress`, :class:`~attnzoo.kv.presses.append_only.AppendOnlyPress`). A
:class:`~attnzoo.kv.cache.KVCache` pads every row to the longest one (or masks dropped keys, as kvpress does); here
the storage is the kept tokens only.

Layout (a paged cache). Tokens live in *pages* of ``page_size`` slots: ``page_keys (P, page_size, D)``,
``page_values (P, page_size, Dv)``, ``page_positions (P, page_size)``. Row ``r = b·Hkv + h`` owns the pages
``page_table[b, h, :]`` (``-1`` past its last page); its ``counts[b, h]`` tokens fill its pages in order, so a row
wastes at most ``page_size − 1`` slots. ``page_row (P,)`` and ``page_index (P,)`` say which row a page belongs to and
where it sits in that row's chain.

- Appending one token per row writes into the spare room of each row's last page, or into a new page when the last
  one is full: O(rows) per step, never a copy of the cache (page storage grows by 1/16, like :class:`KVCache`'s).
- Attention (:meth:`RaggedKVCache.attend`) runs over the pages: ``s = q·kᵀ`` per page by one batched matmul (each
  page meets its own row's queries), the softmax's max and sum per row by ``scatter_reduce``/``index_add_`` over
  ``page_row``, the weighted values by a second batched matmul summed per row. The cost is proportional to the kept
  tokens (plus the partly filled last pages).
- The *slot view*: for scorers and methods that read a cache as ``(B, Hkv, L, ·)`` tensors, slot ``j`` of row ``r`` is
  slot ``j mod page_size`` of page ``page_table[r, j // page_size]``, ``L = max pages × page_size``;
  :attr:`positions`, :meth:`visible_to`, :meth:`scores` and :meth:`combine` work on this view without copying keys;
  :attr:`keys` and :attr:`values` materialise it (a copy; presses read them when they compress).

A slot holds a token when its index in its row is below the row's count; the positions of other slots mean nothing.
A cache is a value, as :class:`KVCache` is: appends write only past every older cache's counts or into new pages,
and only the newest cache of a storage (``version``) writes in place; another one copies first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from attnzoo.errors import fail
from attnzoo.kernels.dense import safe_softmax
from attnzoo.kv.cache import POSITION_DTYPE, KVCache, _per_query_head, _recorded

DEFAULT_PAGE_SIZE = 64


@dataclass(eq=False)
class _Pages:
    """Page buffers with spare capacity, shared by the successive caches of one decoded batch."""

    keys: torch.Tensor  # (capacity, page_size, D)
    values: torch.Tensor  # (capacity, page_size, Dv)
    positions: torch.Tensor  # (capacity, page_size)
    log_weight: torch.Tensor | None  # (capacity, page_size)
    page_row: torch.Tensor  # (capacity,)
    page_index: torch.Tensor  # (capacity,)
    version: int = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        lw = [] if self.log_weight is None else [self.log_weight]
        return [self.keys, self.values, self.positions, *lw, self.page_row, self.page_index]

    def grown(self, capacity: int) -> _Pages:
        """A copy with room for ``capacity`` pages (new pages zero)."""
        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((capacity, *t.shape[1:]))
            out[: t.shape[0]] = t
            return out

        lw = None if self.log_weight is None else grow(self.log_weight)
        return _Pages(grow(self.keys), grow(self.values), grow(self.positions), lw, grow(self.page_row),
                      grow(self.page_index))


@dataclass(frozen=True, eq=False)
class RaggedKVCache:
    """A paged cache: row ``(b, h)`` holds ``counts[b, h]`` tokens in its pages ``page_table[b, h]`` (see the module).

    ``used``: pages in use (the first ``used`` of the storage); ``length (B,)``: tokens each sequence has seen;
    ``extras``: a method's or press's per-sequence tensors (as in :class:`KVCache`).
    """

    pages: _Pages
    used: int
    page_table: torch.Tensor
    counts: torch.Tensor
    length: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int = 0

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_cache(
        cls, cache: KVCache | RaggedKVCache, index: torch.Tensor | None = None, page_size: int = DEFAULT_PAGE_SIZE,
    ) -> RaggedKVCache:
        """The slots ``index (B, Hkv, L')`` of each row of ``cache`` (``-1``: none; default every occupied slot),
        packed into pages of ``page_size`` slots in the order given. Nothing else of ``cache`` is copied."""
        check_page_size(page_size)
        if index is None:
            index = torch.arange(cache.slots, device=cache.length.device).expand(*row_shape(cache), cache.slots)
        if index.dim() != 3 or tuple(index.shape[:2]) != row_shape(cache):
            raise fail("index", f"a (batch, kv_heads, slots) tensor with batch, kv_heads {row_shape(cache)}",
                       tuple(index.shape))
        return _pack(cache, index, page_size)

    # -- facts ----------------------------------------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return self.pages.keys.shape[1]

    @property
    def page_keys(self) -> torch.Tensor:
        return self.pages.keys[: self.used]

    @property
    def page_values(self) -> torch.Tensor:
        return self.pages.values[: self.used]

    @property
    def page_positions(self) -> torch.Tensor:
        return self.pages.positions[: self.used]

    @property
    def page_row(self) -> torch.Tensor:
        return self.pages.page_row[: self.used]

    @property
    def page_index(self) -> torch.Tensor:
        return self.pages.page_index[: self.used]

    @property
    def slots(self) -> int:
        """``L`` of the slot view: the most pages a row has, times ``page_size``."""
        return self.page_table.shape[2] * self.page_size

    @property
    def ring(self) -> None:
        return None

    @property
    def slot_data(self) -> dict[str, torch.Tensor]:
        return {}

    @property
    def nbytes(self) -> int:
        """Bytes held: the page storage (its spare capacity included), the page table, counts and extras."""
        held = [*self.pages.tensors(), self.page_table, self.counts, *self.extras.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def token_counts(self) -> torch.Tensor:
        """``(B, Hkv)``: the tokens each row holds."""
        return self.counts

    def page_occupied(self) -> torch.Tensor:
        """``(P, page_size)``: which page slots hold a token."""
        slot = self.page_index.unsqueeze(1) * self.page_size + torch.arange(self.page_size, device=self.counts.device)
        return slot < self.counts.flatten()[self.page_row].unsqueeze(1)

    def query_positions(self, tokens: int = 1) -> torch.Tensor:
        """``(B, 1, tokens, 1)``: the positions of each sequence's last ``tokens`` tokens."""
        return (self.length.view(-1, 1, 1, 1) - tokens + torch.arange(tokens, device=self.length.device).view(
            1, 1, tokens, 1)).to(POSITION_DTYPE)

    # -- the slot view --------------------------------------------------------------------------------------------
    def _view(self, per_page: torch.Tensor, fill: float) -> torch.Tensor:
        """A per-page-slot tensor ``(P, page_size, ·)`` as ``(B, Hkv, L, ·)`` (``fill`` where a row has no page)."""
        table = self.page_table
        out = per_page[table.clamp(min=0)]  # (B, Hkv, M, page_size, ·)
        missing = (table < 0).view(*table.shape, *([1] * (out.dim() - 3)))
        out = out.masked_fill(missing, fill)
        return out.reshape(*table.shape[:2], self.slots, *per_page.shape[2:])

    @property
    def positions(self) -> torch.Tensor:
        """``(B, Hkv, L)``: each slot's position, ``-1`` for a slot that holds no token."""
        pos = self.page_positions.masked_fill(~self.page_occupied(), -1)
        return self._view(pos, -1)

    def occupied(self) -> torch.Tensor:
        """``(B, Hkv, L)``: which slots hold a token."""
        return self.positions >= 0

    @property
    def keys(self) -> torch.Tensor:
        """``(B, Hkv, L, D)``: the slot view's keys (a copy)."""
        return self._view(self.page_keys, 0)

    @property
    def values(self) -> torch.Tensor:
        """``(B, Hkv, L, Dv)``: the slot view's values (a copy)."""
        return self._view(self.page_values, 0)

    @property
    def log_weight(self) -> torch.Tensor | None:
        """``(B, Hkv, L)`` log-weights of merged slots, or None."""
        lw = self.pages.log_weight
        return None if lw is None else self._view(lw[: self.used], 0)

    def key_positions(self, heads: int) -> torch.Tensor:
        """``(B, heads, 1, L)``: the slots' positions as seen by ``heads`` query heads."""
        return _per_query_head(self.positions, heads).unsqueeze(2)

    def visible_to(self, q_pos: torch.Tensor, heads: int) -> torch.Tensor:
        """``(B, heads, T, L)``: occupied slots at or before each query position ``q_pos (B, 1, T, 1)``."""
        kp = self.key_positions(heads)
        return (kp >= 0) & (kp <= q_pos)

    # -- reading --------------------------------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, ·)`` → ``(rows, G·T, ·)``: each kv row's query heads and tokens stacked."""
        b, h, t, d = x.shape
        return x.reshape(b * self.counts.shape[1], (h // self.counts.shape[1]) * t, d)

    def _page_scores(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """``(P, G·T, page_size)``: ``scale · q·k`` (+ log-weight) of every page against its row's queries."""
        s = torch.bmm(self._rows(q * scale)[self.page_row], self.page_keys.transpose(1, 2))
        if self.pages.log_weight is not None:
            s = s + self.pages.log_weight[: self.used].unsqueeze(1)
        return s

    def _sum_rows(self, per_page: torch.Tensor) -> torch.Tensor:
        """Sum a ``(P, ·)`` tensor over each row's pages: ``(rows, ·)`` (a one-hot ``(rows, P)`` matmul)."""
        rows = torch.arange(self.counts.numel(), device=per_page.device).unsqueeze(1)
        owner = (self.page_row.unsqueeze(0) == rows).to(per_page.dtype)
        return (owner @ per_page.reshape(per_page.shape[0], -1)).view(-1, *per_page.shape[1:])

    def _heads(self, rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``(rows, G·T, ·)`` → ``(B, H, T, ·)``."""
        b, h, t, _ = q.shape
        return rows.reshape(b, h, t, rows.shape[-1])

    def scores(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale · q·k`` (+ log-weight) of ``q (B, H, T, D)`` against every slot of the slot view: ``(B, H, T, L)``
        (slots without a token get 0; mask them with :meth:`visible_to`)."""
        b, h, t, _ = q.shape
        rows, m = self.counts.numel(), self.page_table.shape[2]
        out = q.new_zeros((rows, (h // self.counts.shape[1]) * t, m, self.page_size))
        out[self.page_row, :, self.page_index] = self._page_scores(q, scale).to(q.dtype)
        return out.reshape(b, h, t, self.slots)

    def combine(self, p: torch.Tensor) -> torch.Tensor:
        """``p v`` for weights ``p (B, H, T, L)`` over the slot view: ``(B, H, T, Dv)``."""
        rows, m = self.counts.numel(), self.page_table.shape[2]
        p_rows = p.reshape(rows, -1, m, self.page_size)
        per_page = torch.bmm(p_rows[self.page_row, :, self.page_index].to(self.page_values.dtype), self.page_values)
        return self._heads(self._sum_rows(per_page), p)

    def attend(
        self, q: torch.Tensor, scale: float, visible: torch.Tensor | None = None, scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``softmax(s + M) V`` for the last ``T`` tokens' queries ``q (B, H, T, D)``: ``(B, H, T, Dv)``, as
        :func:`attnzoo.kv.attend.softmax_attention`. Without ``visible``/``scores``: per page, then per row (a
        segment softmax, no slot view); with them: over the slot view."""
        heads, tokens = q.shape[1], q.shape[2]
        q_pos = self.query_positions(tokens)
        if visible is not None or scores is not None:
            seen = self.visible_to(q_pos, heads)
            if visible is not None:
                seen = seen & visible
            return self.combine(safe_softmax(self.scores(q, scale) if scores is None else scores, seen))
        pages = self.used
        s = self._page_scores(q, scale).view(pages, heads // self.counts.shape[1], tokens, self.page_size)
        seen = self.page_occupied().unsqueeze(1)  # (P, 1, page_size)
        if tokens > 1:  # earlier queries of this step do not see the later tokens
            row_pos = q_pos.view(-1, 1, tokens).expand(*self.counts.shape, tokens).reshape(-1, tokens)
            seen = seen & (self.page_positions.unsqueeze(1) <= row_pos[self.page_row].unsqueeze(2))
        s = s.masked_fill_(~seen.unsqueeze(1), float("-inf"))
        page_max = s.amax(-1)  # (P, G, T)
        row_max = page_max.new_full((self.counts.numel(), *page_max.shape[1:]), float("-inf"))
        row_max = row_max.scatter_reduce_(0, self.page_row.view(-1, 1, 1).expand_as(page_max), page_max, "amax")
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        e = s.sub_(row_max[self.page_row].unsqueeze(-1)).exp_()
        total = self._sum_rows(e.sum(-1)).flatten(1).unsqueeze(-1)  # (rows, G·T, 1)
        weighted = self._sum_rows(torch.bmm(e.view(pages, -1, self.page_size), self.page_values.to(e.dtype)))
        out = weighted / torch.where(total > 0, total, 1.0)
        return self._heads(out, q).to(q.dtype)

    # -- writing --------------------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> RaggedKVCache:
        """The cache after ``T`` more tokens per sequence, ``k (B, Hkv, T, D)``, ``v (B, Hkv, T, Dv)``: each row's
        token goes to the spare room of its last page, or to a new page."""
        cache = self
        for t in range(k.shape[2]):
            cache = cache._append_one(k[:, :, t], v[:, :, t])
        return cache

    def _append_one(self, k: torch.Tensor, v: torch.Tensor) -> RaggedKVCache:
        size, rows = self.page_size, self.counts.numel()
        slot = self.counts.flatten()
        new_rows = torch.nonzero(slot % size == 0).flatten()  # rows whose last page is full (or that have none)
        added = new_rows.numel()
        pages = self.pages
        if pages.version != self.version or self.used + added > pages.capacity or _recorded(k, v, pages.keys):
            grow = self.used + added + max(rows, (self.used + added) // 16) if added else pages.capacity
            pages = pages.grown(grow)
        table = self.page_table.view(rows, -1)
        if added:
            new_ids = torch.arange(self.used, self.used + added, device=slot.device)
            chain = slot[new_rows] // size
            wide = max(table.shape[1], int(chain.max()) + 1)
            table = torch.cat([table, table.new_full((rows, wide - table.shape[1]), -1)], 1)
            table[new_rows, chain] = new_ids
            pages.page_row[new_ids] = new_rows
            pages.page_index[new_ids] = chain
        page, offset = table[torch.arange(rows, device=slot.device), slot // size], slot % size
        pages.keys[page, offset] = k.reshape(rows, -1).to(pages.keys.dtype)
        pages.values[page, offset] = v.reshape(rows, -1).to(pages.values.dtype)
        hkv = self.counts.shape[1]
        pages.positions[page, offset] = self.length.repeat_interleave(hkv).to(POSITION_DTYPE)
        if pages.log_weight is not None:
            pages.log_weight[page, offset] = 0.0
        pages.version += 1
        return replace(self, pages=pages, used=self.used + added, page_table=table.view(*self.counts.shape, -1),
                       counts=self.counts + 1, length=self.length + 1, version=pages.version)

    def latest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's last token: keys ``(B, Hkv, D)``, values ``(B, Hkv, Dv)`` (rows holding no token: zeros)."""
        rows, slot = self.counts.numel(), (self.counts.flatten() - 1).clamp(min=0)
        page = self.page_table.view(rows, -1)[torch.arange(rows, device=slot.device), slot // self.page_size]
        has = (self.counts.flatten() > 0) & (page >= 0)
        keys = self.pages.keys[page.clamp(min=0), slot % self.page_size] * has.unsqueeze(1)
        values = self.pages.values[page.clamp(min=0), slot % self.page_size] * has.unsqueeze(1)
        return keys.view(*self.counts.shape, -1), values.view(*self.counts.shape, -1)

    def retract(self, drop: torch.Tensor) -> RaggedKVCache:
        """The cache without the last token of the rows where ``drop (B, Hkv)`` is True (its slot becomes spare room,
        which the next append reuses). Nothing else is written; the cache this is called on must not append again
        (the next append to the result overwrites the dropped slot), so it becomes an older version."""
        self.pages.version += 1
        return replace(self, counts=self.counts - drop.long(), version=self.pages.version)

    def keep(self, index: torch.Tensor, log_weight: torch.Tensor | None = None) -> RaggedKVCache:
        """The slots ``index (B, Hkv, L')`` of the slot view (``-1``: none) of each row, packed into fresh pages.
        ``log_weight`` (``(B, Hkv, L')``) replaces the kept slots' log-weights (merging presses)."""
        kept = RaggedKVCache.from_cache(self, index, self.page_size)
        if log_weight is None:
            return kept
        return _with_log_weight(kept, index, log_weight)


def row_shape(cache: KVCache | RaggedKVCache) -> tuple[int, int]:
    """``(B, Hkv)`` of either kind of cache (without building a slot view)."""
    rows = cache.counts if isinstance(cache, RaggedKVCache) else cache.keys
    return rows.shape[0], rows.shape[1]


def check_page_size(page_size: int) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise fail("page_size", "a positive number of slots per page", repr(page_size))


def _source_slots(
    cache: KVCache | RaggedKVCache, row: torch.Tensor, slot: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys, values, positions, log-weights of slot ``slot (P, page_size)`` (of the slot view) of row ``row (P, 1)``."""
    if isinstance(cache, KVCache):
        lw = None if cache.log_weight is None else cache.log_weight.flatten(0, 1)[row, slot]
        return (cache.keys.flatten(0, 1)[row, slot], cache.values.flatten(0, 1)[row, slot],
                cache.positions.flatten(0, 1)[row, slot], lw)
    size = cache.page_size
    page = cache.page_table.flatten(0, 1)[row, slot // size].clamp(min=0)
    offset = slot % size
    lw = cache.pages.log_weight
    return (cache.pages.keys[page, offset], cache.pages.values[page, offset], cache.pages.positions[page, offset],
            None if lw is None else lw[page, offset])


def _pack(cache: KVCache | RaggedKVCache, index: torch.Tensor, page_size: int) -> RaggedKVCache:
    b, hkv, _ = index.shape
    rows, device = b * hkv, index.device
    index = index.long()
    valid = (index >= 0) & (cache.positions.gather(2, index.clamp(min=0)) >= 0) if cache.slots else index < -1
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices  # tokens first, in the order given
    index, valid = index.gather(2, order), valid.gather(2, order)
    counts = valid.sum(-1)
    per_row = ((counts + page_size - 1) // page_size).flatten()
    width = int(per_row.max()) if rows else 0
    total = int(per_row.sum())
    page_row = torch.repeat_interleave(torch.arange(rows, device=device), per_row)
    page_index = torch.arange(total, device=device) - (torch.cumsum(per_row, 0) - per_row)[page_row]
    table = torch.full((rows, width), -1, dtype=torch.long, device=device)
    table[page_row, page_index] = torch.arange(total, device=device)
    pad = width * page_size - index.shape[2]
    if pad > 0:
        index = torch.cat([index, index.new_full((b, hkv, pad), -1)], 2)
        valid = torch.cat([valid, valid.new_zeros((b, hkv, pad))], 2)
    slot = index[:, :, : width * page_size].reshape(rows, width, page_size)[page_row, page_index]
    ok = valid[:, :, : width * page_size].reshape(rows, width, page_size)[page_row, page_index]
    keys, values, positions, lw = _source_slots(cache, page_row.unsqueeze(1), slot.clamp(min=0))
    positions = positions.masked_fill(~ok, -1).to(POSITION_DTYPE)
    zero = ~ok.unsqueeze(-1)
    pages = _Pages(keys.masked_fill(zero, 0), values.masked_fill(zero, 0), positions,
                   None if lw is None else lw.masked_fill(~ok, 0), page_row, page_index)
    return RaggedKVCache(pages, total, table.view(b, hkv, width), counts, cache.length, dict(cache.extras))


def _with_log_weight(kept: RaggedKVCache, index: torch.Tensor, log_weight: torch.Tensor) -> RaggedKVCache:
    """``kept`` (packed from ``index``) with the log-weights ``log_weight`` given per entry of ``index``."""
    if log_weight.shape != index.shape:
        raise fail("log_weight", f"a tensor of the index's shape {tuple(index.shape)}", tuple(log_weight.shape))
    order = torch.sort((index < 0).to(torch.int8), dim=-1, stable=True).indices
    lw = log_weight.gather(2, order).float()
    width = kept.slots
    lw = lw[:, :, :width] if lw.shape[2] >= width else torch.cat(
        [lw, lw.new_zeros((*lw.shape[:2], width - lw.shape[2]))], 2)
    rows = kept.counts.numel()
    per_page = lw.reshape(rows, -1, kept.page_size)[kept.page_row, kept.page_index]
    pages = replace(kept.pages, log_weight=per_page)
    return replace(kept, pages=pages)
