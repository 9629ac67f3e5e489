"""NaLaFormer's layer: LayerNorm over the heads' outputs times a SiLU gate (causality, decoding and training:
``test_registered_layers.py``)."""

from __future__ import annotations

import torch

import attnzoo as az
from attnzoo.nn.layers.nala import NalaParts


def _layer() -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, kv_heads=2, method="nala", causal=True)


def test_the_layer_has_the_papers_parts_with_their_shapes():
    parts = _layer().parts
    assert isinstance(parts, NalaParts)
    assert parts.gate_proj.weight.shape == (24, 24) and parts.gate_proj.bias.shape == (24,)
    assert parts.norm.weight.shape == (24,)


def test_the_output_is_the_normalised_attention_times_the_silu_gate():
    layer = _layer()
    x = torch.randn(2, 9, 24)
    q, k, v = layer.project(x)
    out = layer.parts.finish(x, az.attention(q, k, v, method="nala", causal=True))
    channels = out.transpose(1, 2).reshape(2, 9, 24)
    gate = torch.nn.functional.silu(layer.parts.gate_proj(x))
    torch.testing.assert_close((channels / gate).mean(-1), torch.zeros(2, 9), atol=1e-4, rtol=0)
    torch.testing.assert_close((channels / gate).var(-1, unbiased=False), torch.ones(2, 9), atol=1e-3, rtol=0)
