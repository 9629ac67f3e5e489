"""What the scoring presses (K2–K6) observe of a prompt's attention, and how they protect and evict slots.

- :func:`query_positions`: the positions of the ``S`` query rows a :class:`~attnzoo.kv.presses.base.PressContext`
  holds (``-1`` for padding rows).
- :func:`attention_blocks`: the softmax weights of those queries over the cache, one block of query rows at a time, so
  a press that reads the whole prompt's attention (H2O, RazorAttention, EMS) never holds the ``S × L`` matrix.
- :func:`accumulated_attention`: the attention every slot received from all prompt queries (H2O's heavy-hitter score),
  summed over each GQA group, and how many queries could see it.
- :func:`group_mean`: per-kv-head weights (the mean over the query heads of a GQA group); :func:`mean_attention`: the
  attention of a few queries averaged over them and over each group (observation windows, pseudo queries).
- :func:`protect`: scores with some slots forced above every other, the more recent first (sinks, windows).
- :func:`kept_mask`, :func:`slot_counts`: which slots an index keeps, and how many tokens each slot stands for
  (merging presses).
- :func:`decode_target` and :func:`evict_to`: the tokens a press keeps while decoding (a ``budget``, or the share
  ``1 − compression_ratio`` of the tokens seen so far) and the eviction down to it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import attention_weights, top_slots

QUERY_BLOCK = 256


def query_positions(cache: KVCache, rows: int) -> torch.Tensor:
    """``(B, 1, rows, 1)``: the positions of the last ``rows`` query rows of each sequence (rows are right-padded:
    sequence ``b``'s row ``r`` is position ``r + max(length[b] − rows, 0)``; rows past its length get ``-1``)."""
    length = cache.length.view(-1, 1)
    pos = torch.arange(rows, device=length.device) + (length - rows).clamp(min=0)
    return torch.where(pos < length, pos, -1).view(-1, 1, rows, 1)


def attention_blocks(
    cache: KVCache, queries: torch.Tensor, scale: float, block: int = QUERY_BLOCK,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each block of query rows: ``(first row, weights (B, H, r, L), positions (B, 1, r, 1))`` (causal, padding
    rows and empty slots get 0)."""
    pos = query_positions(cache, queries.shape[2])
    for start in range(0, queries.shape[2], block):
        rows = slice(start, start + block)
        yield start, attention_weights(cache, queries[:, :, rows], pos[:, :, rows], scale), pos[:, :, rows]


def group_mean(weights: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, H, ...)`` → ``(B, Hkv, ...)``: the mean over the query heads that share each key/value head."""
    b, h = weights.shape[:2]
    return weights.reshape(b, kv_heads, h // kv_heads, *weights.shape[2:]).mean(2)


def mean_attention(cache: KVCache, q: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, Hkv, L)``: the attention of queries ``q (B, H, T, D)`` at ``q_pos (B, 1, T, 1)`` over the slots,
    averaged over each sequence's real queries (position ``>= 0``) and over each GQA group."""
    weights = attention_weights(cache, q, q_pos, scale)
    rows = (q_pos >= 0).sum(2).clamp(min=1)  # (B, 1, 1)
    return group_mean(weights.sum(2) / rows, cache.keys.shape[1])


def accumulated_attention(
    cache: KVCache, queries: torch.Tensor, scale: float, block: int = QUERY_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, seen_by)``, both ``(B, Hkv, L)``: the attention each slot received from every query row, summed over
    the rows and the GQA group, and the number of query rows (per head) that could see it."""
    group = queries.shape[1] // cache.keys.shape[1]
    total = cache.keys.new_zeros(cache.positions.shape, dtype=torch.float32)
    for _, weights, _ in attention_blocks(cache, queries, scale, block):
        total += weights.sum(2).reshape(*total.shape[:2], group, -1).sum(2)
    # the query rows hold positions [max(length − S, 0), length): those at or after a slot's position see it
    length = cache.length.view(-1, 1, 1)
    first = (length - queries.shape[2]).clamp(min=0)
    seen_by = (length - torch.maximum(cache.positions.long(), first)).clamp(min=0) * cache.occupied()
    return total, (seen_by * group).float()


def protect(scores: torch.Tensor, cache: KVCache, keep: torch.Tensor) -> torch.Tensor:
    """``scores`` with the slots where ``keep`` is True ranked above every other slot, the most recent first."""
    base = scores.float().masked_fill(~cache.occupied(), -torch.inf).amax(-1, keepdim=True)
    base = torch.where(torch.isfinite(base), base, torch.zeros_like(base))
    return torch.where(keep, base + 1 + cache.positions.float(), scores.float())


def decode_target(cache: KVCache, ratio: float, budget: int | None) -> torch.Tensor:
    """``(B, Hkv)``: the tokens each row keeps while decoding: ``min(tokens, budget)``, or, without a budget,
    ``length − floor(length · ratio)`` of the ``length`` tokens the sequence has seen (never more than it holds)."""
    tokens = cache.token_counts()
    if budget is not None:
        return tokens.clamp(max=budget)
    length = cache.length.view(-1, 1)
    return torch.minimum(tokens, length - torch.floor(length * ratio).long())


def evict_to(cache: KVCache, scores: torch.Tensor, target: torch.Tensor) -> KVCache:
    """The cache after keeping the ``target (B, Hkv)`` best-scored slots of each row (unchanged when no row is over)."""
    if not bool((cache.token_counts() > target).any()):
        return cache
    return cache.keep(top_slots(scores, cache, target))


def kept_mask(index: torch.Tensor, slots: int) -> torch.Tensor:
    """``(B, Hkv, slots)``: the slots named in ``index (B, Hkv, L')`` (``-1`` entries name none)."""
    mask = torch.zeros(*index.shape[:2], slots + 1, dtype=torch.bool, device=index.device)
    mask.scatter_(2, torch.where(index >= 0, index, slots).long(), True)
    return mask[..., :slots]


def slot_counts(cache: KVCache) -> torch.Tensor:
    """``(B, Hkv, L)``: the tokens each slot stands for (``exp(log_weight)``; 1 for a plain slot, 0 for an empty)."""
    counts = torch.ones_like(cache.positions, dtype=torch.float32) if cache.log_weight is None else (
        cache.log_weight.float().exp())
    return counts * cache.occupied()
