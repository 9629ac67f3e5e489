"""RALA's layer: the output gate computed from the token and passed to the kernel (training:
``test_registered_layers.py``)."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn.layers.rala import RalaParts


def _layer(**kw) -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, kv_heads=2, method="rala", **kw)


def test_the_layer_has_the_papers_gate_with_its_shape():
    parts = _layer().parts
    assert isinstance(parts, RalaParts)
    assert parts.gate_proj.weight.shape == (24, 24) and parts.gate_proj.bias.shape == (24,)


def test_the_output_is_the_kernel_times_the_tokens_gate():
    layer = _layer()
    x = torch.randn(2, 9, 24)
    q, k, v = layer.project(x)
    _, _, _, computed = layer.parts(x, q, k, v)
    gate = computed["output_gate"]
    assert gate.shape == (2, 4, 9, 6)
    torch.testing.assert_close(gate.transpose(1, 2).reshape(2, 9, 24), layer.parts.gate_proj(x))
    plain = az.attention(q, k, v, method="rala")
    torch.testing.assert_close(az.attention(q, k, v, method="rala", output_gate=gate), plain * gate)


def test_cross_attention_gates_the_queries():
    layer = az.nn.Attention(24, 4, method="rala", context_dim=10)
    assert layer(torch.randn(2, 5, 24), torch.randn(2, 7, 10)).shape == (2, 5, 24)


def test_the_gate_cannot_be_passed():
    with pytest.raises(AttnzooError, match="^output_gate:"):
        _layer(output_gate=torch.ones(1))
