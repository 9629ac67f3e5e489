"""P8 halo attention: the banded fast path against the dense reference on 1-D, 2-D and 3-D layouts."""

from __future__ import annotations

import pytest

from tests.helpers import assert_matches_reference, qkv


@pytest.mark.parametrize(
    "params",
    [dict(block_size=16, halo_size=3), dict(block_size=(4, 6), halo_size=(1, 2), layout=(15, 20)),
     dict(block_size=(2, 4, 3), halo_size=(1, 0, 2), layout=(5, 6, 10))],
)
def test_halo_torch_matches_reference(params):
    q, k, v = qkv(2, 4, 2, 300, requires_grad=True)
    assert_matches_reference("halo", q, k, v, **params)
