"""P5 MaxViT block and grid attention on 2-D/3-D layouts (the conformance suite sees only 1-D): the SDPA path against
the reference, and sizes that do not divide the layout."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_matches_reference, qkv


@pytest.mark.parametrize(
    ("method", "params"),
    [("maxvit_block", dict(window_size=(3, 4), layout=(6, 8))), ("maxvit_grid", dict(grid_size=(3, 4), layout=(6, 8))),
     ("maxvit_grid", dict(grid_size=(2, 3, 2), layout=(4, 3, 4)))],
)
@pytest.mark.parametrize(("dv", "return_lse"), [(6, False), (6, True), (8, True)])
def test_maxvit_sdpa_matches_reference(method, params, dv, return_lse):
    q, k, v = qkv(2, 4, 2, 48, 8, dv, requires_grad=True)
    assert_matches_reference(method, q, k, v, backend="sdpa", return_lse=return_lse, **params)


def test_maxvit_sizes_must_divide_the_layout():
    q = torch.randn(1, 2, 48, 8)
    with pytest.raises(AttnzooError, match="window_size"):
        az.attention(q, q, q, method="maxvit_block", window_size=(3, 3), layout=(6, 8))
    with pytest.raises(AttnzooError, match="grid_size"):
        az.attention(q, q, q, method="maxvit_grid", grid_size=5)
