"""Titans' layer: its parts, the gates' ranges and starting values, and that it learns (causality, decoding and
training of every part: ``test_registered_layers.py``)."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn.layers.titans import GATE_STARTS, MemoraParts, MirasParts, TitansParts
from tests.helpers import fit_losses


def _layer(**kw) -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, kv_heads=2, method="titans", causal=True, **kw)


def test_the_layer_has_the_papers_parts_with_their_shapes():
    parts = _layer().parts
    assert isinstance(parts, TitansParts)
    assert parts.gate_logits.weight.shape == (12, 24) and parts.gate_logits.bias.shape == (12,)
    assert parts.gate_proj.weight.shape == (24, 24) and parts.o_norm.weight.shape == (6,)
    assert parts.q_conv.conv.weight.shape == (24, 1, 4) and parts.k_conv.conv.weight.shape == (12, 1, 4)


def test_gates_are_per_head_and_token_in_range_and_start_where_documented():
    layer = _layer()
    x = torch.randn(2, 9, 24)
    q, k, v = layer.project(x)
    _, _, _, gates = layer.parts(x, q, k, v)
    assert set(gates) == {"eta", "theta", "alpha"}
    for g in gates.values():
        assert g.shape == (2, 4, 9) and bool(((g > 0) & (g < 1)).all()) and g.std() > 0
    with torch.no_grad():
        layer.parts.gate_logits.weight.zero_()
    _, _, _, gates = layer.parts(x, q, k, v)
    for name, start in GATE_STARTS.items():
        torch.testing.assert_close(gates[name], torch.full((2, 4, 9), start))


def test_the_layer_learns_a_sequence_map():
    torch.manual_seed(1)
    layer = _layer(chunk_size=4)
    x = torch.randn(2, 12, 24)
    target = torch.roll(x, 1, dims=1) * 0.5  # the previous token: needs the memory (or the convolution)
    losses = fit_losses(layer, x, target, steps=12, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]


def test_the_chunk_size_and_loss_pass_to_the_kernel_and_bad_values_fail_at_construction():
    x = torch.randn(1, 10, 24)
    l2, huber = _layer(chunk_size=4), _layer(chunk_size=4, loss="huber", delta=1e9)
    torch.testing.assert_close(l2(x), huber(x))
    with pytest.raises(AttnzooError, match="^chunk_size:"):
        _layer(chunk_size=0)
    with pytest.raises(AttnzooError, match="^eta:"):
        _layer(eta=0.5)


@pytest.mark.parametrize("method", ["moneta", "yaad", "memora"])
def test_miras_layers_compute_the_learning_rate_and_forgetting_gates_and_learn(method: str):
    torch.manual_seed(2)
    layer = az.nn.Attention(24, 4, kv_heads=2, method=method, causal=True, chunk_size=4)
    assert isinstance(layer.parts, MirasParts) and layer.parts.gate_logits.weight.shape == (8, 24)
    x = torch.randn(2, 12, 24)
    q, k, v = layer.project(x)
    _, _, _, gates = layer.parts(x, q, k, v)
    assert set(gates) == {"theta", "alpha"}
    high = MemoraParts.max_rate if method == "memora" else 1.0
    assert bool(((gates["theta"] > 0) & (gates["theta"] < high)).all()) and gates["theta"].max() > 0.05 * high
    losses = fit_losses(layer, x, torch.roll(x, 1, dims=1) * 0.5, steps=12, lr=3e-2)
    assert losses[-1] < 0.7 * losses[0]
