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


@pytest.mark.parametrize("method", ["score_mod", "urpe"])
def test_many_blocks_return_the_log_sum_exp_with_gradients(monkeypatch, method):
    """``return_lse`` over 5 query blocks (recomputed in the backward pass), a row that sees no key among them."""
    monkeypatch.setattr(blocked_softmax, "block_rows", lambda *args, **kwargs: 8)
    g = torch.Generator().manual_seed(1)
    q, k, v, bias = _inputs(g)
    p = {"softcap": 3.0, "alibi": True} if method == "score_mod" else {
        "urpe_coeffs": 1 + 0.5 * torch.randn(4, 2 * 37 + 3, generator=g, dtype=torch.float64)}
    mask = torch.rand(37, 37, generator=g) < 0.8
    mask[20] = False
    cot_out, cot_lse = torch.randn(2, 4, 37, 6, generator=g, dtype=torch.float64), torch.randn(2, 4, 37, generator=g,
                                                                                               dtype=torch.float64)
    for causal in (False, True):
        results = [az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend=backend,
                                return_lse=True, **p) for backend in ("torch", "reference")]
        (out, lse), (ref, ref_lse) = results
        assert torch.isneginf(lse[:, :, 20]).all() and (out[:, :, 20] == 0).all()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(lse, ref_lse)
        grads = [torch.autograd.grad((o * cot_out).sum() + (lse.nan_to_num(neginf=0.0) * cot_lse).sum(),
                                     (q, k, v, bias)) for o, lse in results]
        for a, b in zip(*grads):
            assert a.isfinite().all()
            torch.testing.assert_close(a, b)
        with torch.no_grad():
            out, lse = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend="torch",
                                    return_lse=True, **p)
        torch.testing.assert_close(lse, ref_lse)
