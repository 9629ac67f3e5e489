"""Many query blocks in the blocked softmax kernel: outputs and every gradient (hook tensors included) match the
reference, with and without autograd."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.kernels import blocked_softmax


def _inputs(g: torch.Generator) -> tuple[torch.Tensor, ...]:
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 37, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 37, 37, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v, bias


@pytest.mark.parametrize(
    "method, params",
    [
        ("score_mod", lambda g: {"alibi": torch.rand(4, generator=g, dtype=torch.float64).requires_grad_(),
                                 "softcap": 3.0}),
        ("urpe", lambda g: {"urpe_coeffs": (1 + 0.5 * torch.randn(4, 2 * 37 + 3, generator=g, dtype=torch.float64))
                            .requires_grad_()}),
        ("topk", lambda g: {"top_k": 5}),
    ],
)
def test_many_blocks_match_reference_with_gradients(monkeypatch, method, params):
    monkeypatch.setattr(blocked_softmax, "block_rows", lambda *args, **kwargs: 8)  # 5 blocks, the last one short
    g = torch.Generator().manual_seed(0)
    q, k, v, bias = _inputs(g)
    p = params(g)
    mask = torch.rand(37, 37, generator=g) < 0.8
    learnable = [t for t in p.values() if isinstance(t, torch.Tensor)]
    for causal in (False, True):
        out = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend="torch", **p)
        ref = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend="reference", **p)
        torch.testing.assert_close(out, ref)
        wrt = (q, k, v, bias, *learnable)
        got = torch.autograd.grad(out.square().sum(), wrt)
        want = torch.autograd.grad(ref.square().sum(), wrt)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        with torch.no_grad():
            torch.testing.assert_close(
                az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend="torch", **p), ref
            )
