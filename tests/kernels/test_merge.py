"""The log-sum-exp merge: attention over disjoint key sets merges exactly (gradients too), empty parts and rows give
zeros, not NaN."""

from __future__ import annotations

import torch

from attnzoo.kernels.dense import softmax_attention_lse
from attnzoo.kernels.merge import merge


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
