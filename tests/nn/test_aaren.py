"""``az.nn.Aaren``: shapes, causality, prefill then steps equal one forward (a stacked RNN with a constant-size
state), padding masks, gradients to the learned queries, training, determinism, and bad input naming its argument."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import fit_losses


def model(norm_first: bool = False, depth: int = 2) -> az.nn.Aaren:
    torch.manual_seed(0)
    return az.nn.Aaren(16, 4, depth=depth, norm_first=norm_first).double().eval()


def test_shapes_and_causality() -> None:
    m = model()
    x = torch.randn(3, 13, 16, dtype=torch.float64)
    y = m(x)
    assert y.shape == x.shape
    later = x.clone()
    later[:, 7:] = torch.randn(3, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(m(later)[:, :7], y[:, :7])


@pytest.mark.parametrize("norm_first", [False, True])
def test_prefill_then_steps_equal_one_forward(norm_first: bool) -> None:
    m = model(norm_first)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
        out, states = m.prefill(x[:, :9])
        outs = [out]
        for t in range(9, 12):
            out, states = m.step(x[:, t : t + 1], states)
            outs.append(out)
        out, after = m.step(x[:, 12:], states)  # a chunk of tokens at once
    torch.testing.assert_close(torch.cat([*outs, out], 1), want)
    held = [[tuple(t.shape) for t in s.data] for s in states]
    assert held == [[tuple(t.shape) for t in s.data] for s in after]  # the state does not grow


def test_padding_tokens_change_nothing_after_them() -> None:
    m = model()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 3, 16, dtype=torch.float64), x], 1)
    key_mask = torch.arange(11).view(1, -1) >= 3
    torch.testing.assert_close(m(padded, key_mask)[:, 3:], m(x))


def test_gradients_reach_every_parameter_and_it_trains() -> None:
    torch.manual_seed(0)
    m = az.nn.Aaren(16, 4, depth=2)
    x = torch.randn(4, 12, 16)
    target = torch.cumsum(x, 1) / torch.arange(1, 13).view(1, -1, 1)  # the running mean: a prefix task
    m(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    losses = fit_losses(m, x, target, 30)
    assert losses[-1] < 0.5 * losses[0]


def test_deterministic() -> None:
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    assert torch.equal(model()(x), model()(x))


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: az.nn.Aaren(16.0, 4), "dim"),
        (lambda: az.nn.Aaren(16, 0), "heads"),
        (lambda: az.nn.Aaren(16, 3), "head_dim"),
        (lambda: az.nn.Aaren(16, 4, depth=0), "depth"),
        (lambda: az.nn.Aaren(16, 4, mlp_ratio=0), "mlp_ratio"),
        (lambda: az.nn.Aaren(16, 4, dropout=1.0), "dropout"),
        (lambda: az.nn.Aaren(16, 4, norm_first="yes"), "norm_first"),
        (lambda: az.nn.Aaren(16, 4)(torch.randn(2, 5, 8)), "x"),
        (lambda: az.nn.Aaren(16, 4)(torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.bool)), "key_mask"),
        (lambda: az.nn.Aaren(16, 4, depth=2).step(torch.randn(2, 1, 16), []), "states"),
    ],
)
def test_bad_input_names_the_argument(build, argument: str) -> None:
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        build()
