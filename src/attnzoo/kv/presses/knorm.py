"""K2 — Knorm: keep the keys of lowest L2 norm.

Paper: "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (Devoto, Zhao, Scardapane, Minervini;
arXiv:2406.11430). Keys of low norm receive high attention, so the norm of a key predicts its importance without
any query: score ``−‖k‖₂`` per slot (per kv head), the top ``tokens − floor(tokens · ratio)`` (or ``budget``) kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import PressContext, ScorerPress, register_press


@dataclass(frozen=True)
class KnormPress(ScorerPress):
    """Keep the keys with the lowest L2 norm (reads keys only)."""

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        return -cache.keys.float().norm(dim=-1)


register_press(KnormPress, "K2", "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
               "2406.11430", "keep the keys of lowest L2 norm")
