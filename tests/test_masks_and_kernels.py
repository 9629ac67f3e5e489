"""Shared pieces: mask predicates against explicit loops, the log-sum-exp merge, blockwise GQA helpers."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnzoo as az
from attnzoo import masks
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv, query_blocks, scores_buffer
from attnzoo.kernels.dense import softmax_attention_lse
from attnzoo.kernels.merge import merge


@pytest.mark.parametrize(("sq", "skv"), [(5, 5), (3, 8), (8, 3), (1, 6)])
def test_causal_predicate_against_loops(sq, skv):
    got = masks.dense(masks.causal(sq, skv), 1, 1, sq, skv, "cpu")[0, 0]
    for i, j in itertools.product(range(sq), range(skv)):
        assert bool(got[i, j]) == (j - i <= skv - sq)  # bottom-right: the last query sees every key


def test_combinators_and_rows():
    both = masks.and_masks(masks.causal(6, 6), lambda b, h, q, kv: kv % 2 == 0)
    either = masks.or_masks(masks.causal(6, 6), lambda b, h, q, kv: kv == 5)
    d_both = masks.dense(both, 1, 1, 6, 6, "cpu")[0, 0]
    d_either = masks.dense(either, 1, 1, 6, 6, "cpu")[0, 0]
    for i, j in itertools.product(range(6), range(6)):
        assert bool(d_both[i, j]) == (j <= i and j % 2 == 0)
        assert bool(d_either[i, j]) == (j <= i or j == 5)
    rows = masks.dense_rows(both, 1, 1, 2, 4, 6, "cpu")
    assert torch.equal(rows, masks.dense(both, 1, 1, 6, 6, "cpu")[..., 2:4, :])
    user = torch.rand(1, 1, 6, 6) < 0.5
    combined = masks.combine(True, user, 6, 6, "cpu")
    assert torch.equal(combined, user & torch.tril(torch.ones(6, 6, dtype=torch.bool)))


def _split_merge(q, k, v, cut, mask=None):
    parts = []
    for sl in (slice(0, cut), slice(cut, None)):
        part_mask = None if mask is None else mask[..., sl]
        parts.append(softmax_attention_lse(q, k[:, :, sl], v[:, :, sl], 0.3, part_mask))
    return merge([p[0] for p in parts], [p[1] for p in parts])


def test_merge_of_disjoint_key_sets_is_exact_with_grads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 11, 6, generator=g, dtype=torch.float64)
    out, lse = _split_merge(q, k, v, 4)
    full, full_lse = softmax_attention_lse(q, k, v, 0.3)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)
    (gq,) = torch.autograd.grad(out.sum(), q)
    (gq_full,) = torch.autograd.grad(full.sum(), q)
    torch.testing.assert_close(gq, gq_full)


def test_merge_with_empty_parts_and_empty_rows_gives_zeros_not_nan():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    v = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    mask = torch.ones(1, 1, 3, 6, dtype=torch.bool)
    mask[..., 0, :] = False  # row 0 sees nothing anywhere
    mask[..., 1, :3] = False  # row 1 sees nothing in the first part
    out, lse = _split_merge(q, k, v, 3, mask)
    full, _ = softmax_attention_lse(q, k, v, 0.3, mask)
    torch.testing.assert_close(out, full)
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :])) and torch.isinf(lse[..., 0]).all()
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(gq).all()


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


def test_retained_attend_many_blocks_gradients_match_dense():
    from attnzoo.kernels import retained

    g = torch.Generator().manual_seed(3)
    n = 19
    q = torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    key_bias = torch.randn(1, 2, n, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(1, 2, n, generator=g) < 0.6
    keep[..., 0] = True
    pos, (keys, values, kb) = retained.compact(keep, k, v, key_bias)
    out = retained.attend(q, keys, values, pos, 0.5, key_bias=kb, block=4)
    # dense: softmax over retained keys at positions <= the query's, with the key bias added
    s = 0.5 * q @ k.repeat_interleave(2, 1).transpose(-1, -2) + key_bias.repeat_interleave(2, 1)[:, :, None, :]
    seen = keep.repeat_interleave(2, 1)[:, :, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    want = torch.softmax(s.masked_fill(~seen, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, want)
    for a, b in zip(torch.autograd.grad(out.square().sum(), (q, k, v, key_bias)),
                    torch.autograd.grad(want.square().sum(), (q, k, v, key_bias))):
        torch.testing.assert_close(a, b)


def test_band_chunks_written_into_one_output_match_reference(monkeypatch):
    from attnzoo.kernels import band

    monkeypatch.setattr(band, "CHUNK_BYTES", 1 << 12)  # many chunks
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 200, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(200, 200, generator=g) < 0.8
    ref = az.attention(q, k, v, method="neighborhood", kernel_size=15, mask=mask, backend="reference")
    with torch.no_grad():
        out = az.attention(q, k, v, method="neighborhood", kernel_size=15, mask=mask, backend="torch")
    torch.testing.assert_close(out, ref)
