"""S9 URPE: all-ones coefficients are softmax, the weights are softmax times a Toeplitz matrix, coefficient
gradients, and bad coefficients or cross attention refused."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import qkv, weights_of


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_urpe_with_ones_is_softmax(backend: str) -> None:
    q, k, v = qkv(2, 4, 2, 13)
    ones = torch.ones(4, 2 * 20 - 1, dtype=q.dtype)
    want = az.attention(q, k, v, causal=True)
    got = az.attention(q, k, v, method="urpe", urpe_coeffs=ones, causal=True, backend=backend)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(az.attention(q, k, v, method="urpe", causal=True, backend=backend), want)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_urpe_weights_are_softmax_times_toeplitz(backend: str) -> None:
    q, k, _ = qkv(2, 4, 2, 6)
    max_len = 8
    coeffs = torch.randn(4, 2 * max_len - 1, dtype=q.dtype)
    w = weights_of("urpe", q, k, urpe_coeffs=coeffs, backend=backend)
    p = weights_of("softmax", q, k)
    for i in range(6):
        for j in range(6):
            torch.testing.assert_close(w[:, :, i, j], p[:, :, i, j] * coeffs[:, i - j + max_len - 1])


def test_urpe_coefficient_gradients_match_reference() -> None:
    q, k, v = qkv(2, 4, 2, 9)
    coeffs = torch.randn(4, 2 * 9 - 1, dtype=q.dtype, requires_grad=True)
    grads = []
    for backend in ("torch", "reference"):
        out = az.attention(q, k, v, method="urpe", urpe_coeffs=coeffs, causal=True, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), coeffs)[0])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][:, :8].abs().sum() == 0  # causal: negative distances i − j < 0 (columns < 8) are never used


def test_urpe_rejects_bad_coefficients_and_cross() -> None:
    q, k, v = qkv(2, 4, 2, 9)
    for bad in (torch.ones(3, 17), torch.ones(4, 16), torch.ones(4, 15), torch.ones(4, 17, 1)):
        with pytest.raises(AttnzooError, match="urpe_coeffs"):
            az.attention(q, k, v, method="urpe", urpe_coeffs=bad.to(q.dtype))
    q2, k2, v2 = qkv(2, 4, 2, 4, skv=9)
    with pytest.raises(AttnzooError, match="urpe"):
        az.attention(q2, k2, v2, method="urpe")
