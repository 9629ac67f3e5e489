"""L6 RALA: a flat key reweighting reduces it to elu+1 linear attention; the output gate multiplies; no causal form."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError

F64 = torch.float64


def _qkv():
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 9, 8, generator=gen, dtype=F64),
        torch.randn(2, 2, 23, 8, generator=gen, dtype=F64),
        torch.randn(2, 2, 23, 5, generator=gen, dtype=F64),
    )


def test_flat_reweighting_is_linear_attention() -> None:
    q, k, v = _qkv()
    # scale → 0 makes softmax(scale · q̄·φ(k)) uniform, so k̃ = φ(k): plain normalised elu+1 linear attention
    rala = az.attention(q, k, v, method="rala", scale=1e-12)
    linear = az.attention(q, k, v, method="linear", feature_map="elu1")
    torch.testing.assert_close(rala, linear)
    # at the default scale the reweighting matters
    assert not torch.allclose(az.attention(q, k, v, method="rala"), linear, atol=1e-3)


def test_output_gate_multiplies_and_causal_is_refused() -> None:
    q, k, v = _qkv()
    gate = torch.rand(1, 4, 9, 1, dtype=F64)
    torch.testing.assert_close(
        az.attention(q, k, v, method="rala", output_gate=gate), az.attention(q, k, v, method="rala") * gate
    )
    with pytest.raises(AttnzooError, match="output_gate"):
        az.attention(q, k, v, method="rala", output_gate=torch.ones(3, 9, 5, dtype=F64))
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k[:, :, :9], v[:, :, :9], method="rala", causal=True)
