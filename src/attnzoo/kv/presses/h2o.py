"""K2 — H2O: keep the heavy hitters (the tokens that received the most attention) and the recent tokens.

Paper: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models" (Zhang et al.;
arXiv:2306.14048). A few tokens receive most of the attention; their accumulated attention finds them.

Score as implemented, per sequence, kv head and slot ``j``: ``A_j = Σ_{i, h in group} softmax(q_i,h · k · scale)_j``,
the attention ``j`` received from every prompt query ``i`` (causal) and every query head of its GQA group, summed
(the paper's accumulation, not kvpress's mean per query that could see ``j``). It is computed over blocks of
``query_block`` query rows, never the full ``S × S`` matrix. The ``recent_fraction`` (default 0.5, the paper's even
split between heavy hitters and recent tokens) of each row's kept tokens goes to the most recent tokens, the rest
to the highest ``A_j``.

Decoding (:meth:`H2OPress.step`): the running scores live in ``cache.slot_data["h2o"]``; each step adds the new
query's attention to them and, when a row holds more than its target (``budget``, or ``length − floor(length ·
ratio)`` of the tokens seen so far), evicts its lowest-scored non-recent token, as the paper's greedy eviction does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import (
    PressContext,
    ScorerPress,
    attention_weights,
    check_fraction,
    check_positive,
    kept_tokens,
    register_press,
    top_slots,
)
from attnzoo.kv.presses.observe import QUERY_BLOCK, accumulated_attention, decode_target, evict_to, protect

SLOT_DATA = "h2o"


@dataclass(frozen=True)
class H2OPress(ScorerPress):
    """Keep the tokens with the most accumulated attention, and the ``recent_fraction`` most recent ones."""

    recent_fraction: float = 0.5
    query_block: int = QUERY_BLOCK

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("recent_fraction", self.recent_fraction)
        check_positive("query_block", self.query_block)

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        """The accumulated attention alone (:meth:`compress` also reserves the recent share)."""
        return accumulated_attention(cache, context.queries, context.scale, self.query_block)[0]

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        scores = self.score(cache, context)
        keep = kept_tokens(cache, self.compression_ratio, self.budget)
        cache = replace(cache, slot_data={**cache.slot_data, SLOT_DATA: scores})
        return cache.keep(top_slots(with_recent(scores, cache, keep, self.recent_fraction), cache, keep))

    def step(self, cache: KVCache, context: PressContext) -> KVCache:
        weights = attention_weights(cache, context.queries, cache.query_positions(1), context.scale)  # (B, H, 1, L)
        b, hkv, n = cache.positions.shape
        running = cache.slot_data.get(SLOT_DATA, cache.positions.new_zeros(b, hkv, n, dtype=torch.float32))
        running = running + weights.sum(2).reshape(b, hkv, -1, n).sum(2)
        cache = replace(cache, slot_data={**cache.slot_data, SLOT_DATA: running})
        target = decode_target(cache, self.compression_ratio, self.budget)
        return evict_to(cache, with_recent(running, cache, target, self.recent_fraction), target)


def with_recent(scores: torch.Tensor, cache: KVCache, keep: torch.Tensor, fraction: float) -> torch.Tensor:
    """``scores`` with each row's ``floor(fraction · keep)`` most recent positions ranked first."""
    recent = torch.floor(keep * fraction).long().unsqueeze(-1)  # (B, Hkv, 1)
    return protect(scores, cache, cache.occupied() & (cache.positions >= cache.length.view(-1, 1, 1) - recent))


register_press(H2OPress, "K2", "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
               "2306.14048", "accumulated attention of all queries (heavy hitters) + recent tokens; evicts while "
               "decoding", needs=("queries",))
