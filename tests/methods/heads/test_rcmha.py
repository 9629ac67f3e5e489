"""H5 RCMHA's relative scores: Transformer-XL's formula written out by hand, the sinusoid, translation invariance of
the positional term, parameter errors."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.heads import rcmha

F64 = torch.float64


def test_sinusoid_is_sines_then_cosines_of_geometric_frequencies():
    phi = rcmha.sinusoid(torch.tensor([0, 3]), 4)
    torch.testing.assert_close(phi[0], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64))
    want = [math.sin(3), math.sin(3 / 100), math.cos(3), math.cos(3 / 100)]
    torch.testing.assert_close(phi[1], torch.tensor(want, dtype=F64))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_scores_are_transformer_xl_s_written_out(backend: str):
    """s_ij = scale·[(q_i + u)·k_j + (q_i + w)·W φ(i − j)], causal softmax, one head, by loops."""
    g = torch.Generator().manual_seed(0)
    n, d, p = 4, 3, 2
    q, k, v = (torch.randn(1, 1, n, d, generator=g, dtype=F64) for _ in range(3))
    u, w = torch.randn(1, d, generator=g, dtype=F64), torch.randn(1, d, generator=g, dtype=F64)
    proj = torch.randn(1, d, p, generator=g, dtype=F64)
    out = az.attention(q, k, v, method="rcmha", causal=True, backend=backend, content_bias=u, position_bias=w,
                       position_proj=proj)
    scale = d ** -0.5
    want = torch.zeros(n, d, dtype=F64)
    for i in range(n):
        s = []
        for j in range(i + 1):
            r = proj[0] @ torch.tensor([math.sin(i - j), math.cos(i - j)], dtype=F64)
            s.append(scale * ((q[0, 0, i] + u[0]) @ k[0, 0, j] + (q[0, 0, i] + w[0]) @ r))
        weights = torch.softmax(torch.stack(s), dim=0)
        want[i] = weights @ v[0, 0, : i + 1]
    torch.testing.assert_close(out[0, 0], want)


def test_the_positional_term_depends_on_the_distance_only():
    q = torch.randn(1, 2, 1, 4, dtype=F64).expand(1, 2, 6, 4)  # the same query at every position
    bias = rcmha.relative_bias(q, 6, 0.5, None, torch.randn(2, 4, 8, dtype=F64))
    for shift in range(1, 6):
        torch.testing.assert_close(bias[..., shift:, shift:], bias[..., :-shift, :-shift])


def test_without_positions_it_is_softmax_of_content_biased_queries():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g, dtype=F64) for _ in range(3))
    u = torch.randn(4, 8, generator=g, dtype=F64)
    out = az.attention(q, k, v, method="rcmha", causal=True, content_bias=u)
    torch.testing.assert_close(out, az.attention(q + u.view(1, 4, 1, 8), k, v, method="softmax", causal=True))


@pytest.mark.parametrize(
    ("name", "value"),
    [("content_bias", torch.zeros(4, 7)), ("position_bias", torch.zeros(3, 8)),
     ("position_proj", torch.zeros(4, 8, 3)), ("position_proj", torch.zeros(4, 8))],
)
def test_bad_parameters_name_themselves(name: str, value: torch.Tensor):
    q = k = v = torch.randn(1, 4, 5, 8)
    with pytest.raises(AttnzooError, match=f"^{name}:"):
        az.attention(q, k, v, method="rcmha", **{name: value})
