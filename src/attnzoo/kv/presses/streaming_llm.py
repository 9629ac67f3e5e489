"""K2 — StreamingLLM: attention sinks plus a window of the most recent tokens.

Paper: "Efficient Streaming Language Models with Attention Sinks" (Xiao, Tian, Chen, Han, Lewis; arXiv:2309.17453).
Models put a large share of attention on the first tokens whatever they say ("attention sinks"); keeping those
``n_sink`` tokens (default 4, the paper's) and the most recent ones is enough to keep a model stable on streams.

Score as implemented (per sequence, kv head and slot at position ``p``): ``length + n_sink − p`` for ``p < n_sink``
(always kept first, the first sinks first when fewer tokens are kept than ``n_sink``), else ``p`` (the more recent,
the better); the base keeps the top ``tokens − floor(tokens · ratio)`` (or ``budget``). Positions are those of the
original sequence: the paper re-assigns positions inside the cache for RoPE models, which raw tensors cannot do (keys
arrive already rotated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import PressContext, ScorerPress, check_integer, register_press


@dataclass(frozen=True)
class StreamingLLMPress(ScorerPress):
    """Keep the first ``n_sink`` tokens and the most recent ones."""

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("n_sink", self.n_sink, 0)

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        return sink_and_recent(cache, self.n_sink)


def sink_and_recent(cache: KVCache, n_sink: int) -> torch.Tensor:
    """``(B, Hkv, L)``: sinks (positions ``< n_sink``) above every other slot, the others by recency."""
    pos = cache.positions.float()
    sink = cache.length.view(-1, 1, 1).float() + n_sink - pos
    return torch.where((cache.positions >= 0) & (cache.positions < n_sink), sink, pos)


register_press(StreamingLLMPress, "K2", "Efficient Streaming Language Models with Attention Sinks", "2309.17453",
               "first n_sink tokens (attention sinks) + the most recent window")
