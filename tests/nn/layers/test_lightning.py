"""Lightning Attention's TransNormerLLM layer: SiLU on q/k, SRMSNorm and output gate, the decay schedule, causality
and decoding."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn.layers.lightning import TransNormerParts, simple_rms_norm, transnormer_decay


def _layer(**kw) -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, method="lightning", causal=True, **kw)


def test_the_layer_has_the_papers_parts_with_their_shapes():
    parts = _layer().parts
    assert isinstance(parts, TransNormerParts)
    assert parts.gate_proj.weight.shape == (24, 24) and parts.gate_proj.bias is None


def test_queries_and_keys_go_through_silu_and_values_do_not():
    layer = _layer()
    x = torch.randn(2, 9, 24)
    q, k, v = layer.project(x)
    qa, ka, va, computed = layer.parts(x, q, k, v)
    assert computed == {} and va is v
    torch.testing.assert_close(qa, q * torch.sigmoid(q))
    torch.testing.assert_close(ka, k * torch.sigmoid(k))


def test_the_output_is_srmsnorm_times_the_gate_and_the_kernel_scale_cancels():
    layer = _layer()
    x = torch.randn(2, 9, 24)
    q, k, v, _ = layer.parts(x, *layer.project(x))
    out = layer.parts.finish(x, az.attention(q, k, v, method="lightning", causal=True))
    unscaled = az.attention(q, k, v, method="lightning", causal=True, scale=1.0)  # the paper's unscaled form
    channels = simple_rms_norm(unscaled.transpose(1, 2).reshape(2, 9, 24)) * layer.parts.gate_proj(x)
    torch.testing.assert_close(out.transpose(1, 2).reshape(2, 9, 24), channels, atol=2e-3, rtol=2e-3)  # up to ε
    normed = simple_rms_norm(torch.randn(3, 5, 24) * 7)
    torch.testing.assert_close(normed.square().mean(-1), torch.ones(3, 5), atol=1e-4, rtol=0)


def test_the_decay_schedule_over_layers():
    first, last = transnormer_decay(4, 0, 3), transnormer_decay(4, 2, 3)
    torch.testing.assert_close(first, 2.0 ** (-8.0 * torch.arange(1, 5) / 4) * (1 + 1e-5))
    torch.testing.assert_close(last, 2.0 ** (-8.0 * torch.arange(1, 5) / 4) * 1e-5)
    assert _layer(decay=transnormer_decay(4, 1, 3))(torch.randn(1, 6, 24)).shape == (1, 6, 24)
    with pytest.raises(AttnzooError, match="^layer:"):
        transnormer_decay(4, 3, 3)


def test_output_is_causal():
    layer = _layer()
    x = torch.randn(1, 12, 24)
    y = x.clone()
    y[:, 7:] = torch.randn(1, 5, 24)
    torch.testing.assert_close(layer(x)[:, :7], layer(y)[:, :7])


def test_decoding_with_the_layers_heads_equals_the_parallel_form():
    layer = _layer().double()
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    with torch.no_grad():
        q, k, v, _ = layer.parts(x, *layer.project(x))
        whole = az.attention(q, k, v, method="lightning", causal=True)
        out, state = az.prefill(q[:, :, :6], k[:, :, :6], v[:, :, :6], method="lightning")
        steps = [out]
        for t in range(6, 11):
            o, state = az.step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
            steps.append(o)
    torch.testing.assert_close(torch.cat(steps, dim=2), whole)


def test_every_part_trains():
    layer = _layer()
    layer(torch.randn(2, 10, 24)).square().sum().backward()
    for name, p in layer.parts.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
