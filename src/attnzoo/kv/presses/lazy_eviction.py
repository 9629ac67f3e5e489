"""K4 — LazyEviction: keep the tokens that are due to be attended again, judged by their recurrence intervals.

Paper: "LazyEviction: Lagged KV Eviction with Attention Pattern Observation for Efficient Long Reasoning" (Zhang,
Zhang, Ma, Zhang, Guo; arXiv:2506.15969). In long reasoning many tokens regain high attention after many steps
("token importance recurrence"); scores of the moment evict them. LazyEviction records, per token, the intervals
between the steps at which it is attended, observes for a window of steps before evicting (lagged eviction), and
evicts first the tokens that have stayed idle longer than their largest observed recurrence interval.

As implemented (the rule as the paper states it; its code was not available here, so the constants are ours), per
sequence, kv head and slot ``j`` at position ``p_j``:

- a query at position ``t`` *attends* ``j`` when its weight on ``j`` (averaged over the GQA group) is at least
  ``threshold``, by default ``1 / visible tokens`` (more than a uniform share);
- events of ``j``: its own position ``p_j`` and every step that attends it; ``last_j`` the latest event, ``MRI_j``
  the maximum recurrence interval (largest gap between consecutive events, 0 if none);
- score ``MRI_j − (now − last_j)``: how much longer ``j`` may stay idle before it is overdue by its own record (the
  idle ones overdue the most are evicted first); the last ``window_size`` tokens (default 32, the observation window)
  are always kept, since they have not been observed yet.

At prefill the events are the last ``window_size`` prompt queries (earlier ones are not seen again); the top
``tokens − floor(tokens · ratio)`` (or ``budget``) are kept. Decoding (:meth:`LazyEvictionPress.step`): each step
records its query's events in ``cache.slot_data`` (``"lazy_mri"``, and ``"lazy_last"`` as ``last − position`` so a new
slot starts at 0) and, every ``window_size`` steps, evicts each row down to its target (``budget``, or ``length −
floor(length · ratio)``): between two evictions a row holds up to ``window_size − 1`` tokens more, by design.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import (
    PressContext,
    ScorerPress,
    attention_weights,
    check_number,
    check_positive,
    kept_tokens,
    recent_queries,
    register_press,
    top_slots,
)
from attnzoo.kv.presses.observe import decode_target, evict_to, group_mean, protect
from attnzoo.kv.presses.snapkv import in_window

MRI, LAST = "lazy_mri", "lazy_last"


@dataclass(frozen=True)
class LazyEvictionPress(ScorerPress):
    """Evict the tokens idle for longer than their maximum observed recurrence interval; observe before evicting."""

    window_size: int = 32
    threshold: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("window_size", self.window_size)
        if self.threshold is not None:
            check_number("threshold", self.threshold, lambda x: 0.0 < x <= 1.0, "an attention weight in (0, 1] or None")

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        return self.recurrence(cache, context)[0]

    def recurrence(self, cache: KVCache, context: PressContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(score, mri, last)``, each ``(B, Hkv, L)``, from the prompt's last ``window_size`` queries."""
        q, q_pos = recent_queries(cache, context.queries, self.window_size)
        attended = attends(cache, q, q_pos, context.scale, self.threshold)  # (B, Hkv, w, L)
        mri = torch.zeros_like(cache.positions, dtype=torch.float32)
        last = cache.positions.float()
        for t in range(q.shape[2]):
            mri, last = record(mri, last, attended[:, :, t], q_pos[:, :, t].float())
        return overdue_score(cache, mri, last, self.window_size), mri, last

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        scores, mri, last = self.recurrence(cache, context)
        cache = replace(cache, slot_data={**cache.slot_data, MRI: mri, LAST: last - cache.positions.float()})
        return cache.keep(top_slots(scores, cache, kept_tokens(cache, self.compression_ratio, self.budget)))

    def step(self, cache: KVCache, context: PressContext) -> KVCache:
        q_pos = cache.query_positions(1)
        attended = attends(cache, context.queries, q_pos, context.scale, self.threshold)[:, :, 0]
        zeros = torch.zeros_like(cache.positions, dtype=torch.float32)
        mri = cache.slot_data.get(MRI, zeros)
        last = cache.slot_data.get(LAST, zeros) + cache.positions.float()
        mri, last = record(mri, last, attended, q_pos.view(-1, 1, 1).float())
        cache = replace(cache, slot_data={**cache.slot_data, MRI: mri, LAST: last - cache.positions.float()})
        due = cache.length % self.window_size == 0  # lagged: evict once every window_size steps
        if not bool(due.any()):
            return cache
        target = torch.where(due.view(-1, 1), decode_target(cache, self.compression_ratio, self.budget),
                             cache.token_counts())
        return evict_to(cache, overdue_score(cache, mri, last, self.window_size), target)


def attends(
    cache: KVCache, q: torch.Tensor, q_pos: torch.Tensor, scale: float, threshold: float | None,
) -> torch.Tensor:
    """``(B, Hkv, T, L)``: whether each query attends each slot (group-mean weight at least ``threshold``, default
    ``1 / visible tokens``)."""
    hkv = cache.keys.shape[1]
    weights = group_mean(attention_weights(cache, q, q_pos, scale), hkv)
    if threshold is None:
        visible = (cache.visible_to(q_pos, hkv) & (q_pos >= 0)).sum(-1, keepdim=True)
        return (weights > 0) & (weights * visible >= 1)
    return weights >= threshold


def record(
    mri: torch.Tensor, last: torch.Tensor, attended: torch.Tensor, now: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mri, last)`` after a query at position ``now`` (broadcastable to ``(B, Hkv, L)``) attended ``attended``."""
    mri = torch.where(attended, torch.maximum(mri, now - last), mri)
    return mri, torch.where(attended, now.expand_as(last), last)


def overdue_score(cache: KVCache, mri: torch.Tensor, last: torch.Tensor, window: int) -> torch.Tensor:
    """``MRI − (now − last)``, the observation window's tokens first."""
    now = (cache.length - 1).view(-1, 1, 1).float()
    return protect(mri - (now - last), cache, in_window(cache, window))


register_press(LazyEvictionPress, "K4", "LazyEviction: Lagged KV Eviction with Attention Pattern Observation for "
               "Efficient Long Reasoning", "2506.15969", "evict tokens idle longer than their maximum recurrence "
               "interval; lagged, once per observation window", needs=("queries",))
