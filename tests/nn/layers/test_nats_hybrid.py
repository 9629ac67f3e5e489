"""NAtS-L's layer: Gated DeltaNet's parts with the kernel's learnable router (causality, decoding with the layer's
gates and router, and training: ``test_registered_layers.py``)."""

from __future__ import annotations

import torch

import attnzoo as az
from attnzoo.nn.layers.gated_delta import GatedDeltaNetParts


def _layer() -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, kv_heads=2, method="nats_hybrid", causal=True)


def test_the_layer_has_gated_deltanets_parts_and_the_router():
    layer = _layer()
    assert isinstance(layer.parts, GatedDeltaNetParts)
    assert layer.parts.beta_proj.weight.shape == (4, 24) and layer.parts.q_conv.conv.weight.shape == (24, 1, 4)
    assert {n: tuple(p.shape) for n, p in layer.learnable.items()} == {"scorer_weight": (2, 6), "scorer_bias": (2,)}
