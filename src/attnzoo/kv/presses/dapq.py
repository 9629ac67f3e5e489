"""K6 — DapQ: importance read by pseudo queries placed at the positions the decoded tokens will take.

Paper: "Where Matters More Than What: Decoding-aligned KV Cache Compression via Position-aware Pseudo Queries" (Tian,
Su, Li, Zhang; arXiv:2603.11564). An observation window of prompt queries (SnapKV) stands for the decoding queries
badly because it sits at the prompt's positions; the paper finds that a query's *position* shapes its attention more
than its content, and scores the cache with pseudo queries at the future decoding positions.

As implemented, per sequence and kv head:

- content: the last ``window_size`` queries of the prompt (default 32): the closest content available from raw
  tensors (the paper builds the pseudo queries inside the model, where the content of the tokens to come can be
  simulated; raw ``q, k, v`` carry no token embeddings);
- position: each is moved ``lookahead`` positions ahead (default ``window_size``: the window ``[n − w, n)`` becomes
  ``[n, n + w)``, the first ``w`` decoding positions of a prompt of ``n`` tokens). With ``rope_base`` set (the
  queries carry rotary embeddings, half-split layout as in Llama/NeoX, frequencies ``base^(−2i/d)``), a query rotated
  for position ``p`` is turned into the query for ``p + Δ`` exactly by one more rotation by ``Δ`` (rotations compose),
  so no pre-rotation query is needed. Without ``rope_base`` the queries carry no position, and moving them changes
  only what they may see (everything in the prompt);
- score ``s_j = mean_{pseudo t, i in group} softmax(q̃_t,i · k · scale)_j``; the top ``tokens − floor(tokens · ratio)``
  (or ``budget``) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnzoo.errors import fail
from attnzoo.kernels.rotary import rotary
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import (
    PressContext,
    ScorerPress,
    check_number,
    check_positive,
    recent_queries,
    register_press,
)
from attnzoo.kv.presses.observe import mean_attention


@dataclass(frozen=True)
class DapQPress(ScorerPress):
    """Score slots by the attention of pseudo queries at the first decoding positions."""

    window_size: int = 32
    lookahead: int | None = None
    rope_base: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("window_size", self.window_size)
        if self.lookahead is not None:
            check_positive("lookahead", self.lookahead)
        if self.rope_base is not None:
            check_number("rope_base", self.rope_base, lambda x: x > 1, "a RoPE base > 1 (e.g. 10000.0) or None")

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        q, q_pos = recent_queries(cache, context.queries, self.window_size)
        shift = self.window_size if self.lookahead is None else self.lookahead
        if self.rope_base is not None:
            q = rotate(q, shift, self.rope_base)
        pseudo_pos = torch.where(q_pos >= 0, q_pos + shift, -1)
        return mean_attention(cache, q, pseudo_pos, context.scale)


def rotate(q: torch.Tensor, shift: int, base: float) -> torch.Tensor:
    """``q (..., D)`` rotated by ``shift`` positions of RoPE (:func:`attnzoo.kernels.rotary.rotary`)."""
    if q.shape[-1] % 2:
        raise fail("rope_base", f"queries of even head_dim for RoPE (got {q.shape[-1]})", base)
    return rotary(q, shift, base)


register_press(DapQPress, "K6", "Where Matters More Than What: Decoding-aligned KV Cache Compression via "
               "Position-aware Pseudo Queries", "2603.11564", "attention of pseudo queries at the future decoding "
               "positions", needs=("queries",))
