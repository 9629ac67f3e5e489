"""K1 — the key/value cache that softmax-form methods decode with, and the presses transform.

A :class:`KVCache` holds, for every sequence ``b`` and key/value head ``h``, a row of *slots*: a key, a value and the
absolute position of the token it came from (``-1`` for an empty slot). Slots are unordered (softmax attention does
not care where a key sits), which lets one layout serve every case:

- a plain cache: slot ``i`` holds position ``i``; each step appends one slot per sequence;
- a batch of prompts of different lengths (right padding): slots past a sequence's length are empty, and each
  step writes every sequence's new token to the same new slot (its own position);
- a ring (``ring=C``, sliding-window methods): only the last ``C`` positions are kept, position ``p`` lives in slot
  ``p mod C``, so the cache's memory is O(C), not O(N);
- a pressed cache: a press keeps a subset of slots per ``(b, h)`` (:meth:`KVCache.keep`); positions travel with the
  slots, so position-dependent methods (ALiBi, windows) still see true distances; a slot standing for several merged
  tokens carries ``log_weight = log(count)``, added to its scores so that it weighs as the tokens it replaces.

Memory. Appends write into preallocated storage (capacity grows by 1/16 of the cache, at least 16 slots, so a step
costs O(new tokens), not a copy of the cache). A cache is a value: :meth:`append` never changes what an older cache
sees. The storage remembers which cache appended last (``version``); only that one, and only while its tensors are
the storage's (not replaced by a press), appends in place; any other (a second branch from an older state) copies
first. Writing is never in place when autograd records the cache's tensors. :attr:`KVCache.nbytes` counts the
storage actually held (capacity included).

Rings are the exception: a ring step overwrites a slot that older states of the ring still show (copying the ring
every step would cost more than the attention over it). So a ring state that has been continued must not be
continued again: that append raises, naming ``cache``; branch from :meth:`KVCache.copy` taken before.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from attnzoo.errors import fail
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv

POSITION_DTYPE = torch.int32


@dataclass(eq=False)
class _Storage:
    """Buffers ``(B, Hkv, capacity, ·)`` shared by the successive caches of one decoded batch."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    version: int = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))


@dataclass(frozen=True, eq=False)
class KVCache:
    """One attention layer's cache: ``keys (B, Hkv, L, D)``, ``values (B, Hkv, L, Dv)``, ``positions (B, Hkv, L)``.

    ``length (B,)`` counts the tokens each sequence has seen (the position its next token takes). ``log_weight``
    (``(B, Hkv, L)`` or None) is added to every score of a slot (merged slots). ``ring`` keeps only the last ``ring``
    positions. :attr:`complete` says whether every slot holds a token (an append or a construction that knows it says
    so, in ``known_complete``; otherwise the positions are scanned once). ``extras`` holds a method's (or a press's)
    own per-sequence tensors (e.g. the previous token for momentum attention); ``slot_data`` holds per-slot
    ``(B, Hkv, L)`` tensors (a press's accumulated statistics): they follow the slots through :meth:`keep`, and new
    slots get 0.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    length: torch.Tensor
    log_weight: torch.Tensor | None = None
    ring: int | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    slot_data: dict[str, torch.Tensor] = field(default_factory=dict)
    storage: _Storage | None = field(default=None, repr=False)
    version: int = 0
    known_complete: tuple[torch.Tensor, bool] | None = field(default=None, repr=False)

    #: ``keys`` and ``values`` are exactly what attention reads, so SDPA may take them directly. Caches that store
    #: tokens in another form (quantised, projected: :mod:`attnzoo.kv.quantized`, :mod:`attnzoo.kv.projected`) set it
    #: False and are read only through :meth:`scores` and :meth:`combine`.
    plain: ClassVar[bool] = True

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_prompt(
        cls, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None, ring: int | None = None,
    ) -> KVCache:
        """The cache after a prompt ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)``; ``lengths (B,)``: real tokens per
        sequence (right padding; default all ``S``); ``ring``: keep only the last ``ring`` positions."""
        b, hkv, s, _ = k.shape
        lengths = check_lengths(lengths, b, s, k.device)
        pos = torch.arange(s, device=k.device).expand(b, hkv, s)
        pos = torch.where(pos < lengths.view(b, 1, 1), pos, -1).to(POSITION_DTYPE)
        if ring is None:
            return cls(k, v, pos, lengths, known_complete=(pos, bool((lengths == s).all())))
        cache = cls.empty(b, hkv, k.shape[-1], v.shape[-1], ring, k.dtype, k.device, ring=ring)
        if s == 0:
            return replace(cache, length=lengths)
        keep = min(s, ring)
        first = (lengths - keep).clamp(min=0)  # each sequence's last `keep` real tokens (fewer if shorter)
        take = (first.view(b, 1) + torch.arange(keep, device=k.device)).clamp(max=s - 1)
        real = take < lengths.view(b, 1)
        slot = (take % ring).view(b, 1, keep).expand(b, hkv, keep)
        gathered = [t.gather(2, take.view(b, 1, keep, 1).expand(b, hkv, keep, t.shape[-1])) for t in (k, v)]
        positions = torch.where(real, take, -1).to(POSITION_DTYPE).view(b, 1, keep).expand(b, hkv, keep)
        keys = cache.keys.scatter(2, slot.unsqueeze(-1).expand_as(gathered[0]), gathered[0])
        values = cache.values.scatter(2, slot.unsqueeze(-1).expand_as(gathered[1]), gathered[1])
        positions = cache.positions.scatter(2, slot, positions)
        return cls(keys, values, positions, lengths, ring=ring,
                   known_complete=(positions, bool((lengths >= ring).all())))

    @classmethod
    def empty(
        cls, batch: int, kv_heads: int, head_dim: int, head_dim_v: int, slots: int, dtype: torch.dtype,
        device: torch.device, ring: int | None = None,
    ) -> KVCache:
        """A cache of ``slots`` empty slots (positions ``-1``) for sequences that have seen nothing."""
        return cls(
            torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device),
            torch.zeros(batch, kv_heads, slots, head_dim_v, dtype=dtype, device=device),
            torch.full((batch, kv_heads, slots), -1, dtype=POSITION_DTYPE, device=device),
            torch.zeros(batch, dtype=torch.long, device=device), ring=ring,
        )

    # -- facts ----------------------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache: keys, values, positions (and log-weights), the storage's capacity included."""
        held = self.storage.nbytes if self.storage is not None else sum(
            t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))
        extra = [] if self.log_weight is None else [self.log_weight]
        extra += [*self.extras.values(), *self.slot_data.values()]
        return held + sum(t.numel() * t.element_size() for t in extra)

    @property
    def complete(self) -> bool:
        """Whether every slot holds a token: what an append or construction recorded for these very positions, or
        else one scan of them (remembered)."""
        known = self.known_complete
        if known is not None and known[0] is self.positions:
            return known[1]
        complete = not bool((self.positions < 0).any())
        object.__setattr__(self, "known_complete", (self.positions, complete))
        return complete

    def occupied(self) -> torch.Tensor:
        """``(B, Hkv, L)``: which slots hold a token."""
        return self.positions >= 0

    def token_counts(self) -> torch.Tensor:
        """``(B, Hkv)``: how many slots of each row hold a token."""
        return self.occupied().sum(-1)

    def query_positions(self, tokens: int = 1) -> torch.Tensor:
        """``(B, 1, tokens, 1)``: the positions of each sequence's last ``tokens`` tokens."""
        return (self.length.view(-1, 1, 1, 1) - tokens + torch.arange(tokens, device=self.length.device).view(
            1, 1, tokens, 1)).to(POSITION_DTYPE)

    # -- reading ----------------------------------------------------------------------------------------------
    def scores(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale · q·k`` (+ ``log_weight``) of ``q (B, H, T, D)`` against every slot: ``(B, H, T, L)`` (GQA: query
        head ``i`` reads kv head ``i // (H / Hkv)``). Empty slots are not masked here: see :meth:`visible_to`."""
        s = grouped_logits(q, self.keys, scale)
        if self.log_weight is not None:
            s = s + _per_query_head(self.log_weight, q.shape[1]).unsqueeze(2)
        return s

    def slot_log_weights(self, heads: int) -> torch.Tensor | None:
        """``(B, heads, 1, L)``: each slot's ``log_weight`` (log of the tokens it stands for) as seen by ``heads``
        query heads, or None when no slot is merged. For methods that transform raw logits before adding it."""
        return None if self.log_weight is None else _per_query_head(self.log_weight, heads).unsqueeze(2)

    def combine(self, p: torch.Tensor) -> torch.Tensor:
        """``p v`` for weights ``p (B, H, T, L)`` over the slots: ``(B, H, T, Dv)``."""
        return grouped_pv(p.to(self.values.dtype), self.values)

    def key_positions(self, heads: int) -> torch.Tensor:
        """``(B, heads, 1, L)``: the slots' positions as seen by ``heads`` query heads (GQA groups share a row)."""
        return _per_query_head(self.positions, heads).unsqueeze(2)

    def visible_to(self, q_pos: torch.Tensor, heads: int) -> torch.Tensor:
        """``(B, heads, T, L)``: occupied slots at or before each query position ``q_pos (B, 1, T, 1)``."""
        kp = self.key_positions(heads)
        return (kp >= 0) & (kp <= q_pos)

    # -- writing ------------------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """The cache after ``T`` more tokens per sequence, ``k (B, Hkv, T, D)``, ``v (B, Hkv, T, Dv)`` (sequence ``b``'s
        token ``t`` takes position ``length[b] + t``)."""
        b, hkv, t, _ = k.shape
        pos = (self.length.view(b, 1) + torch.arange(t, device=k.device)).to(POSITION_DTYPE)
        pos = pos.view(b, 1, t).expand(b, hkv, t)
        length = self.length + t
        if self.ring is not None:
            return self._write_ring(k, v, pos, length)
        n = self.slots
        complete = self.complete or n == 0  # the new slots all hold tokens
        if _recorded(k, v, self.keys):  # autograd: build new tensors, never write into recorded ones
            positions = torch.cat([self.positions, pos], 2)
            return replace(self, keys=torch.cat([self.keys, k], 2), values=torch.cat([self.values, v], 2),
                           positions=positions, length=length, log_weight=_pad(self.log_weight, t),
                           slot_data=_pad_all(self.slot_data, t), storage=None, known_complete=(positions, complete))
        storage = self.storage
        if storage is None or not self._owns(storage) or n + t > storage.capacity:
            grow = n + t + max(16, (n + t) // 16)
            storage = _Storage(*(_grown(x, grow, fill) for x, fill in
                                 ((self.keys, 0), (self.values, 0), (self.positions, -1))))
        storage.keys[:, :, n : n + t] = k
        storage.values[:, :, n : n + t] = v
        storage.positions[:, :, n : n + t] = pos
        storage.version += 1
        positions = storage.positions[:, :, : n + t]
        return replace(self, keys=storage.keys[:, :, : n + t], values=storage.values[:, :, : n + t],
                       positions=positions, length=length, log_weight=_pad(self.log_weight, t),
                       slot_data=_pad_all(self.slot_data, t), storage=storage, version=storage.version,
                       known_complete=(positions, complete))

    def _write_ring(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, length: torch.Tensor) -> KVCache:
        """Ring append: position ``p`` overwrites slot ``p mod ring`` (the token ``ring`` positions older)."""
        assert self.ring is not None
        if k.shape[2] > self.ring:
            k, v, pos = k[:, :, -self.ring :], v[:, :, -self.ring :], pos[:, :, -self.ring :]
        slot = (pos % self.ring).long()
        storage = self.storage
        if storage is not None and storage.version != self.version:
            raise fail("cache", "the newest state of a ring cache (rings are written in place: a continued state "
                       "cannot be continued again; branch from cache.copy() taken before)", "an older state")
        if not self._owns(storage) or _recorded(k, v, self.keys):
            keys = self.keys.scatter(2, slot.unsqueeze(-1).expand_as(k), k)
            values = self.values.scatter(2, slot.unsqueeze(-1).expand_as(v), v)
            positions = self.positions.scatter(2, slot, pos)
            if _recorded(k, v, self.keys):
                return replace(self, keys=keys, values=values, positions=positions, length=length,
                               slot_data=_reset(self.slot_data, slot), storage=None, version=0,
                               known_complete=(positions, bool((length >= self.ring).all())))
            storage = _Storage(keys, values, positions)
        else:
            storage.keys.scatter_(2, slot.unsqueeze(-1).expand_as(k), k)
            storage.values.scatter_(2, slot.unsqueeze(-1).expand_as(v), v)
            storage.positions.scatter_(2, slot, pos)
        storage.version += 1
        return replace(self, keys=storage.keys, values=storage.values, positions=storage.positions, length=length,
                       slot_data=_reset(self.slot_data, slot), storage=storage, version=storage.version,
                       known_complete=(storage.positions, bool((length >= self.ring).all())))

    def _owns(self, storage: _Storage | None) -> bool:
        """Whether this cache is the newest state of ``storage`` and its tensors are the storage's (so an append may
        write in place)."""
        return storage is not None and storage.version == self.version and all(
            mine.data_ptr() == held.data_ptr() for mine, held in
            ((self.keys, storage.keys), (self.values, storage.values), (self.positions, storage.positions)))

    def copy(self) -> KVCache:
        """An independent copy (fresh tensors, no shared storage): what to branch a ring cache from."""
        return replace(self, keys=self.keys.clone(), values=self.values.clone(), positions=self.positions.clone(),
                       storage=None, version=0)

    def keep(self, index: torch.Tensor, log_weight: torch.Tensor | None = None) -> KVCache:
        """A compact cache of the slots ``index (B, Hkv, L')`` (``-1``: an empty slot) of each row, in fresh tensors
        of exactly ``L'`` slots. ``log_weight`` replaces the kept slots' log-weights (merging presses)."""
        if index.dim() != 3 or index.shape[:2] != self.positions.shape[:2]:
            expected = f"a (batch, kv_heads, slots) tensor with batch, kv_heads {tuple(self.positions.shape[:2])}"
            raise fail("index", expected, tuple(index.shape))
        empty = index < 0
        safe = index.clamp(min=0).long()

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.gather(2, safe.unsqueeze(-1).expand(*safe.shape, t.shape[-1]))

        positions = self.positions.gather(2, safe).masked_fill(empty, -1)
        if log_weight is None and self.log_weight is not None:
            log_weight = self.log_weight.gather(2, safe)
        slot_data = {n: t.gather(2, safe).masked_fill(empty, 0) for n, t in self.slot_data.items()}
        return replace(self, keys=take(self.keys), values=take(self.values), positions=positions,
                       log_weight=log_weight, slot_data=slot_data, ring=None, storage=None, version=0,
                       known_complete=None)


def check_lengths(lengths: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """``lengths (B,)`` validated (integers in ``[0, seq]``) as int64 on ``device``; None: every sequence is full."""
    if lengths is None:
        return torch.full((batch,), seq, dtype=torch.long, device=device)
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) or lengths.is_floating_point():
        raise fail("lengths", f"an integer tensor of shape ({batch},) (tokens per sequence)", _describe(lengths))
    if bool((lengths < 0).any()) or bool((lengths > seq).any()):
        raise fail("lengths", f"values in [0, {seq}] (the prompt has {seq} positions)", lengths.tolist())
    return lengths.to(device=device, dtype=torch.long)


def _describe(x: Any) -> str:
    return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, torch.Tensor) else repr(x)


def _per_query_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, Hkv, L)`` → ``(B, heads, L)`` as a view-friendly expansion (query head ``i`` reads kv head ``i // G``)."""
    b, hkv, n = t.shape
    return t.unsqueeze(2).expand(b, hkv, heads // hkv, n).reshape(b, heads, n)


def _recorded(*tensors: torch.Tensor) -> bool:
    """Whether autograd records these tensors (then nothing may be written into them in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _grown(t: torch.Tensor, slots: int, fill: int) -> torch.Tensor:
    out = t.new_full((*t.shape[:2], slots, *t.shape[3:]), fill)
    out[:, :, : t.shape[2]] = t
    return out


def _pad(per_slot: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """A per-slot tensor with ``tokens`` new slots of 0 (a new slot stands for one token: log-weight 0)."""
    if per_slot is None:
        return None
    return torch.cat([per_slot, per_slot.new_zeros(*per_slot.shape[:2], tokens)], 2)


def _reset(slot_data: dict[str, torch.Tensor], slot: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-slot data with the ring slots ``slot (B, Hkv, T)`` just overwritten set to 0 (a new token's value)."""
    return {n: t.scatter(2, slot, 0) for n, t in slot_data.items()}


def _pad_all(slot_data: dict[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    return {n: _pad(t, tokens) for n, t in slot_data.items()}
