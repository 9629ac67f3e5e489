"""DecodingPress — compression during decoding: the cache stays bounded however long the generation runs.

A prefill press compresses once, after the prompt; a long generation then grows the cache again by one token per
step. This wrapper runs a scoring press *during* decoding (kvpress's ``DecodingPress``, which we follow for the
trigger; unlike it, the count of tokens per row and the recent queries live in the cache, so one press object serves
any number of sequences and layers):

- the target per row is ``target_size`` tokens, or ``tokens seen − ⌊tokens seen · compression_ratio⌋`` (a fraction of
  the whole sequence so far, prompt included; rows of a ragged batch each use their own sequence's length);
- after a step, when some row of a sequence holds ``interval`` tokens more than its target, every row of that
  sequence is compressed back to (at most) its target with the wrapped press's scores
  (:class:`~attnzoo.kv.presses.base.ScorerPress` top-k per row, or
  :class:`~attnzoo.kv.presses.adakv.AdaKVPress`'s budget across heads). Sequences below their trigger are left as
  they are (their rows keep their slots; empty slots fill the gap);
- the wrapped press's :attr:`PressContext.queries` are the last ``query_window`` queries of each sequence, kept by
  this press in ``cache.extras`` (the prompt's last ones at prefill, then each step's): scorers that read queries
  (SnapKV-like) see a recent window, as at prefill.

So between compressions a row holds at most ``target + interval`` tokens (and ``interval`` steps pass between two
compressions of a fixed target). At prefill the press only records the queries: to compress the prompt too, compose
(:class:`~attnzoo.kv.presses.composed.ComposedPress`) a prefill press before it. Defaults: ``interval = 64``,
``query_window = 32``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.adakv import AdaKVPress
from attnzoo.kv.presses.base import (
    Press,
    PressContext,
    ScorerPress,
    check_positive,
    check_ratio,
    recent_queries,
    register_press,
    top_slots,
)
from attnzoo.kv.ragged import RaggedKVCache

QUERIES = "decoding_press.queries"


@dataclass(frozen=True)
class DecodingPress(Press):
    """``press`` (a ScorerPress or an AdaKVPress; its own ratio is not used) run during decoding to keep each row at
    ``target_size`` tokens, or at ``1 − compression_ratio`` of the tokens seen; see the module."""

    press: ScorerPress | AdaKVPress
    target_size: int | None = None
    compression_ratio: float | None = None
    interval: int = 64
    query_window: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.press, (ScorerPress, AdaKVPress)):
            raise fail("press", "a ScorerPress or an AdaKVPress", type(self.press).__name__)
        if (self.target_size is None) == (self.compression_ratio is None):
            raise fail("target_size", "exactly one of target_size and compression_ratio",
                       f"target_size={self.target_size!r}, compression_ratio={self.compression_ratio!r}")
        if self.target_size is not None:
            check_positive("target_size", self.target_size)
        if self.compression_ratio is not None:
            check_ratio(self.compression_ratio)
        check_positive("interval", self.interval)
        check_positive("query_window", self.query_window)

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        """Keep ``fraction`` of the tokens seen: ``compression_ratio = 1 − fraction``; ``options["press"]`` wrapped."""
        return cls(compression_ratio=1.0 - fraction, **options)

    def compress(self, cache: KVCache | RaggedKVCache, context: PressContext) -> KVCache | RaggedKVCache:
        """At prefill: record the prompt's last ``query_window`` queries (the cache is unchanged)."""
        queries, _ = recent_queries(cache, context.queries, self.query_window)  # type: ignore[arg-type]
        return _with_extra(cache, QUERIES, queries)

    def step(self, cache: KVCache | RaggedKVCache, context: PressContext) -> KVCache | RaggedKVCache:
        queries = cache.extras.get(QUERIES)
        queries = context.queries if queries is None else torch.cat([queries, context.queries], 2)
        cache = _with_extra(cache, QUERIES, queries[:, :, -self.query_window :])
        target = self.targets(cache)
        held = cache.token_counts()
        due = (held >= target.unsqueeze(1) + self.interval).any(1)  # (B,)
        if not bool(due.any()):
            return cache
        keep = torch.where(due.unsqueeze(1), held.clamp(max=target.unsqueeze(1)), held)
        window = PressContext(cache.extras[QUERIES], context.scale, context.method, context.layer, "step")
        if isinstance(self.press, AdaKVPress):
            return self.press.compress_to(cache, window, keep)
        return cache.keep(top_slots(self.press.score(cache, window), cache, keep))  # type: ignore[arg-type]

    def targets(self, cache: KVCache | RaggedKVCache) -> torch.Tensor:
        """``(B,)``: the tokens each row of a sequence is compressed back to."""
        if self.target_size is not None:
            return torch.full_like(cache.length, self.target_size)
        assert self.compression_ratio is not None
        return cache.length - torch.floor(cache.length * self.compression_ratio).long()



def _with_extra(cache: Any, name: str, value: torch.Tensor) -> Any:
    return replace(cache, extras={**cache.extras, name: value})


register_press(DecodingPress, "K1", "kvpress (NVIDIA): DecodingPress", None,
               "wraps a scoring press: compresses during decoding back to a target size or a ratio of the tokens seen",
               needs=("press", "queries"))
