"""AdaKV — per-head budgets chosen across heads, with a floor per head, in a cache that really shrinks.

Paper: "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference" (Feng et al.,
arXiv:2407.11550). kvpress's ``AdaKVPress`` (read for the safeguard rule) only hides the dropped keys behind a mask;
here the result is a :class:`~attnzoo.kv.ragged.RaggedKVCache` holding the kept tokens only.

Rule as implemented, for each sequence ``b`` with the wrapped press's scores ``s[b, h, i]``:

- each row keeps ``n_h = tokens_h − ⌊tokens_h · ratio⌋`` tokens under a uniform budget (or ``min(tokens_h, budget)``),
  the same count the wrapped press would keep; the sequence's total budget is ``K_b = Σ_h n_h``;
- floor: each head first keeps its ``⌊alpha_safeguard · n_h⌋`` best-scored tokens (kvpress's safeguard);
- the rest of ``K_b`` goes to the best-scored remaining tokens of all heads of the sequence together (one top-k over
  the heads' scores, so a head with peaked scores gets more, one with flat scores fewer).

So every sequence keeps exactly ``K_b`` tokens, every head at least its floor, and no head more than it holds.
Defaults: ``alpha_safeguard = 0.2`` (kvpress's), ``page_size = 64`` (the ragged cache's pages; a row wastes at most
``page_size − 1`` slots). Scores are compared across heads as the wrapped press gives them (AdaKV's paper uses
attention weights, which share a scale across heads; kvpress does the same with any scorer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import Press, PressContext, ScorerPress, kept_tokens, register_press
from attnzoo.kv.ragged import DEFAULT_PAGE_SIZE, RaggedKVCache, check_page_size


@dataclass(frozen=True)
class AdaKVPress(Press):
    """Per-head budgets for any :class:`ScorerPress` ``press`` (its ``compression_ratio`` or ``budget`` sets the total),
    with a floor of ``alpha_safeguard`` × each head's uniform share; returns a :class:`RaggedKVCache`."""

    press: ScorerPress
    alpha_safeguard: float = 0.2
    page_size: int = DEFAULT_PAGE_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.press, ScorerPress):
            raise fail("press", "a ScorerPress (a press that scores slots)", type(self.press).__name__)
        alpha = self.alpha_safeguard
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise fail("alpha_safeguard", "a fraction in [0, 1] (of each head's uniform share)", repr(alpha))
        check_page_size(self.page_size)

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        """``options["press"]`` (a ScorerPress) set to keep ``fraction`` of the tokens; other options as given."""
        inner = options.pop("press", None)
        if not isinstance(inner, ScorerPress):
            raise fail("press", "a ScorerPress to wrap", type(inner).__name__)
        return cls(replace(inner, compression_ratio=1.0 - fraction, budget=None), **options)

    def compress(self, cache: KVCache | RaggedKVCache, context: PressContext) -> RaggedKVCache:
        keep = kept_tokens(cache, self.press.compression_ratio, self.press.budget)  # type: ignore[arg-type]
        return self.compress_to(cache, context, keep)

    def compress_to(
        self, cache: KVCache | RaggedKVCache, context: PressContext, keep: torch.Tensor,
    ) -> RaggedKVCache:
        """The cache with ``Σ_h keep[b, h]`` tokens per sequence, spread over its heads by score (see the module)."""
        scores = self.press.score(cache, context)  # type: ignore[arg-type]
        index = adaptive_slots(scores, cache.occupied(), keep, self.alpha_safeguard)
        return RaggedKVCache.from_cache(cache, index, self.page_size)


def adaptive_slots(
    scores: torch.Tensor, occupied: torch.Tensor, keep: torch.Tensor, alpha: float,
) -> torch.Tensor:
    """``(B, Hkv, L)`` slot indices of each row's kept tokens in slot order, then ``-1``.

    ``scores (B, Hkv, L)``; ``occupied (B, Hkv, L)``: slots that hold a token; ``keep (B, Hkv)``: each row's uniform
    share. Each row keeps its ``⌊alpha · keep⌋`` best slots, then the sequence's remaining ``Σ_h keep − Σ_h floor``
    go to the best remaining slots of all its rows.
    """
    if scores.shape != occupied.shape:
        raise fail("score", f"a (batch, kv_heads, slots) tensor of shape {tuple(occupied.shape)}", tuple(scores.shape))
    b, hkv, n = scores.shape
    big = torch.finfo(torch.float32).max
    s = scores.float().nan_to_num(nan=-big, posinf=big, neginf=-big).clamp(-big, big)
    floor = torch.floor(keep * alpha).long()
    rank = torch.argsort(torch.argsort(s.masked_fill(~occupied, -math.inf), dim=-1, descending=True, stable=True),
                         dim=-1)
    s = s.masked_fill(rank < floor.unsqueeze(-1), math.inf).masked_fill(~occupied, -math.inf)
    total = keep.sum(-1)  # (B,)
    width = int(total.max()) if total.numel() else 0
    best = torch.topk(s.view(b, hkv * n), width, dim=-1, sorted=True).indices
    chosen = torch.zeros(b, hkv * n, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, best, torch.arange(width, device=scores.device) < total.unsqueeze(1))
    chosen = chosen.view(b, hkv, n)
    slot = torch.arange(n, device=scores.device).expand(b, hkv, n)
    ordered = torch.where(chosen, slot, n).sort(dim=-1).values[:, :, : int(chosen.sum(-1).max()) if n else 0]
    return torch.where(ordered < n, ordered, -1)


register_press(AdaKVPress, "K1", "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient "
               "LLM Inference", "2407.11550", "wraps a scoring press: per-head budgets by a top-k across heads with a "
               "floor per head; a ragged cache of the kept tokens only", needs=("press",))
