"""NAtS-L's layer: Gated DeltaNet's parts with the kernel's learnable router, causality, training, and decoding with
the layer's gates and router."""

from __future__ import annotations

import torch

import attnzoo as az
from attnzoo.nn.layers.gated_delta import GatedDeltaNetParts
from tests.nn.layers.checks import assert_causal, assert_decodes_like_the_parallel_form, assert_every_part_trains


def _layer() -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, kv_heads=2, method="nats_hybrid", causal=True)


def test_the_layer_has_gated_deltanets_parts_and_the_router():
    layer = _layer()
    assert isinstance(layer.parts, GatedDeltaNetParts)
    assert layer.parts.beta_proj.weight.shape == (4, 24) and layer.parts.q_conv.conv.weight.shape == (24, 1, 4)
    assert {n: tuple(p.shape) for n, p in layer.learnable.items()} == {"scorer_weight": (2, 6), "scorer_bias": (2,)}


def test_output_is_causal():
    assert_causal(_layer(), 24)


def test_decoding_with_the_layers_gates_and_router_equals_the_parallel_form():
    layer = _layer().double()
    router = {n: p.detach() for n, p in layer.learnable.items()}
    assert_decodes_like_the_parallel_form(layer, torch.randn(2, 11, 24, dtype=torch.float64), **router)


def test_every_part_and_the_router_train():
    assert_every_part_trains(_layer(), 24)
