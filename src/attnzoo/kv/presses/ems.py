"""K5 — EMS: a global-local importance score, then per head evict-then-merge.

Paper: "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local Importance"
(Li et al.; arXiv:2412.08521). Accumulated attention (global) favours early tokens, attention from a recent window
(local) misses what the whole prompt found important; EMS combines the two, and instead of dropping what it evicts it
merges similar evicted tokens into kept ones (a *zero class* collects the evicted tokens that match nothing, which are
dropped), each head on its own.

As implemented, per sequence and kv head (slot ``j``):

- global ``g_j = A_j / n_j``: the attention ``j`` received from every prompt query and query head of its GQA group
  (``A_j``, as H2O, read over blocks of ``query_block`` query rows) divided by the number ``n_j`` of (query, head)
  pairs that could see it, so that late tokens are not penalised for being seen by fewer queries;
- local ``l_j``: the mean attention of the last ``window_size`` queries (default 32) over the GQA group, as SnapKV's;
- score ``g_j + l_j`` (both are mean attention weights, on one scale); the window's tokens are always kept. The top
  ``tokens − floor(tokens · ratio)`` (or ``budget``) are kept, so a row keeps exactly that many slots.
- merge: each evicted slot joins the kept slot whose key is the most similar (cosine) when that similarity is at least
  ``merge_threshold`` (default 0.5), else the zero class (dropped). A kept slot ``c`` with members ``M`` becomes the
  count-weighted mean ``k_c = Σ_{m in {c} ∪ M} n_m k_m / Σ n_m`` (values alike) with ``log_weight = log Σ n_m``, where
  ``n_m`` is the tokens each slot already stands for (``exp(log_weight)``, 1 for a plain slot): ``n`` identical tokens
  merged give exactly their attention output. Similarities are computed over blocks of slots, never ``L × L``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import (
    PressContext,
    ScorerPress,
    check_number,
    check_positive,
    kept_tokens,
    register_press,
    top_slots,
)
from attnzoo.kv.presses.observe import QUERY_BLOCK, accumulated_attention, kept_mask, protect, slot_counts
from attnzoo.kv.presses.snapkv import in_window, window_attention


@dataclass(frozen=True)
class EMSPress(ScorerPress):
    """Keep by global + local attention; merge each evicted token into its most similar kept one."""

    window_size: int = 32
    merge_threshold: float = 0.5
    query_block: int = QUERY_BLOCK

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("window_size", self.window_size)
        check_positive("query_block", self.query_block)
        check_number("merge_threshold", self.merge_threshold, lambda x: -1.0 <= x <= 1.0,
                     "a cosine similarity in [-1, 1]")

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        total, seen_by = accumulated_attention(cache, context.queries, context.scale, self.query_block)
        local = window_attention(cache, context, self.window_size)
        return protect(total / seen_by.clamp(min=1) + local, cache, in_window(cache, self.window_size))

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        index = top_slots(self.score(cache, context), cache, kept_tokens(cache, self.compression_ratio, self.budget))
        return merge_evicted(cache, index, self.merge_threshold, self.query_block)


def merge_evicted(cache: KVCache, index: torch.Tensor, threshold: float, block: int) -> KVCache:
    """The slots ``index`` kept, each evicted slot merged into its most similar kept slot (cosine of keys at least
    ``threshold``; otherwise dropped), as count-weighted means with ``log_weight = log(count)``."""
    n = cache.slots
    kept = cache.keep(index)
    if kept.slots == 0:
        return kept
    counts = slot_counts(cache)
    evicted = cache.occupied() & ~kept_mask(index, n)
    unit_kept = F.normalize(kept.keys.float(), dim=-1)
    total = counts.gather(2, index.clamp(min=0).long()) * (index >= 0)  # (B, Hkv, L'): tokens per kept slot
    sum_k = kept.keys.float() * total.unsqueeze(-1)
    sum_v = kept.values.float() * total.unsqueeze(-1)
    merged_any = False
    for start in range(0, n, block):
        rows = slice(start, start + block)
        sim = F.normalize(cache.keys[:, :, rows].float(), dim=-1) @ unit_kept.transpose(-1, -2)
        sim = sim.masked_fill((index < 0).unsqueeze(2), -torch.inf)
        best_sim, best = sim.max(-1)  # (B, Hkv, r)
        join = evicted[:, :, rows] & (best_sim >= threshold)
        if not bool(join.any()):
            continue
        merged_any = True
        weight = counts[:, :, rows] * join
        total.scatter_add_(2, best, weight)
        for acc, src in ((sum_k, cache.keys), (sum_v, cache.values)):
            part = src[:, :, rows].float() * weight.unsqueeze(-1)
            acc.scatter_add_(2, best.unsqueeze(-1).expand_as(part), part)
    if not merged_any:
        return kept
    share = total.clamp(min=1e-30).unsqueeze(-1)
    log_weight = torch.where(index >= 0, total.clamp(min=1e-30).log(), 0.0)
    return replace(kept, keys=(sum_k / share).to(cache.keys.dtype), values=(sum_v / share).to(cache.values.dtype),
                   log_weight=log_weight)


register_press(EMSPress, "K5", "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on "
               "Global-Local Importance", "2412.08521", "global + local attention score; evicted tokens merged into "
               "their most similar kept token (counts as log-weights)", needs=("queries",))
