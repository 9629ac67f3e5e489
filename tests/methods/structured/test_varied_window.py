"""P14 varied-size window attention: zero regression is plain window attention, the fast path against the dense
reference with a learned regression, the nn layer owns the regression, and parameter errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_matches_reference, qkv


def test_varied_window_with_zero_regression_is_window_attention():
    q, k, v = qkv(2, 4, 2, 12 * 15, dv=6, requires_grad=True)
    zero = torch.zeros(4, 8, 4, dtype=torch.float64)
    want = az.attention(q, k, v, method="maxvit_block", window_size=(4, 5), layout=(12, 15))
    for backend in ("torch", "reference"):
        for reg in (None, zero):
            got = az.attention(q, k, v, method="varied_window", window_size=(4, 5), layout=(12, 15),
                               window_regression=reg, backend=backend)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("layout", "window"), [((12, 15), (4, 5)), ((6, 6), 3), (None, 6)])
def test_varied_window_torch_matches_reference(layout, window):
    q, k, v = qkv(2, 4, 2, 180 if layout != (6, 6) else 36, dv=6, requires_grad=True)
    reg = (0.4 * torch.randn(4, 8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
           ).requires_grad_()
    assert_matches_reference("varied_window", q, k, v, grads=(reg,), layout=layout, window_size=window,
                             window_regression=reg)


def test_varied_window_nn_layer_owns_the_regression():
    layer = az.nn.Attention(32, 4, method="varied_window", window_size=3, layout=(6, 6))
    assert tuple(layer.learnable["window_regression"].shape) == (4, 8, 4)
    assert not layer.learnable["window_regression"].any()
    x = torch.randn(2, 36, 32)
    layer(x).square().sum().backward()
    assert layer.learnable["window_regression"].grad is not None


@pytest.mark.parametrize(("params", "name"), [(dict(layout=(5, 7)), "layout"), (dict(window_size=(4, 4), layout=(6, 6)),
                                              "window_size"), (dict(window_size=(2, 2, 2)), "window_size"),
                                              (dict(window_regression=torch.zeros(2, 8, 3)), "window_regression")])
def test_varied_window_errors(params, name):
    q, k, v = qkv(1, 2, 2, 36, requires_grad=True)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="varied_window", **{"window_size": 3, **params})
