"""What the wrapper presses' tests share: small scorers (until the scoring presses land) and a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import attnzoo as az
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses import PressContext, ScorerPress
from attnzoo.kv.presses.base import attention_weights, recent_queries


@dataclass(frozen=True)
class KeyNormScorer(ScorerPress):
    """Keeps the keys of smallest norm (a test scorer that reads keys only)."""

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        return -cache.keys.float().norm(dim=-1)


@dataclass(frozen=True)
class RecentAttentionScorer(ScorerPress):
    """Attention of the last 4 queries, summed over the query heads of each kv head (a scorer that reads queries)."""

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        q, q_pos = recent_queries(cache, context.queries, 4)
        w = attention_weights(cache, q, q_pos, context.scale)  # (B, H, w, L)
        b, h, _, n = w.shape
        return w.sum(2).view(b, cache.keys.shape[1], h // cache.keys.shape[1], n).sum(2)


def prompt(b: int = 2, h: int = 4, hkv: int = 2, s: int = 40, d: int = 8, seed: int = 0,
           dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` whose keys have norms varying by head and token (so scorers disagree across heads)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=dtype) * (0.2 + 3 * torch.rand(b, hkv, s, 1, generator=g,
                                                                                    dtype=dtype))
    v = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    return q, k, v


def token(b: int = 2, h: int = 4, hkv: int = 2, d: int = 8, seed: int = 1,
          dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding step's ``q, k, v``."""
    return prompt(b, h, hkv, 1, d, seed, dtype)


def decode(state: az.DecodeState, steps: int, seed: int = 100) -> tuple[torch.Tensor, az.DecodeState]:
    """``steps`` decoding steps of random tokens; the last output and the state."""
    b, h, hkv, d = state.call.batch, state.call.heads, state.call.kv_heads, state.call.head_dim
    out = None
    for i in range(steps):
        out, state = az.step(state, *token(b, h, hkv, d, seed + i, state.call.dtype))
    assert out is not None
    return out, state
