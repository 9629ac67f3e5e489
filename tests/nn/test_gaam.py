"""``az.nn.GaussianAdaptiveAttention`` (GAAM/DAAM): the mixture density of the paper per head and Gaussian against a
plain loop, padding masks along the sequence, gradients to every learned mean offset, scale and weight, and bad
input."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError


def layer(axis: str = "features") -> az.nn.GaussianAdaptiveAttention:
    m = az.nn.GaussianAdaptiveAttention(12, heads=3, num_gaussians=2, axis=axis).double()
    with torch.no_grad():  # away from the symmetric initial values, so each parameter matters
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    return m


def features(b: int = 2, n: int = 5) -> torch.Tensor:
    return torch.randn(b, n, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def looped(m: az.nn.GaussianAdaptiveAttention, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula one head and one Gaussian at a time, statistics along the chosen axis."""
    dim = -1 if m.axis == "features" else 1
    outs = []
    for h, chunk in enumerate(x.split(4, dim=-1)):
        mean = chunk.mean(dim, keepdim=True)
        var = (chunk**2).mean(dim, keepdim=True) - mean**2
        pi = torch.softmax(m.weights[h], 0)
        g = sum(pi[i] * torch.exp(-(((chunk - mean - m.mean_offsets[h, i]) / torch.sqrt(var + m.eps)) ** 2)
                                  / (2 * m.c[h, i] ** 2)) for i in range(2))
        outs.append(chunk * g / g.sum(dim, keepdim=True))
    return torch.cat(outs, -1)


@pytest.mark.parametrize("axis", ["features", "sequence"])
def test_density_is_the_papers_mixture(axis: str) -> None:
    m, x = layer(axis), features()
    torch.testing.assert_close(m(x), looped(m, x))


def test_padding_is_kept_and_left_out_of_the_sequence_statistics() -> None:
    m, x = layer("sequence"), features()
    padded = torch.cat([x, torch.randn(2, 3, 12, dtype=torch.float64)], 1)
    mask = torch.arange(8).expand(2, 8) < 5
    out = m(padded, mask)
    torch.testing.assert_close(out[:, :5], m(x))
    torch.testing.assert_close(out[:, 5:], padded[:, 5:])


def test_gradients_reach_every_parameter() -> None:
    m = layer()
    m(features()).square().sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())
    assert math.isfinite(sum(float(p.grad.abs().sum()) for p in m.parameters()))


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: az.nn.GaussianAdaptiveAttention(12, heads=5), "heads"),
        (lambda: az.nn.GaussianAdaptiveAttention(12, num_gaussians=0), "num_gaussians"),
        (lambda: az.nn.GaussianAdaptiveAttention(12, axis="time"), "axis"),
        (lambda: az.nn.GaussianAdaptiveAttention(12, initial_c=0.0), "initial_c"),
        (lambda: az.nn.GaussianAdaptiveAttention(12)(torch.randn(2, 5, 4)), "x"),
        (lambda: az.nn.GaussianAdaptiveAttention(12)(torch.randn(2, 5, 12), torch.ones(2, 5)), "mask"),
    ],
)
def test_bad_input_names_the_argument(build, argument: str) -> None:
    with pytest.raises(AttnzooError, match=f"^{argument}:"):
        build()
