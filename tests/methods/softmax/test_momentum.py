"""S4 momentum attention: γ = 0 is softmax, the shear with its first-token boundary, cross attention refused."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import qkv


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_momentum_gamma_zero_is_softmax(backend: str) -> None:
    q, k, v = qkv(2, 4, 2, 13)
    torch.testing.assert_close(
        az.attention(q, k, v, method="momentum", gamma=0.0, causal=True, backend=backend),
        az.attention(q, k, v, causal=True),
    )


def test_momentum_shear_and_first_token_boundary() -> None:
    q, k, v = qkv(2, 4, 4, 13)
    gamma = 0.7
    # x̂_t = x_t + γ(x_t − x_{t−1}) with x_{−1} = x_0: the first token is left unchanged.
    sheared = [torch.cat((t[:, :, :1], t[:, :, 1:] + gamma * (t[:, :, 1:] - t[:, :, :-1])), dim=2) for t in (q, k)]
    torch.testing.assert_close(
        az.attention(q, k, v, method="momentum", gamma=gamma), az.attention(sheared[0], sheared[1], v)
    )


def test_momentum_refuses_cross_attention() -> None:
    q, k, v = qkv(2, 4, 2, 5, skv=9)
    with pytest.raises(AttnzooError, match="momentum"):
        az.attention(q, k, v, method="momentum")
