"""Hand-built attention patterns for the press tests: one-hot keys, so that a query made of some keys' directions
attends exactly those slots, and the cache and context a press sees after ``attnzoo.prefill``."""

from __future__ import annotations

import torch

from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import PressContext

SHARP = 40.0  # a query of SHARP · e_j puts all but e^-40 of its weight on slot j


def focused(
    seq: int, targets: dict[int, list[int]], heads: int = 1, kv_heads: int = 1, batch: int = 1, dim: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q (batch, heads, seq, D)``, ``k``, ``v``: key ``j`` is the unit vector ``e_j``; query row ``i`` is ``SHARP ·
    Σ e_t`` over ``targets[i]`` (it attends those slots, evenly), or 0 (uniform over what it sees) for other rows.
    Values are random. Float64."""
    d = dim or seq
    k = torch.eye(seq, d, dtype=torch.float64).expand(batch, kv_heads, seq, d).clone()
    q = torch.zeros(batch, heads, seq, d, dtype=torch.float64)
    for row, slots in targets.items():
        q[:, :, row, slots] = SHARP
    v = torch.randn(batch, kv_heads, seq, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return q, k, v


def prompt(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None, scale: float = 1.0,
) -> tuple[KVCache, PressContext]:
    """The cache and press context ``attnzoo.prefill`` hands a press for this prompt."""
    return KVCache.from_prompt(k, v, lengths), PressContext(q, scale, "softmax")


def kept_positions(cache: KVCache, b: int = 0, h: int = 0) -> list[int]:
    """The sorted positions row ``(b, h)`` of a cache holds."""
    return sorted(p for p in cache.positions[b, h].tolist() if p >= 0)
