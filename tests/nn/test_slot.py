"""``az.nn.SlotAttention``: shapes, Gaussian initialisation from the learned μ and σ, invariance to the order of the
inputs and equivariance to the order of the slots, padding masks, gradients, determinism, bad input."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError


def module(**kwargs) -> az.nn.SlotAttention:
    torch.manual_seed(0)
    return az.nn.SlotAttention(4, 16, **kwargs).double()


def inputs(b: int = 2, n: int = 10, d: int = 16) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_shapes_and_input_width() -> None:
    assert module()(inputs()).shape == (2, 4, 16)
    assert module(input_dim=6, heads=2)(inputs(d=6)).shape == (2, 4, 16)


def test_initial_slots_follow_the_learned_gaussian() -> None:
    m = module()
    with torch.no_grad():
        m.slots_mu.fill_(3.0)
        m.slots_log_sigma.fill_(torch.log(torch.tensor(0.5)).item())
    draws = m.initial_slots(2000, torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 3.0) < 0.01 and abs(draws.std().item() - 0.5) < 0.01


def test_inputs_order_does_not_matter_and_slots_order_is_followed() -> None:
    m, x = module(), inputs()
    slots = m.initial_slots(2, torch.Generator().manual_seed(2))
    out = m(x, slots=slots)
    torch.testing.assert_close(m(x[:, torch.randperm(10)], slots=slots), out)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(m(x, slots=slots[:, order]), out[:, order])


def test_padding_inputs_change_nothing() -> None:
    m, x = module(), inputs()
    padded = torch.cat([x, torch.randn(2, 3, 16, dtype=torch.float64)], 1)
    mask = torch.arange(13).expand(2, 13) < 10
    slots = m.initial_slots(2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(m(padded, mask, slots), m(x, slots=slots))


def test_gradients_reach_every_parameter() -> None:
    m = module()
    m(inputs()).square().sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())


def test_deterministic_given_a_generator() -> None:
    m, x = module(), inputs()
    first = m(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, m(x, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(first, m(x, generator=torch.Generator().manual_seed(6)))


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: az.nn.SlotAttention(0, 16), "num_slots"),
        (lambda: az.nn.SlotAttention(4, 16, iters=0), "iters"),
        (lambda: az.nn.SlotAttention(4, 16, heads=3), "heads"),
        (lambda: az.nn.SlotAttention(4, 16, eps=-1.0), "eps"),
        (lambda: az.nn.SlotAttention(4, 16)(torch.randn(2, 5, 8)), "inputs"),
        (lambda: az.nn.SlotAttention(4, 16)(torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.bool)), "mask"),
        (lambda: az.nn.SlotAttention(4, 16)(torch.randn(2, 5, 16), slots=torch.randn(2, 3, 16)), "slots"),
    ],
)
def test_bad_input_names_the_argument(build, argument: str) -> None:
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        build()
