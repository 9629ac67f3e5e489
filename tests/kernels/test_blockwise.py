"""Blockwise GQA helpers: grouped logits and values equal repeated heads; query blocks (recomputed under autograd,
one shared scores buffer without) are exact."""

from __future__ import annotations

import torch

from attnzoo.kernels.blockwise import grouped_logits, grouped_pv, query_blocks, scores_buffer


def test_grouped_helpers_equal_repeated_heads_and_blocks_checkpoint():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64)
    s = grouped_logits(q, k, 0.5)
    torch.testing.assert_close(s, 0.5 * q @ k.repeat_interleave(2, 1).transpose(-1, -2))
    torch.testing.assert_close(grouped_pv(s.softmax(-1), v), s.softmax(-1) @ v.repeat_interleave(2, 1))
    out = query_blocks(lambda rows, start: grouped_pv(grouped_logits(rows, k, 0.5).softmax(-1), v), q, 3, 5)
    (gq,) = torch.autograd.grad(out.sum(), q)
    want = grouped_pv(s.softmax(-1), v)
    (gq_want,) = torch.autograd.grad(want.sum(), q)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gq, gq_want)
    with torch.no_grad():  # one shared scores buffer and one preallocated output
        buffer = scores_buffer(q, 3, 7)
        assert buffer is not None and buffer.numel() == 2 * 6 * 3 * 7
        def block(rows: torch.Tensor, start: int) -> torch.Tensor:
            return grouped_pv(grouped_logits(rows, k, 0.5, buffer).softmax(-1), v)

        fast = query_blocks(block, q, 3, 5)
    torch.testing.assert_close(fast, want)
