"""P6 dilated attention: the banded fast path against the dense reference, with and without a window."""

from __future__ import annotations

import pytest

from tests.helpers import assert_decodes, assert_matches_reference, qkv


@pytest.mark.parametrize(("causal", "params"), [(False, dict(dilation=3, window=20)), (True, dict(dilation=4))])
def test_dilated_torch_matches_reference(causal, params):
    q, k, v = qkv(2, 4, 2, 300, requires_grad=True)
    assert_matches_reference("dilated", q, k, v, causal=causal, **params)


@pytest.mark.parametrize(("dilation", "window", "slots"), [(3, 2, 7), (2, None, 30)])
def test_dilated_decodes_with_a_ring_of_its_look_back(dilation: int, window: int | None, slots: int) -> None:
    state = assert_decodes("dilated", *qkv(2, 2, 1, 30), [15, 9], dilation=dilation, window=window)
    assert state.data.slots == slots
