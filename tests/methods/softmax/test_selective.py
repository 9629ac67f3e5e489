"""S3 selective attention: neutral temperatures are softmax, the position temperature grows with log context,
temperature gradients against the reference, and wrong shapes refused."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import qkv


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_selective_with_neutral_temperatures_is_softmax(backend: str) -> None:
    q, k, v = qkv(2, 4, 2, 7, skv=10)
    neutral = {
        "query_temp": torch.zeros(4, 8, dtype=q.dtype),
        "pos_beta": torch.full((4,), 40.0, dtype=q.dtype),  # exp(−exp(40)) == 0 exactly
        "value_temp": torch.zeros(2, 8, dtype=q.dtype),
    }
    want = az.attention(q, k, v, causal=True)
    torch.testing.assert_close(az.attention(q, k, v, method="selective", causal=True, backend=backend, **neutral), want)
    torch.testing.assert_close(az.attention(q, k, v, method="selective", causal=True, backend=backend), want)


def test_selective_position_temperature_grows_with_log_context() -> None:
    q, k, v = qkv(2, 2, 2, 6)
    beta = torch.tensor([0.0, -1.0], dtype=q.dtype)
    tau = 1 + torch.exp(-torch.exp(beta)).view(1, 2, 1, 1) * torch.log(torch.arange(1.0, 7.0, dtype=q.dtype)).view(
        1, 1, 6, 1
    )
    want = az.attention(q * tau, k, v, causal=True)
    torch.testing.assert_close(az.attention(q, k, v, method="selective", pos_beta=beta, causal=True), want)


def test_selective_temperature_gradients_match_reference() -> None:
    q, k, v = qkv(2, 4, 2, 9)
    g = torch.Generator().manual_seed(5)
    params = {
        "query_temp": 0.3 * torch.randn(4, 8, generator=g, dtype=q.dtype),
        "pos_beta": torch.randn(4, generator=g, dtype=q.dtype),
        "value_temp": 0.3 * torch.randn(2, 8, generator=g, dtype=q.dtype),
    }
    params = {name: t.requires_grad_() for name, t in params.items()}
    grads = []
    for backend in ("sdpa", "reference"):
        out = az.attention(q, k, v, method="selective", causal=True, backend=backend, **params)
        grads.append(torch.autograd.grad(out.square().sum(), list(params.values())))
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref)
        assert fast.abs().sum() > 0


def test_selective_rejects_wrong_shapes() -> None:
    q, k, v = qkv(2, 4, 2, 13)
    with pytest.raises(AttnzooError, match="query_temp"):
        az.attention(q, k, v, method="selective", query_temp=torch.zeros(2, 8, dtype=q.dtype))
    with pytest.raises(AttnzooError, match="value_temp"):
        az.attention(q, k, v, method="selective", value_temp=torch.zeros(4, 8, dtype=q.dtype))
    with pytest.raises(AttnzooError, match="pos_beta"):
        az.attention(q, k, v, method="selective", pos_beta=torch.zeros(4, 1, dtype=q.dtype))
