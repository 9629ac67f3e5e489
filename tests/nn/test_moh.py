"""The MoH layer: shapes, masks, causality, gradients reaching every router, determinism, the kernel running only
the routed (token, head) pairs, the load-balance loss exposed and summed over a model, and bad arguments named."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.nn.layers.moh import MoHRouter, default_shared_heads, default_top_k
from attnzoo.nn.moh import balance_loss


def _layer(**kw: object) -> az.nn.MoHAttention:
    torch.manual_seed(0)
    return az.nn.MoHAttention(32, 8, **kw)  # type: ignore[arg-type]


def test_shapes_and_the_routing_it_applies() -> None:
    layer = _layer(shared_heads=2, top_k=3, kv_heads=4)
    x = torch.randn(2, 11, 32)
    assert layer(x).shape == (2, 11, 32)
    assert layer.router.selected is not None and layer.router.selected.shape == (2, 11, 6)
    assert bool((layer.router.selected.sum(-1) == 3).all())
    q, k, v = layer.project(x)
    _, _, _, computed = layer.router(x, q, k, v)
    weights = computed["head_weights"]
    assert weights.shape == (2, 8, 11)
    assert bool((weights[:, :2] != 0).all()) and bool(((weights[:, 2:] != 0).sum(1) == 3).all())


def test_the_output_is_the_gated_sum_of_only_the_routed_heads() -> None:
    layer = _layer(shared_heads=0, top_k=2).double()
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    q, k, v = layer.project(x)
    weights = layer.router(x, q, k, v)[3]["head_weights"]
    every_head = az.attention(q, k, v)
    want = layer.merge_heads(every_head * weights.unsqueeze(-1), x)
    torch.testing.assert_close(layer(x), want)


def test_mask_and_cross_attention() -> None:
    layer = _layer(context_dim=16)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[..., 3:] = False
    y = layer(x, context, mask=mask)
    changed = context.clone()
    changed[:, 3:] = torch.randn(2, 4, 16)
    torch.testing.assert_close(layer(x, changed, mask=mask), y)


def test_a_causal_layer_is_causal() -> None:
    layer = _layer(causal=True)
    x = torch.randn(1, 12, 32)
    y = x.clone()
    y[:, 7:] = torch.randn(1, 5, 32)
    torch.testing.assert_close(layer(x)[:, :7], layer(y)[:, :7])


def test_gradients_reach_every_router_and_projection() -> None:
    layer = _layer(shared_heads=2, top_k=3)
    x = torch.randn(2, 10, 32)
    loss = (layer(x) * torch.randn(2, 10, 32)).sum() + 0.01 * layer.load_balance_loss
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_deterministic() -> None:
    layer = _layer(causal=True)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


def test_load_balance_loss_is_exposed_and_summed_over_a_model() -> None:
    first, second = _layer(shared_heads=2, top_k=2), _layer(shared_heads=0, top_k=4)
    model = torch.nn.Sequential(first, second)
    assert first.load_balance_loss is None and float(balance_loss(model)) == 0.0
    model(torch.randn(2, 6, 32))
    assert first.load_balance_loss is not None and second.load_balance_loss is not None
    torch.testing.assert_close(balance_loss(model), first.load_balance_loss + second.load_balance_loss)


def test_the_generic_layer_gets_the_default_routers() -> None:
    layer = az.nn.Attention(32, 8, method="moh")
    assert isinstance(layer.parts, MoHRouter)
    assert (layer.parts.shared_heads, layer.parts.top_k) == (2, 4)  # 2 + 4 of 8 heads: 75 %
    assert (default_shared_heads(4), default_top_k(4, 1)) == (1, 2)
    assert default_top_k(2, 0) == 2 and default_top_k(1, 0) == 1


@pytest.mark.parametrize(
    ("kw", "argument"),
    [({"shared_heads": 8}, "shared_heads"), ({"shared_heads": -1}, "shared_heads"), ({"top_k": 0}, "top_k"),
     ({"shared_heads": 2, "top_k": 7}, "top_k"), ({"top_k": 2.0}, "top_k"),
     ({"head_weights": torch.ones(1)}, "head_weights")],
)
def test_bad_arguments_are_refused_naming_them(kw: dict[str, object], argument: str) -> None:
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        _layer(**kw)
