"""P1 sliding-window attention: the banded fast path against the dense reference (causal, inward windows, cross
lengths, a window wider than the sequence), and a negative window refused."""

from __future__ import annotations

import pytest

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_decodes, assert_matches_reference, qkv


@pytest.mark.parametrize(
    ("sq", "skv", "causal", "params"),
    [(300, 300, False, dict(window=20)), (300, 300, True, dict(window=20)), (300, 300, False, dict(window=20,
     inward=True)), (100, 300, False, dict(window=20)), (300, 100, True, dict(window=20)), (300, 100, False,
     dict(window=3)), (129, 129, False, dict(window=500))],
)
def test_sliding_window_torch_matches_reference(sq, skv, causal, params):
    q, k, v = qkv(2, 4, 2, sq, skv=skv, requires_grad=True)
    assert_matches_reference("sliding_window", q, k, v, causal=causal, **params)


def test_sliding_window_negative_window():
    q, k, v = qkv(1, 2, 2, 32, requires_grad=True)
    with pytest.raises(AttnzooError, match="window"):
        az.attention(q, k, v, method="sliding_window", window=-1)


def test_sliding_window_decodes_through_a_ring_whose_size_is_the_window() -> None:
    q, k, v = qkv(2, 4, 2, 40)
    short = assert_decodes("sliding_window", q[:, :, :20], k[:, :, :20], v[:, :, :20], [10, 3], window=5)
    long = assert_decodes("sliding_window", q, k, v, [30, 17], window=5)
    assert short.data.slots == long.data.slots == 6 and short.data.nbytes == long.data.nbytes
