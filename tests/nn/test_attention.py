"""The nn layer: it trains, cross attention and its argument errors, and it owns (and trains) the learnable
parameters of the methods that have them."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import fit_losses


@pytest.mark.parametrize("method", ["softmax", "sigmoid"])
def test_layer_trains(method):
    torch.manual_seed(0)
    layer = az.nn.Attention(16, 4, kv_heads=2, method=method, causal=True)
    x = torch.randn(4, 12, 16)
    losses = fit_losses(layer, x, torch.roll(x, 1, dims=1), 40)
    assert losses[-1] < 0.8 * losses[0]


def test_layer_cross_attention_and_errors():
    layer = az.nn.Attention(16, 4, context_dim=10)
    assert layer(torch.randn(2, 5, 16), torch.randn(2, 7, 10)).shape == (2, 5, 16)
    with pytest.raises(AttnzooError, match="^kv_heads:"):
        az.nn.Attention(16, 4, kv_heads=3)
    with pytest.raises(AttnzooError, match="^method:"):
        az.nn.Attention(16, 4, method="nope")
    with pytest.raises(AttnzooError, match="^sigmoid_bias:"):
        az.nn.Attention(16, 4, method="sigmoid", sigmoid_bias="big")
    with pytest.raises(AttnzooError, match="^tempo:"):
        az.nn.Attention(16, 4, method="sigmoid", tempo=1.0)


def test_learnable_parameters_are_owned_by_the_layer():
    for m in az.methods().values():
        learnable = [p.name for p in m.params if p.init is not None]
        if not learnable:
            continue
        layer = az.nn.Attention(16, 4, kv_heads=2, method=m.name, causal="self/causal" in m.patterns)
        assert set(learnable) <= set(layer.learnable.keys())


@pytest.mark.parametrize(
    ("method", "params", "learnable"),
    [
        ("selective", {}, {"query_temp": (8, 8), "pos_beta": (8,), "value_temp": (2, 8)}),
        ("urpe", {"max_len": 32}, {"urpe_coeffs": (8, 63)}),
    ],
)
def test_layer_owns_and_trains_the_learnable_parts(
    method: str, params: dict[str, object], learnable: dict[str, tuple[int, ...]]
) -> None:
    torch.manual_seed(0)
    layer = az.nn.Attention(64, 8, kv_heads=2, method=method, causal=True, **params)
    plain = az.nn.Attention(64, 8, kv_heads=2, method="softmax", causal=True)
    plain.load_state_dict(layer.state_dict(), strict=False)
    assert {n: tuple(p.shape) for n, p in layer.learnable.items()} == learnable
    x = torch.randn(2, 20, 64)
    out = layer(x)
    if method == "urpe":  # initialised to ones: starts as softmax attention
        torch.testing.assert_close(out, plain(x))
    out.square().sum().backward()
    for name, p in layer.learnable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
