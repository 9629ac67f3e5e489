"""K2 — SnapKV: the attention of an observation window of recent queries, pooled.

Paper: "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al.; arXiv:2404.14469). The last
``window_size`` queries of the prompt (default 64, kvpress's; the paper's code uses 32) attend much like the queries
that follow them, so their attention picks the slots to keep.

Score as implemented, per sequence and kv head (as the authors' code and kvpress's ``snapkv_press.py``):

1. ``a_j = mean_{t in window, i in group} softmax_t(q_t,i · k_j · scale)``: the window's attention averaged over its
   queries and over the query heads sharing the kv head (SnapKV issue #22: one choice per kv head);
2. ``s = pool(a)``: 1-D pooling of width ``kernel_size`` (default 5) over the slots, stride 1, zero padding, so that a
   kept token brings its neighbours (``pooling="max"``, the authors' default, or ``"avg"``, kvpress's);
3. the window's own tokens rank above every other (always kept; if fewer tokens are kept than the window holds, the
   most recent win).

Ragged batches: each sequence's window is its own last ``window_size`` tokens. Pooling runs over slot order, which is
position order (compact caches keep slots sorted by position), so after an earlier press neighbours are neighbouring
kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import PressContext, ScorerPress, check_positive, recent_queries, register_press
from attnzoo.kv.presses.observe import mean_attention, protect


@dataclass(frozen=True)
class SnapKVPress(ScorerPress):
    """Keep what the last ``window_size`` queries attend to (pooled over ``kernel_size`` slots), and the window."""

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("window_size", self.window_size)
        check_positive("kernel_size", self.kernel_size)
        if self.pooling not in ("max", "avg"):
            raise fail("pooling", "'max' or 'avg'", repr(self.pooling))

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        pooled = pool(window_attention(cache, context, self.window_size), self.kernel_size, self.pooling)
        return protect(pooled, cache, in_window(cache, self.window_size))


def window_attention(cache: KVCache, context: PressContext, window: int) -> torch.Tensor:
    """``(B, Hkv, L)``: the attention of each sequence's last ``window`` queries over the slots, averaged over the
    window's queries and over each GQA group."""
    return mean_attention(cache, *recent_queries(cache, context.queries, window), context.scale)


def in_window(cache: KVCache, window: int) -> torch.Tensor:
    """``(B, Hkv, L)``: the occupied slots among each sequence's last ``window`` positions."""
    return cache.occupied() & (cache.positions >= cache.length.view(-1, 1, 1) - window)


def pool(scores: torch.Tensor, kernel: int, how: str) -> torch.Tensor:
    """1-D pooling of ``scores (B, Hkv, L)`` along the slots (stride 1, zero padding, same length)."""
    b, h, n = scores.shape
    flat = scores.reshape(b * h, 1, n)
    fn = F.max_pool1d if how == "max" else F.avg_pool1d
    return fn(flat, kernel_size=kernel, stride=1, padding=kernel // 2)[..., :n].reshape(b, h, n)


register_press(SnapKVPress, "K2", "SnapKV: LLM Knows What You are Looking for Before Generation", "2404.14469",
               "observation-window attention, pooled; the window kept", needs=("queries",))
