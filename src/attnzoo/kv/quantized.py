"""A KV cache that stores each token quantised: rotated, reordered, grouped low-bit codes (RotateKV, K9).

A :class:`QuantizedKVCache` keeps two parts:

- ``sinks``: a dense :class:`~attnzoo.kv.cache.KVCache` of the tokens kept in full precision (the attention sinks:
  the first ``n_sink`` positions of each prompt);
- ``rows``: every other token as one **byte row** for its keys and one for its values (all kv heads together:
  :func:`~attnzoo.kernels.quantize.to_bytes` — packed codes, then float16 scales and zeros). ``rows`` is itself a
  :class:`KVCache` with a single "head" whose keys and values are these uint8 rows, so appends reuse its growing
  storage and value semantics; its positions are those of every kv head.

How a token becomes bytes is the :class:`TokenCodec` (built by :class:`~attnzoo.kv.presses.rotatekv.RotateKVPress`):

- keys ``k (Hkv, D)`` are flattened to ``C = Hkv·D`` channels, rotated by the Walsh–Hadamard transform in blocks of
  ``head_group`` heads (``H_blk``), reordered by the sequence's calibrated channel order ``P``, and quantised in groups
  of ``group`` consecutive channels: stored ``Q(P H_blk k)``;
- values ``v (Hkv, Dv)`` are rotated per head (``H_v``) and quantised the same way (no reordering): stored
  ``Q(H_v v)``.

Reading (dequantisation on read, nothing full-precision is kept between steps): keys are dequantised, put back in
channel order and rotated back (``H_blk`` is its own inverse), then scored like any cache. Values are dequantised in
the rotated basis and weighted by the softmax; the rotation is undone once on the ``(B, H, T, Dv)`` output (exact:
``Σ p_j H_v v̂_j = H_v Σ p_j v̂_j``).

Tokens appended while decoding are encoded on append with the same codec (no full-precision window of recent tokens:
RotateKV quantises every token per token, so a new token needs no company to be quantised). A quantised cache keeps
whole tokens (its rotation and groups span kv heads), so it serves caches whose kv heads hold the same tokens, drops
only whole tokens (:meth:`QuantizedKVCache.keep`: the same slots for every kv head, no merging), and does not serve
rings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from attnzoo.errors import fail
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv
from attnzoo.kernels.hadamard import hadamard, hadamard_blocks, is_power_of_two
from attnzoo.kernels.quantize import check_bits, check_group, dequantize, from_bytes, quantize, to_bytes
from attnzoo.kv.cache import KVCache


@dataclass(frozen=True, eq=False)
class TokenCodec:
    """How a token's keys ``(B, Hkv, T, D)`` and values ``(B, Hkv, T, Dv)`` become byte rows ``(B, 1, T, ·)`` and back.

    ``bits`` per code, ``group`` channels per quantisation group, ``block`` = ``head_group·D`` channels per key
    rotation block, ``order (B, Hkv·D)`` each sequence's channel order (stored channel ``j`` is rotated channel
    ``order[j]``), ``dtype`` of what is read back.
    """

    bits: int
    group: int
    block: int
    kv_heads: int
    head_dim: int
    head_dim_v: int
    order: torch.Tensor
    dtype: torch.dtype

    @classmethod
    def build(
        cls, keys: torch.Tensor, values: torch.Tensor, real: torch.Tensor, bits: int, group: int, head_group: int,
    ) -> TokenCodec:
        """The codec of a cache whose slots hold ``keys (B, Hkv, L, D)``, ``values (B, Hkv, L, Dv)``, ``real (B, L)``
        marking occupied slots: the channel order of each sequence is calibrated on its own real keys (see
        :func:`channel_order`). ``group`` is capped at the ``Hkv·D`` channels of a token; ``head_group`` at the
        largest power of two dividing ``Hkv``."""
        check_bits(bits)
        _, hkv, _, d = keys.shape
        dv = values.shape[-1]
        for name, dim in (("k", d), ("v", dv)):
            if not is_power_of_two(dim):
                raise fail(name, "a head dimension that is a power of two (the Walsh–Hadamard rotation)", dim)
        channels = hkv * d
        group = min(group, channels, hkv * dv)
        for n in (channels, hkv * dv):
            check_group(n, group, "group_size")
        block = _gcd_power_of_two(head_group, hkv) * d
        probe = cls(bits, group, block, hkv, d, dv, torch.empty(0, dtype=torch.long), keys.dtype)
        order = channel_order(probe.rotate_keys(keys), real)
        return replace(probe, order=order)

    # -- keys ------------------------------------------------------------------------------------------------------
    def rotate_keys(self, k: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv, T, D)`` → the rotated flat channels ``(B, T, Hkv·D)``, in rotation order (not yet reordered)."""
        b, hkv, t, d = k.shape
        return hadamard_blocks(k.transpose(1, 2).reshape(b, t, hkv * d), self.block, "k")

    def encode_keys(self, k: torch.Tensor) -> torch.Tensor:
        """Keys ``(B, Hkv, T, D)`` → byte rows ``(B, 1, T, ·)``: ``Q(P H_blk k)``."""
        flat = self.rotate_keys(k.float())
        stored = flat.gather(-1, self.order.unsqueeze(1).expand_as(flat))
        return to_bytes(quantize(stored, self.bits, self.group)).unsqueeze(1)

    def decode_keys(self, rows: torch.Tensor) -> torch.Tensor:
        """Byte rows ``(B, 1, L, ·)`` → keys ``(B, Hkv, L, D)``: dequantised, reordered back, rotated back."""
        b, _, n, _ = rows.shape
        channels = self.kv_heads * self.head_dim
        stored = dequantize(from_bytes(rows[:, 0], channels, self.bits, self.group), self.bits)
        flat = stored.new_empty(stored.shape).scatter_(-1, self.order.unsqueeze(1).expand_as(stored), stored)
        keys = hadamard_blocks(flat, self.block)
        return keys.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2).to(self.dtype)

    # -- values ----------------------------------------------------------------------------------------------------
    def encode_values(self, v: torch.Tensor) -> torch.Tensor:
        """Values ``(B, Hkv, T, Dv)`` → byte rows ``(B, 1, T, ·)``: ``Q(H_v v)`` (per-head rotation)."""
        b, hkv, t, dv = v.shape
        flat = hadamard(v.float(), "v").transpose(1, 2).reshape(b, t, hkv * dv)
        return to_bytes(quantize(flat, self.bits, self.group)).unsqueeze(1)

    def decode_values_rotated(self, rows: torch.Tensor) -> torch.Tensor:
        """Byte rows ``(B, 1, L, ·)`` → the rotated values ``H_v v̂`` ``(B, Hkv, L, Dv)`` (:func:`hadamard` undoes
        the rotation)."""
        b, _, n, _ = rows.shape
        flat = dequantize(from_bytes(rows[:, 0], self.kv_heads * self.head_dim_v, self.bits, self.group), self.bits)
        return flat.view(b, n, self.kv_heads, self.head_dim_v).transpose(1, 2).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.order.numel() * self.order.element_size()


def channel_order(rotated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(B, C)``: each sequence's rotated key channels sorted by their sum over its real tokens (ascending, ties in
    channel order), ``rotated (B, L, C)``, ``real (B, L)``. Channels of similar offset then share quantisation groups
    (RotateKV's calibration sorts the channel sums of the calibration keys the same way)."""
    sums = torch.where(real.unsqueeze(-1), rotated, 0).sum(1)
    return torch.sort(sums, dim=-1, stable=True).indices


@dataclass(frozen=True, eq=False)
class QuantizedKVCache:
    """A cache of full-precision ``sinks`` and quantised ``rows`` (see the module doc), read like a :class:`KVCache`:
    slots are the sinks' then the rows'; :attr:`positions` ``(B, Hkv, S + Lq)``."""

    sinks: KVCache
    rows: KVCache
    codec: TokenCodec
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    slot_data: dict[str, torch.Tensor] = field(default_factory=dict)

    plain: ClassVar[bool] = False
    log_weight: ClassVar[None] = None
    ring: ClassVar[None] = None

    # Position bookkeeping is KVCache's own (it reads only ``positions`` and ``length``).
    occupied = KVCache.occupied
    token_counts = KVCache.token_counts
    query_positions = KVCache.query_positions
    key_positions = KVCache.key_positions
    visible_to = KVCache.visible_to

    @classmethod
    def from_cache(
        cls, cache: KVCache, n_sink: int, bits: int, group: int, head_group: int,
    ) -> QuantizedKVCache:
        """Quantise a dense ``cache`` (no ring, no merged slots, every kv head holding the same tokens): positions
        below ``n_sink`` stay in full precision, every other token is encoded by a :class:`TokenCodec` calibrated on
        these tokens' keys. Per-slot press statistics (``slot_data``) are not carried."""
        if not isinstance(cache, KVCache) or not cache.plain:
            raise fail("cache", "a dense KVCache (RotateKV quantises a cache once)", type(cache).__name__)
        if cache.ring is not None:
            raise fail("cache", "a cache that keeps every token (RotateKV does not serve ring caches)",
                       f"a ring of {cache.ring}")
        if cache.log_weight is not None:
            raise fail("cache", "a cache without merged slots (RotateKV stores one token per slot)", "merged slots")
        positions = cache.positions[:, :1]
        if not bool((cache.positions == positions).all()):
            raise fail("cache", "kv heads that hold the same tokens (RotateKV quantises whole tokens across heads)",
                       "per-head slots")
        is_sink = (positions >= 0) & (positions < n_sink)
        sinks = cache.keep(_slots_where(is_sink).expand(-1, cache.keys.shape[1], -1))
        rest = cache.keep(_slots_where((positions >= 0) & ~is_sink).expand(-1, cache.keys.shape[1], -1))
        codec = TokenCodec.build(rest.keys, rest.values, rest.positions[:, 0] >= 0, bits, group, head_group)
        rows = KVCache(codec.encode_keys(rest.keys), codec.encode_values(rest.values), rest.positions[:, :1],
                       cache.length)
        return cls(replace(sinks, slot_data={}), rows, codec, dict(cache.extras))

    # -- facts ----------------------------------------------------------------------------------------------------
    @property
    def length(self) -> torch.Tensor:
        return self.rows.length

    @property
    def positions(self) -> torch.Tensor:
        b, hkv = self.sinks.positions.shape[:2]
        return torch.cat([self.sinks.positions, self.rows.positions.expand(b, hkv, -1)], 2)

    @property
    def slots(self) -> int:
        return self.sinks.slots + self.rows.slots

    @property
    def nbytes(self) -> int:
        """Bytes held: the sinks, the byte rows (storage capacity included), their positions, the channel orders."""
        extra = sum(t.numel() * t.element_size() for t in self.extras.values())
        return self.sinks.nbytes + self.rows.nbytes + self.codec.nbytes + extra

    # -- reading --------------------------------------------------------------------------------------------------
    def scores(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale · q·k`` over the sinks, then over the dequantised keys: ``(B, H, T, S + Lq)``."""
        keys = self.codec.decode_keys(self.rows.keys).to(q.dtype)
        return torch.cat([grouped_logits(q, self.sinks.keys.to(q.dtype), scale), grouped_logits(q, keys, scale)], -1)

    def combine(self, p: torch.Tensor) -> torch.Tensor:
        """``p v`` ``(B, H, T, Dv)``: the sinks' values, plus the rotated dequantised values rotated back once."""
        p_sinks, p_rows = p.split([self.sinks.slots, self.rows.slots], dim=-1)
        rotated = self.codec.decode_values_rotated(self.rows.values).to(p.dtype)
        return grouped_pv(p_sinks, self.sinks.values.to(p.dtype)) + hadamard(grouped_pv(p_rows, rotated))

    # -- writing --------------------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> QuantizedKVCache:
        """The cache after ``T`` more tokens per sequence, quantised on the way in."""
        return replace(self, rows=self.rows.append(self.codec.encode_keys(k), self.codec.encode_values(v)))

    def keep(self, index: torch.Tensor, log_weight: torch.Tensor | None = None) -> QuantizedKVCache:
        """A compact cache of the slots ``index (B, Hkv, L')`` (``-1``: none), the same for every kv head (whole
        tokens). The kept slots come back in the cache's slot order — sinks first — which is the order of
        :func:`~attnzoo.kv.presses.base.top_slots`' indices. Merging (``log_weight``) is not supported."""
        if log_weight is not None:
            raise fail("log_weight", "None (a quantised cache stores one token per slot)", "merge weights")
        b, hkv = self.sinks.positions.shape[:2]
        if index.dim() != 3 or index.shape[:2] != (b, hkv) or not bool((index == index[:, :1]).all()):
            raise fail("index", f"a (batch, kv_heads, slots) tensor of batch, kv_heads ({b}, {hkv}), the same slots "
                       "for every kv head (a quantised cache keeps whole tokens)", tuple(index.shape))
        chosen = torch.zeros(b, self.slots + 1, dtype=torch.bool, device=index.device)
        chosen[torch.arange(b, device=index.device).unsqueeze(1), index[:, 0].clamp(min=-1).long()] = True
        in_sinks, in_rows = chosen[:, :-1].split([self.sinks.slots, self.rows.slots], dim=1)  # the last column: -1
        sinks = self.sinks.keep(_slots_where(in_sinks.unsqueeze(1)).expand(-1, hkv, -1))
        return replace(self, sinks=sinks, rows=self.rows.keep(_slots_where(in_rows.unsqueeze(1))))


def _slots_where(mask: torch.Tensor) -> torch.Tensor:
    """``(B, R, n)`` slot indices of each row's True entries of ``mask (B, R, L)``, in order, then ``-1``
    (``n``: the most True entries of any row)."""
    slots = mask.shape[-1]
    key = torch.where(mask, torch.arange(slots, device=mask.device), slots)
    width = int(mask.sum(-1).max()) if mask.numel() else 0
    index = key.sort(dim=-1).values[..., :width]
    return torch.where(index < slots, index, -1).to(torch.long)


def _gcd_power_of_two(head_group: int, kv_heads: int) -> int:
    """The largest power of two that divides ``kv_heads`` and is at most ``head_group`` (a power of two)."""
    g = 1
    while g * 2 <= head_group and kv_heads % (g * 2) == 0:
        g *= 2
    return g

