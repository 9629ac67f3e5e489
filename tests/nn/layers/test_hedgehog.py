"""Hedgehog's layer: the feature maps it owns (the paper's shapes and identity start), their attention distillation on
the layer's own heads, causality and decoding with the distilled maps."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn.layers.hedgehog import distill_layer, distillation_loss
from tests.nn.layers.checks import assert_causal, assert_decodes_like_the_parallel_form


def _layer(causal: bool = True) -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, kv_heads=2, method="hedgehog", causal=causal)


def test_the_layer_owns_the_papers_feature_maps():
    layer = _layer()
    shapes = {name: tuple(p.shape) for name, p in layer.learnable.items()}
    assert shapes == {"q_weight": (4, 6, 6), "q_bias": (4, 6), "k_weight": (2, 6, 6), "k_bias": (2, 6)}
    torch.testing.assert_close(layer.learnable["q_weight"].detach(), torch.eye(6).expand(4, 6, 6))
    assert layer.parts is None  # nothing around the kernel beyond the maps


def test_the_distillation_loss_trains_only_the_maps():
    layer = _layer()
    loss = distillation_loss(layer, torch.randn(2, 10, 24))
    assert loss.dim() == 0 and float(loss.detach()) > 0
    loss.backward()
    for name, p in layer.learnable.items():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    assert all(p.grad is None for p in layer.q_proj.parameters())


@pytest.mark.parametrize("causal", [True, False])
def test_distilling_a_layer_brings_it_closer_to_softmax_attention(causal):
    layer = _layer(causal)
    x = 2 * torch.randn(4, 12, 24)
    softmax = az.nn.Attention(24, 4, kv_heads=2, method="softmax", causal=causal)
    softmax.load_state_dict(layer.state_dict(), strict=False)
    with torch.no_grad():
        before = (layer(x) - softmax(x)).norm()
    history = distill_layer(layer, x, steps=60, lr=5e-2)
    assert history[-1] < 0.5 * history[0]
    with torch.no_grad():
        assert (layer(x) - softmax(x)).norm() < before
        assert float(distillation_loss(layer, x)) == pytest.approx(history[-1], rel=1e-4)


def test_output_is_causal_and_decoding_with_the_distilled_maps_equals_the_parallel_form():
    layer = _layer().double()
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    distill_layer(layer, x, steps=5)
    assert_causal(layer.float(), 24)
    assert_decodes_like_the_parallel_form(layer.double(), x)


def test_only_hedgehog_layers_that_own_their_maps_distill():
    with pytest.raises(AttnzooError, match="^layer:"):
        distillation_loss(az.nn.Attention(24, 4, method="softmax"), torch.randn(1, 4, 24))
    fixed = az.nn.Attention(24, 4, method="hedgehog", q_weight=torch.eye(6).expand(4, 6, 6).clone())
    with pytest.raises(AttnzooError, match="^layer:"):
        distill_layer(fixed, torch.randn(1, 4, 24))
