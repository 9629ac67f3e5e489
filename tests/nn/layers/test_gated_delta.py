"""Gated DeltaNet's layer: the paper's parts and their ranges (causality, decoding and training:
``test_registered_layers.py``)."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn.layers.gated_delta import GatedDeltaNetParts


def _layer(**kw) -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, kv_heads=2, method="gated_delta", causal=True, **kw)


def test_the_layer_has_the_papers_parts_with_their_shapes():
    parts = _layer().parts
    assert isinstance(parts, GatedDeltaNetParts)
    assert parts.beta_proj.weight.shape == (4, 24) and parts.decay_proj.weight.shape == (4, 24)
    assert parts.A_log.shape == (4,) and parts.dt_bias.shape == (4,)
    assert parts.gate_proj.weight.shape == (24, 24) and parts.o_norm.weight.shape == (6,)
    assert parts.q_conv.conv.weight.shape == (24, 1, 4) and parts.k_conv.conv.weight.shape == (12, 1, 4)
    dt = torch.nn.functional.softplus(parts.dt_bias)
    assert bool(((dt >= 1e-4) & (dt <= 0.1 + 1e-6)).all()) and bool((parts.A_log.exp() <= 16).all())


def test_gates_are_data_dependent_and_in_range():
    layer = _layer()
    x = torch.randn(2, 9, 24)
    q, k, v = layer.project(x)
    _, _, _, gates = layer.parts(x, q, k, v)
    beta, log_gate = gates["beta"], gates["log_gate"]
    assert beta.shape == log_gate.shape == (2, 4, 9)
    assert bool(((beta > 0) & (beta < 1)).all()) and bool((log_gate <= 0).all())
    assert beta.std() > 0 and log_gate.std() > 0  # they depend on the token





def test_faithful_false_is_the_bare_kernel_and_computed_parameters_cannot_be_passed():
    assert _layer(faithful=False).parts is None
    with pytest.raises(AttnzooError, match="^log_gate:"):
        _layer(log_gate=torch.zeros(1, 4, 9))
    with pytest.raises(AttnzooError, match="^faithful:"):
        _layer(faithful="yes")
