"""Sigmoid attention's layer: QK-norm, the −log n bias, the hybrid-norm output norm (causality, decoding and
training: ``test_registered_layers.py``)."""

from __future__ import annotations

import math

import torch

import attnzoo as az
from attnzoo.nn.layers.sigmoid import SigmoidParts


def _layer(**kw) -> az.nn.Attention:
    torch.manual_seed(0)
    return az.nn.Attention(24, 4, kv_heads=2, method="sigmoid", causal=True, **kw)


def test_the_layer_has_the_papers_parts_with_their_shapes():
    parts = _layer().parts
    assert isinstance(parts, SigmoidParts)
    assert parts.q_norm.weight.shape == parts.k_norm.weight.shape == (6,)
    assert parts.out_norm.weight.shape == (24,) and parts.out_norm.eps == 1e-6


def test_queries_keys_and_output_are_normalised():
    layer = _layer()
    x = 5 * torch.randn(2, 9, 24)
    q, k, v = layer.project(x)
    qn, kn, vn, computed = layer.parts(x, q, k, v)
    assert computed == {} and vn is v
    for t in (qn, kn):
        torch.testing.assert_close(t.mean(-1), torch.zeros(t.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(t.var(-1, unbiased=False), torch.ones(t.shape[:-1]), atol=1e-3, rtol=0)
    y = layer(x)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 9), atol=1e-3, rtol=0)


def test_the_bias_is_minus_log_n_by_default():
    layer = _layer()
    x = torch.randn(2, 9, 24)
    fixed = az.nn.Attention(24, 4, kv_heads=2, method="sigmoid", causal=True, sigmoid_bias=-math.log(9))
    fixed.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), fixed(x))
