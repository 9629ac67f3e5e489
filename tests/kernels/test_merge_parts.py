"""The public merge ``az.merge(parts)``: attention over two disjoint key halves merges to attention over all keys
(forward and backward, fp64), bf16 with logits in the thousands stays finite, empty parts and rows give zeros with
finite gradients, bad ``parts`` get the library's error."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.kernels.dense import softmax_attention_lse
from tests.helpers import assert_same_out_and_lse


def _halves(q, k, v, cut, scale=0.3):
    return [softmax_attention_lse(q, k[:, :, sl], v[:, :, sl], scale) for sl in (slice(0, cut), slice(cut, None))]


def test_two_key_halves_merge_to_full_attention_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert_same_out_and_lse(az.merge(_halves(q, k, v, 4)), softmax_attention_lse(q, k, v, 0.3), (q, k, v))


def test_merge_is_differentiable_in_every_out_and_lse():
    g = torch.Generator().manual_seed(1)
    parts = [(torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *x: az.merge([(x[0], x[1]), (x[2], x[3]), (x[4], x[5])]),
                                    [t for p in parts for t in p])


def test_bf16_with_logits_in_the_thousands_stays_finite_and_close():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 12, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 12, 16, generator=g, dtype=torch.float64)
    parts = _halves(q, k, v, 5, scale=500.0)  # logits of order 1e3
    assert parts[0][1].abs().max() > 1000
    out, lse = az.merge([(o.bfloat16(), s.bfloat16()) for o, s in parts])
    full, full_lse = softmax_attention_lse(q, k, v, 500.0)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), full, atol=0.05, rtol=0.05)
    torch.testing.assert_close(lse.double(), full_lse, atol=16.0, rtol=0.01)  # bf16 lse of ~1e3 has spacing 4-8


def test_empty_parts_contribute_nothing_and_all_empty_rows_give_zero_without_nan():
    g = torch.Generator().manual_seed(3)
    out_a = torch.randn(1, 1, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lse_a = torch.tensor([[[0.5, float("-inf"), float("-inf")]]], dtype=torch.float64, requires_grad=True)
    out_b = torch.randn(1, 1, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lse_b = torch.tensor([[[float("-inf"), 1.0, float("-inf")]]], dtype=torch.float64, requires_grad=True)
    out, lse = az.merge([(out_a, lse_a), (out_b, lse_b)])
    torch.testing.assert_close(out[0, 0, 0], out_a[0, 0, 0])
    torch.testing.assert_close(out[0, 0, 1], out_b[0, 0, 1])
    assert torch.equal(out[0, 0, 2], torch.zeros(4, dtype=torch.float64)) and lse[0, 0, 2] == float("-inf")
    grads = torch.autograd.grad(out.sum() + lse[..., :2].sum(), (out_a, lse_a, out_b, lse_b))
    assert all(torch.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("parts", [[], [(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 3))],
                                   [(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2)),
                                    (torch.zeros(1, 1, 4, 3), torch.zeros(1, 1, 4))]])
def test_bad_parts_get_the_library_error_naming_parts(parts):
    with pytest.raises(az.AttnzooError, match="parts"):
        az.merge(parts)
