"""Lightning Attention's TransNormerLLM layer: SiLU and LRPE on q/k, SRMSNorm and output gate, the decay schedule
(causality, decoding and training: ``test_registered_layers.py``)."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn.layers.lightning import TransNormerParts, lrpe, lrpe_angles, simple_rms_norm, transnormer_decay


def _layer(**kw) -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, method="lightning", causal=True, **kw)


def test_the_layer_has_the_papers_parts_with_their_shapes():
    parts = _layer().parts
    assert isinstance(parts, TransNormerParts)
    assert parts.gate_proj.weight.shape == (24, 24) and parts.gate_proj.bias is None


def test_queries_and_keys_go_through_silu_then_lrpe_and_values_do_not():
    layer = _layer()
    x = torch.randn(2, 9, 24)
    q, k, v = layer.project(x)
    qa, ka, va, computed = layer.parts(x, q, k, v)
    assert computed == {} and va is v and qa.shape == (2, 4, 9, 12)
    theta = lrpe_angles(6)
    torch.testing.assert_close(qa, lrpe(q * torch.sigmoid(q), theta))
    torch.testing.assert_close(ka, lrpe(k * torch.sigmoid(k), theta))


def test_lrpe_scores_are_the_relative_cosine_form():
    q, k = torch.randn(1, 1, 7, 6, dtype=torch.float64), torch.randn(1, 1, 7, 6, dtype=torch.float64)
    theta = lrpe_angles(6).double()
    torch.testing.assert_close(theta, 10000.0 ** (-torch.arange(6, dtype=torch.float64) / 3))
    scores = lrpe(q, theta) @ lrpe(k, theta).transpose(-1, -2)
    s, t = torch.arange(7)[:, None, None], torch.arange(7)[None, :, None]
    expected = (q[0, 0][:, None, :] * k[0, 0][None, :, :] * torch.cos((s - t) * theta)).sum(-1)
    torch.testing.assert_close(scores[0, 0], expected)


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
