"""P6 dilated attention: the banded fast path against the dense reference, with and without a window."""

from __future__ import annotations

import pytest

from tests.helpers import assert_matches_reference, qkv


@pytest.mark.parametrize(("causal", "params"), [(False, dict(dilation=3, window=20)), (True, dict(dilation=4))])
def test_dilated_torch_matches_reference(causal, params):
    q, k, v = qkv(2, 4, 2, 300, requires_grad=True)
    assert_matches_reference("dilated", q, k, v, causal=causal, **params)
