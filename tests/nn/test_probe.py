"""``az.nn.AttentiveProbe`` (EP): the paper's formula (learned queries against the raw tokens, one reduced value
projection, query j filling slice j), its parameter budget, padding masks, the classifier head, gradients,
determinism and bad input."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError


def probe(**kwargs) -> az.nn.AttentiveProbe:
    torch.manual_seed(0)
    return az.nn.AttentiveProbe(32, **{"num_queries": 4, "d_out": 2, **kwargs}).double()


def tokens(b: int = 3, n: int = 9) -> torch.Tensor:
    return torch.randn(b, n, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_pooling_is_the_papers_formula() -> None:
    p, x = probe(), tokens()
    a = torch.softmax(torch.einsum("md,bnd->bmn", p.queries, x) / 32**0.5, dim=-1)  # (B, M, N)
    v = p.v(x).view(3, 9, 4, 4)  # (B, N, M, slice)
    want = torch.einsum("bmn,bnms->bms", a, v).reshape(3, 16)
    torch.testing.assert_close(p(x), want)


def test_only_queries_and_one_reduced_value_projection_are_learned() -> None:
    p = probe()
    assert sum(t.numel() for t in p.parameters()) == 4 * 32 + 32 * 16
    assert probe(num_classes=5)(tokens()).shape == (3, 5)


def test_padding_tokens_change_nothing() -> None:
    p, x = probe(), tokens()
    padded = torch.cat([x, torch.randn(3, 2, 32, dtype=torch.float64)], 1)
    mask = torch.arange(11).expand(3, 11) < 9
    torch.testing.assert_close(p(padded, mask), p(x))


def test_gradients_and_determinism() -> None:
    p, x = probe(num_classes=3), tokens()
    p(x).square().sum().backward()
    assert all(t.grad is not None and bool(t.grad.abs().sum() > 0) for t in p.parameters())
    p.eval()
    assert torch.equal(p(x), p(x))


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: az.nn.AttentiveProbe(32, num_queries=5), "num_queries"),
        (lambda: az.nn.AttentiveProbe(32, d_out=0), "d_out"),
        (lambda: az.nn.AttentiveProbe(32, num_classes=0), "num_classes"),
        (lambda: az.nn.AttentiveProbe(32)(torch.randn(2, 5, 16)), "x"),
        (lambda: az.nn.AttentiveProbe(32)(torch.randn(2, 5, 32), torch.ones(2, 5)), "mask"),
    ],
)
def test_bad_input_names_the_argument(build, argument: str) -> None:
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        build()
