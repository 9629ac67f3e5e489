"""Softmax attention of new queries over a :class:`~attnzoo.kv.cache.KVCache`: the read half of every cache decoder.

:func:`softmax_attention` is what softmax-form decoders call after appending their token: the query at position
``p`` sees the occupied slots at positions ``<= p``, AND a method's own visibility (a window, a 2-D neighbourhood),
with a method's additive score terms (ALiBi, a soft-cap applied by the caller to :meth:`KVCache.scores`). When the
cache is a plain one (every slot occupied, no merged slots, one query, nothing else to apply) it is exactly
``scaled_dot_product_attention`` over the cached keys — the fused kernel, no mask tensor (also when a method's
visibility hides no slot, e.g. a full ring of a sliding window); otherwise SDPA with a boolean mask, or the explicit
scores when a method transforms them. A cache that is not ``plain`` (quantised or projected keys) is always read
through its own ``scores`` and ``combine``.

:func:`predicate_visible` evaluates a method's mask predicate (the ``MaskMod`` its forward uses) on the cache's
positions, so that a decoder's visibility is its forward's rule, not a second copy of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnzoo.kernels.dense import safe_softmax
from attnzoo.kv.cache import KVCache
from attnzoo.kv.ragged import RaggedKVCache
from attnzoo.masks.core import MaskMod


def softmax_attention(
    cache: KVCache | RaggedKVCache, q: torch.Tensor, scale: float, visible: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(s + M) V`` for the cache's last ``T`` tokens' queries ``q (B, H, T, D)``: ``(B, H, T, Dv)``.

    ``M`` hides empty slots, slots after each query and, if given, slots where ``visible (B, H|1, T, L)`` is False.
    ``scores``: the method's own logits ``(B, H, T, L)`` (else ``cache.scores(q, scale)``). Rows that see nothing
    give 0. A :class:`~attnzoo.kv.ragged.RaggedKVCache` attends by its own :meth:`~RaggedKVCache.attend`.
    """
    if isinstance(cache, RaggedKVCache):
        return cache.attend(q, scale, visible, scores)
    heads, tokens = q.shape[1], q.shape[2]
    q_pos = cache.query_positions(tokens)
    if scores is None and cache.log_weight is None and cache.plain:
        plain = tokens == 1 and cache.complete
        if plain and (visible is None or bool(visible.all())):
            return F.scaled_dot_product_attention(q, cache.keys, cache.values, scale=scale,
                                                  enable_gqa=heads != cache.keys.shape[1])
        seen = cache.visible_to(q_pos, heads)
        if visible is not None:
            seen = seen & visible
        out = F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=seen, scale=scale,
                                             enable_gqa=heads != cache.keys.shape[1])
        return torch.where(seen.any(-1, keepdim=True), out, torch.zeros_like(out))
    seen = cache.visible_to(q_pos, heads)
    if visible is not None:
        seen = seen & visible
    s = cache.scores(q, scale) if scores is None else scores
    return cache.combine(safe_softmax(s, seen))


def predicate_visible(cache: KVCache, mod: MaskMod, heads: int, tokens: int = 1) -> torch.Tensor:
    """``(B, heads, T, L)``: ``mod(b, h, q_idx, kv_idx)`` for the cache's last ``T`` query positions against every
    slot's position (empty slots give some value; :func:`softmax_attention` hides them anyway)."""
    batch = cache.length.shape[0]
    device = cache.length.device
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q_idx = cache.query_positions(tokens).long()
    kv_idx = cache.key_positions(heads).long()
    return torch.broadcast_to(mod(b, h, q_idx, kv_idx), (batch, heads, tokens, cache.slots))


def masked_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mod: MaskMod,
) -> tuple[torch.Tensor, KVCache]:
    """The step of a method whose mask is one predicate: append the token, attend to the slots ``mod`` shows it."""
    cache = cache.append(k, v)
    return softmax_attention(cache, q, scale, predicate_visible(cache, mod, q.shape[1], q.shape[2])), cache


def position_block_pool(cache: KVCache, block_size: int, reduce: str = "mean",
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, Hkv, Nk, D)`` in ``dtype``: the cached keys of each block of ``block_size`` positions pooled by ``reduce``
    (``"mean"``, ``"amax"`` or ``"amin"``; ``Nk`` covers the longest sequence; a block with no cached key gets 0): the
    pooled keys a block-selecting decoder (MoBA, NSA, SeerAttention) scores a new query against."""
    b, hkv, _, d = cache.keys.shape
    nk = max(1, -(-int(cache.length.max()) // block_size))
    block = torch.where(cache.positions >= 0, cache.positions.long() // block_size, nk)  # empty slots: column nk
    index = block.unsqueeze(-1).expand(-1, -1, -1, d)
    keys = cache.keys.to(dtype)
    pooled = torch.zeros(b, hkv, nk + 1, d, dtype=dtype, device=keys.device)
    if reduce != "mean":
        return pooled.scatter_reduce_(2, index, keys, reduce=reduce, include_self=False)[:, :, :nk]
    sums = pooled.scatter_add_(2, index, keys)
    counts = torch.zeros(b, hkv, nk + 1, dtype=dtype, device=keys.device).scatter_add_(
        2, block, torch.ones_like(block, dtype=dtype))
    return (sums / counts.clamp_min(1).unsqueeze(-1))[:, :, :nk]


def selected_slots(cache: KVCache, chosen: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(B, H, T, L)`` bool: which slots lie in the position blocks ``chosen (B, H, T, K)`` (block indices of
    ``block_size`` positions, ``-1`` unused) — the ``visible`` argument of :func:`softmax_attention` for a decoder
    that selects key blocks per new query."""
    slot_block = cache.key_positions(chosen.shape[1]).long()  # (B, H, 1, L); empty slots (-1) stay unmatched
    slot_block = torch.where(slot_block >= 0, slot_block.div(block_size, rounding_mode="floor"), -2)
    return (slot_block.unsqueeze(-1) == chosen.unsqueeze(3)).any(-1)
