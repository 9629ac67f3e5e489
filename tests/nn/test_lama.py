"""``az.nn.LAMAPooling``: the low-rank bilinear heads ``softmax_t(tanh((p_j·c)(q_j·h_t)))`` pool the token states, with
``2·d·m + d`` parameters, padding masks, gradients, determinism and bad input."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError


def pool() -> az.nn.LAMAPooling:
    torch.manual_seed(0)
    return az.nn.LAMAPooling(12, 3).double()


def states(b: int = 2, t: int = 7) -> torch.Tensor:
    return torch.randn(b, t, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_pooling_is_the_low_rank_bilinear_attention() -> None:
    m, h = pool(), states()
    affinity = (m.p.t() @ m.context).view(1, 3, 1) * torch.einsum("dj,btd->bjt", m.q, h)
    a = torch.softmax(torch.tanh(affinity), dim=-1)
    torch.testing.assert_close(m(h, flatten=False), a @ h)
    assert m(h).shape == (2, 36)
    assert sum(p.numel() for p in m.parameters()) == 2 * 12 * 3 + 12


def test_padding_tokens_change_nothing() -> None:
    m, h = pool(), states()
    padded = torch.cat([torch.randn(2, 3, 12, dtype=torch.float64), h], 1)
    mask = torch.arange(10).expand(2, 10) >= 3
    torch.testing.assert_close(m(padded, mask), m(h))


def test_gradients_and_determinism() -> None:
    m, h = pool(), states()
    m(h).square().sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())
    assert torch.equal(m(h), m(h))


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: az.nn.LAMAPooling(12, 0), "heads"),
        (lambda: az.nn.LAMAPooling(12, 3)(torch.randn(2, 5, 4)), "h"),
        (lambda: az.nn.LAMAPooling(12, 3)(torch.randn(2, 5, 12), torch.ones(2, 4, dtype=torch.bool)), "mask"),
    ],
)
def test_bad_input_names_the_argument(build, argument: str) -> None:
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        build()
