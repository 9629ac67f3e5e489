"""Causal attention over a retained subset of the keys: many query blocks, gradients against dense attention."""

from __future__ import annotations

import torch

from attnzoo.kernels import retained


def test_retained_attend_many_blocks_gradients_match_dense():
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
