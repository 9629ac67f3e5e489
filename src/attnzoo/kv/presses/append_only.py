"""AppendOnlyPress — keep or skip each token once, when it arrives; never rewrite or reorder what was kept.

Presses that re-score the whole cache rewrite it (compact, reorder): a paged serving cache cannot follow them. This
press decides for each new token, once, whether it enters the cache, and never touches an earlier entry, so a kept
token's slot never moves (asked for in kvpress's tracker). The prompt's tokens are decided the same way, one by one
in position order, at prefill. The result is a :class:`~attnzoo.kv.ragged.RaggedKVCache` (each ``(sequence, kv
head)`` row keeps its own tokens, in order, in pages).

Decision rule, per row, for the token at position ``p`` (the ``n = p + 1``-th token of its sequence) with score ``s``
(``scorer(k, v)``; default :func:`inverse_key_norm`, ``−‖k‖``: low-norm keys draw more attention — the key-norm
baseline of K2 — and it needs nothing from the future):

- budget: ``cap = n − ⌊n · compression_ratio⌋`` (what a scoring press would keep of ``n`` tokens) and
  ``low = max(0, cap − slack)``; with ``m`` the tokens the row kept before, the token is kept if ``m < low``
  (the row is falling behind) and skipped if ``m ≥ cap`` (the row is at its budget);
- otherwise it is kept if ``s ≥ μ + σ · Φ⁻¹(compression_ratio)``, a running threshold: ``μ``, ``σ`` are the mean and
  standard deviation of the scores of the row's earlier tokens (kept or not), ``Φ⁻¹`` the standard normal quantile,
  so that under normal scores the fraction kept is ``1 − compression_ratio`` (the first token of a row is kept).

So after every token each row holds between ``cap − slack`` and ``cap`` tokens (exactly ``cap`` with ``slack = 0``,
which ignores the scores), kept greedily by score in between. Defaults: ``compression_ratio = 0.5``,
``slack = 32``, ``page_size = 64``. The running sums (count, sum, sum of squares per row) live in ``cache.extras``.
At prefill the thresholds come from prefix sums (vectorised); the decisions are a loop over the prompt's positions
(each depends on the tokens kept before), a few small tensor operations per position.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import Press, PressContext, check_ratio, register_press
from attnzoo.kv.ragged import DEFAULT_PAGE_SIZE, RaggedKVCache, check_page_size

STATS = "append_only.stats"

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def inverse_key_norm(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``−‖k‖`` of keys ``(B, Hkv, T, D)``: ``(B, Hkv, T)`` (values unused)."""
    return -keys.float().norm(dim=-1)


@dataclass(frozen=True)
class AppendOnlyPress(Press):
    """Keeps about ``1 − compression_ratio`` of each row's tokens, deciding once per token (see the module).
    ``scorer(keys (B, Hkv, T, D), values (B, Hkv, T, Dv)) → (B, Hkv, T)``: higher is kept first."""

    compression_ratio: float = 0.5
    scorer: Scorer = inverse_key_norm
    slack: int = 32
    page_size: int = DEFAULT_PAGE_SIZE

    def __post_init__(self) -> None:
        check_ratio(self.compression_ratio)
        if not callable(self.scorer):
            raise fail("scorer", "a function (keys, values) -> scores", type(self.scorer).__name__)
        if isinstance(self.slack, bool) or not isinstance(self.slack, int) or self.slack < 0:
            raise fail("slack", "a number of tokens >= 0", repr(self.slack))
        check_page_size(self.page_size)

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        return cls(compression_ratio=1.0 - fraction, **options)

    @property
    def z(self) -> float:
        """``Φ⁻¹(compression_ratio)``: how many standard deviations above the mean the threshold sits."""
        return -math.inf if self.compression_ratio == 0 else NormalDist().inv_cdf(self.compression_ratio)

    def compress(self, cache: KVCache | RaggedKVCache, context: PressContext) -> RaggedKVCache:
        """The prompt's tokens decided one by one in position order; a ragged cache of the kept ones."""
        positions = cache.positions
        occupied = positions >= 0
        order = positions.masked_fill(~occupied, torch.iinfo(positions.dtype).max).long().sort(-1).indices
        pos, valid = positions.gather(-1, order).long(), occupied.gather(-1, order)
        scores = self._score(cache.keys, cache.values).gather(-1, order).double().masked_fill(~valid, 0)
        count = valid.double().cumsum(-1)
        total, squares = scores.cumsum(-1), scores.square().cumsum(-1)
        before = (count - valid.double(), total - scores, squares - scores.square())  # stats of earlier tokens
        above = valid & (scores >= self._threshold(*before))
        cap, low = self._budget(pos + 1)
        kept = torch.zeros_like(valid)
        m = torch.zeros(valid.shape[:2], dtype=torch.long, device=valid.device)
        for j in range(valid.shape[-1]):  # sequential: each decision depends on the tokens kept before
            keep = valid[..., j] & ((m < low[..., j]) | ((m < cap[..., j]) & above[..., j]))
            kept[..., j] = keep
            m += keep
        index = torch.where(kept, order, -1)
        ragged = RaggedKVCache.from_cache(cache, index, self.page_size)
        stats = torch.stack([valid.sum(-1).double(), scores.sum(-1), scores.square().sum(-1)], -1)
        return replace(ragged, extras={**ragged.extras, STATS: stats})

    def step(self, cache: KVCache | RaggedKVCache, context: PressContext) -> RaggedKVCache:
        """Keep or skip the token just appended to each row; earlier entries are not touched."""
        if not isinstance(cache, RaggedKVCache):
            cache = RaggedKVCache.from_cache(cache, page_size=self.page_size)
        stats = cache.extras.get(STATS)
        if stats is None:
            stats = torch.zeros((*cache.counts.shape, 3), dtype=torch.float64, device=cache.counts.device)
        k, v = cache.latest()
        s = self._score(k.unsqueeze(2), v.unsqueeze(2))[..., 0].double()
        cap, low = self._budget(cache.length.view(-1, 1).expand_as(cache.counts))
        m = cache.counts - 1  # the kept tokens before this one
        keep = (m < low) | ((m < cap) & (s >= self._threshold(*stats.unbind(-1))))
        stats = stats + torch.stack([torch.ones_like(s), s, s.square()], -1)
        cache = cache.retract(~keep)
        return replace(cache, extras={**cache.extras, STATS: stats})

    def _score(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        s = self.scorer(keys, values)
        if not isinstance(s, torch.Tensor) or s.shape != keys.shape[:3]:
            raise fail("scorer", f"scores of shape {tuple(keys.shape[:3])}", getattr(s, "shape", type(s).__name__))
        return s

    def _threshold(self, count: torch.Tensor, total: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """``μ + σ z`` from a row's running count, sum and sum of squares (``−inf`` before any token)."""
        if self.z == -math.inf:  # nothing to skip
            return torch.full_like(total, -math.inf)
        mean = total / count.clamp(min=1)
        std = (squares / count.clamp(min=1) - mean.square()).clamp(min=0).sqrt()
        return torch.where(count > 0, mean + std * self.z, -math.inf)

    def _budget(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cap`` and ``low`` for the ``n``-th token of a sequence."""
        cap = n - torch.floor(n * self.compression_ratio).long()
        return cap, (cap - self.slack).clamp(min=0)


register_press(AppendOnlyPress, "K1", "kvpress (NVIDIA) issue tracker: append-only compression for paged caches",
               None, "keeps or skips each token once, on arrival, by a running score threshold within a budget band; "
               "never rewrites earlier entries")
