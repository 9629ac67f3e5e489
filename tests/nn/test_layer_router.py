"""Flux-style layer routing: a hard decision runs exactly one branch, gradients reach the router in training, the
trainer moves the full-layer fraction toward its target, the decisions can be read back, and bad input is named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo as az
from attnzoo.errors import AttnzooError

# sigmoid has paper layer parts: the routed sparse branch is its bare kernel all the same
SPARSE = [("sliding_window", {"window": 4}), ("moba", {"block_size": 8, "top_k": 2}), ("sigmoid", {})]


class Stack(nn.Module):
    """A tiny attention-only model: residual routed layers."""

    def __init__(self, layers: int = 4, full_bias: float = 4.5) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            az.nn.RoutedAttention(32, 4, "sliding_window", window=4, pool=8, full_bias=full_bias)
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def plain(routed: az.nn.RoutedAttention, method: str, params: dict[str, object]) -> az.nn.Attention:
    """An ``az.nn.Attention`` with ``routed``'s projections running ``method``'s bare kernel."""
    layer = az.nn.Attention(32, 4, method=method, causal=True, faithful=False, **params)
    layer.load_state_dict(routed.state_dict(), strict=False)
    return layer.eval()


def choose(layer: az.nn.RoutedAttention, full: bool) -> None:
    with torch.no_grad():
        layer.router.mlp[-1].bias.copy_(torch.tensor([0.0, 10.0] if full else [10.0, 0.0]))


@pytest.mark.parametrize(("sparse", "params"), SPARSE)
def test_a_hard_decision_runs_exactly_one_branch(sparse, params):
    torch.manual_seed(0)
    layer = az.nn.RoutedAttention(32, 4, sparse, **params).eval()
    x = torch.randn(2, 24, 32)
    for full, method, kwargs in ((True, "softmax", {}), (False, sparse, params)):
        choose(layer, full)
        assert torch.equal(layer(x), plain(layer, method, kwargs)(x))
        assert layer.last_route.full.tolist() == [full, full]
        choose(layer, not full)
        layer.route = "full" if full else "sparse"
        assert torch.equal(layer(x), plain(layer, method, kwargs)(x))
        layer.route = "router"


def test_each_sequence_of_a_batch_takes_its_own_branch():
    torch.manual_seed(0)
    layer = az.nn.RoutedAttention(32, 4, "sliding_window", window=4, pool=4).eval()
    x = torch.randn(8, 16, 32) + 3 * torch.randn(8, 1, 32)
    with torch.no_grad():  # a random last layer, its bias splitting the batch at the median logit difference
        last = layer.router.mlp[-1]
        last.weight.normal_(0, 1.0)
        last.bias.zero_()
        logits = layer.router(layer.project(x)[0])
        last.bias[1] = -(logits[:, 1] - logits[:, 0]).median()
    out = layer(x)
    full = layer.last_route.full
    assert full.any() and not full.all()
    assert torch.equal(full, layer.last_route.p_full > 0.5)
    full_out = plain(layer, "softmax", {})(x)
    sparse_out = plain(layer, "sliding_window", {"window": 4})(x)
    torch.testing.assert_close(out[full], full_out[full])
    torch.testing.assert_close(out[~full], sparse_out[~full])


def test_training_mixes_the_branches_by_a_straight_through_gate_and_the_router_gets_gradients():
    torch.manual_seed(0)
    layer = az.nn.RoutedAttention(32, 4, "sliding_window", window=4, pool=8).train()
    x = torch.randn(3, 20, 32)
    out = layer(x)
    route = layer.last_route
    assert route.gate.requires_grad and set(route.gate.detach().tolist()) <= {0.0, 1.0}
    expected = torch.where(route.full.view(-1, 1, 1), plain(layer, "softmax", {})(x),
                           plain(layer, "sliding_window", {"window": 4})(x))
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    grad = layer.router.mlp[-1].bias.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize(("full_bias", "target"), [(4.5, 0.5), (-4.5, 1.0)])
def test_the_trainer_moves_the_full_fraction_toward_the_target(full_bias, target):
    torch.manual_seed(0)
    model = Stack(full_bias=full_bias)
    frozen = {n: p.clone() for n, p in model.named_parameters() if "router" not in n}
    batches = [torch.randn(4, 32, 32) for _ in range(20)]

    def p_full() -> float:
        model(batches[0])
        return torch.stack([r.p_full for r in az.nn.routing_decisions(model).values()]).mean().item()

    before = p_full()
    history = az.nn.train_routers(model, batches, steps=20, target_full=target, lr=1e-2, budget_lr=0.1)
    after = p_full()
    assert len(history) == 20 and history[0].temperature == 1.5 and history[-1].temperature == 1.0
    assert abs(after - target) < abs(before - target) - 0.1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_decisions_are_inspectable_and_routes_can_be_forced():
    torch.manual_seed(0)
    model = Stack(layers=3).eval()
    assert az.nn.routing_decisions(model) == {}
    x = torch.randn(2, 16, 32)
    model(x)
    routes = az.nn.routing_decisions(model)
    assert list(routes) == ["layers.0", "layers.1", "layers.2"]
    assert all(r.full.tolist() == [True, True] and r.p_full.shape == (2,) for r in routes.values())
    torch.testing.assert_close(az.nn.full_fraction(model), torch.ones(2))
    choose(model.layers[1], full=False)
    model(x)
    torch.testing.assert_close(az.nn.full_fraction(model), torch.full((2,), 2 / 3))
    with az.nn.forced_route(model, "sparse"):
        model(x)
        torch.testing.assert_close(az.nn.full_fraction(model), torch.zeros(2))
    assert [layer.route for layer in model.layers] == ["router"] * 3


def test_bad_input_names_the_argument():
    for sparse in ("nope", "softmax", 3):
        with pytest.raises(AttnzooError, match="^sparse:"):
            az.nn.RoutedAttention(32, 4, sparse)
    with pytest.raises(AttnzooError, match="^windw:"):
        az.nn.RoutedAttention(32, 4, "sliding_window", windw=4)
    with pytest.raises(AttnzooError, match="^pool:"):
        az.nn.RoutedAttention(32, 4, "sliding_window", pool=0)
    with pytest.raises(AttnzooError, match="^temperature:"):
        az.nn.RoutedAttention(32, 4, "sliding_window", temperature=0.0)
    layer = az.nn.RoutedAttention(32, 4, "sliding_window")
    layer.route = "half"
    with pytest.raises(AttnzooError, match="^route:"):
        layer(torch.randn(1, 8, 32))
    model, batches = Stack(layers=1), [torch.randn(1, 8, 32)]
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(AttnzooError, match="^target_full:"):
            az.nn.train_routers(model, batches, steps=1, target_full=bad)
    with pytest.raises(AttnzooError, match="^steps:"):
        az.nn.train_routers(model, batches, steps=0, target_full=0.5)
    with pytest.raises(AttnzooError, match="^budget_lr:"):
        az.nn.train_routers(model, batches, steps=1, target_full=0.5, budget_lr=-1.0)
    with pytest.raises(AttnzooError, match="^model:"):
        az.nn.train_routers(nn.Linear(2, 2), batches, steps=1, target_full=0.5)
    with pytest.raises(AttnzooError, match="^model:"):
        az.nn.full_fraction(Stack(layers=1))
