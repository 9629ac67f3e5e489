"""NAtS-L's layer: Gated DeltaNet's parts with the kernel's learnable router, causality, training, and decoding with
the layer's gates and router."""

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


def test_output_is_causal():
    layer = _layer()
    x = torch.randn(1, 12, 24)
    y = x.clone()
    y[:, 7:] = torch.randn(1, 5, 24)
    torch.testing.assert_close(layer(x)[:, :7], layer(y)[:, :7])


def test_decoding_with_the_layers_gates_and_router_equals_the_parallel_form():
    layer = _layer().double()
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    router = {n: p.detach() for n, p in layer.learnable.items()}
    with torch.no_grad():
        q, k, v, gates = layer.parts(x, *layer.project(x))
        whole = az.attention(q, k, v, method="nats_hybrid", causal=True, **gates, **router)
        out, state = az.prefill(q[:, :, :6], k[:, :, :6], v[:, :, :6], method="nats_hybrid", **router,
                                **{n: g[..., :6] for n, g in gates.items()})
        steps = [out]
        for t in range(6, 11):
            o, state = az.step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                               **{n: g[..., t:t + 1] for n, g in gates.items()})
            steps.append(o)
    torch.testing.assert_close(torch.cat(steps, dim=2), whole)


def test_every_part_and_the_router_train():
    layer = _layer()
    layer(torch.randn(2, 10, 24)).square().sum().backward()
    for name, p in [*layer.parts.named_parameters(), *layer.learnable.items()]:
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
