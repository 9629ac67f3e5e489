"""Axial and MaxViT block/grid attention on 2-D/3-D layouts (the conformance suite sees only 1-D), and errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError


@pytest.mark.parametrize(
    ("layout", "axis", "causal"),
    [((5, 6), 1, False), ((5, 6), 0, True), ((5, 6), None, False), ((2, 3, 5), None, True), ((2, 3, 5), -2, False)],
)
def test_axial_sdpa_matches_reference(layout, axis, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 30, 6, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(method="axial", causal=causal, layout=layout, axis=axis)
    ref = az.attention(q, k, v, backend="reference", **kw)
    out = az.attention(q, k, v, backend="sdpa", **kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    cot = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("params", "needle"), [(dict(layout=(5, 7)), "layout"), (dict(layout=(5, 6), axis=2), "axis")])
def test_axial_errors(params, needle):
    q = torch.randn(1, 2, 30, 8)
    with pytest.raises(AttnzooError, match=needle):
        az.attention(q, q, q, method="axial", **params)


@pytest.mark.parametrize(
    ("method", "params"),
    [("maxvit_block", dict(window_size=(3, 4), layout=(6, 8))), ("maxvit_grid", dict(grid_size=(3, 4), layout=(6, 8))),
     ("maxvit_grid", dict(grid_size=(2, 3, 2), layout=(4, 3, 4)))],
)
def test_maxvit_sdpa_matches_reference(method, params):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 48, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 48, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 48, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = az.attention(q, k, v, method=method, backend="reference", **params)
    out = az.attention(q, k, v, method=method, backend="sdpa", **params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    cot = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_maxvit_sizes_must_divide_the_layout():
    q = torch.randn(1, 2, 48, 8)
    with pytest.raises(AttnzooError, match="window_size"):
        az.attention(q, q, q, method="maxvit_block", window_size=(3, 3), layout=(6, 8))
    with pytest.raises(AttnzooError, match="grid_size"):
        az.attention(q, q, q, method="maxvit_grid", grid_size=5)
