"""P2 neighborhood attention: the tiled fast path against the dense reference beyond the conformance suite's 1-D
shapes (2-D/3-D layouts, dilation, per-axis causal, sizes not dividing the tile), and parameter errors."""

from __future__ import annotations

import pytest

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_decodes, assert_matches_reference, qkv

NEIGHBORHOOD = [
    dict(kernel_size=31, dilation=3),  # 300 = 3 groups of 100, tiles of 128 do not divide
    dict(kernel_size=(5, 7), dilation=(2, 1), layout=(15, 20)),
    dict(kernel_size=(5, 7), dilation=(2, 1), layout=(15, 20), is_causal=(True, False)),
    dict(kernel_size=(15, 3), layout=(15, 20)),  # kernel equal to an axis
    dict(kernel_size=(3, 5, 3), dilation=(1, 1, 2), layout=(5, 6, 10), is_causal=(False, False, True)),
]


@pytest.mark.parametrize("params", NEIGHBORHOOD)
@pytest.mark.parametrize("causal", [False, True])
def test_neighborhood_torch_matches_reference(params, causal):
    q, k, v = qkv(2, 4, 2, 300, requires_grad=True)
    assert_matches_reference("neighborhood", q, k, v, causal=causal, **params)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        (dict(kernel_size=35), "kernel_size"),  # larger than the axis
        (dict(kernel_size=4), "odd"),
        (dict(kernel_size=(3, 3), layout=(5, 7)), "product"),
        (dict(kernel_size=(5, 3), layout=(4, 8)), "kernel_size"),
        (dict(kernel_size=3, dilation=12), "dilation"),
        (dict(kernel_size=(3, 3, 3)), "tuple of 1"),
        (dict(kernel_size=3, is_causal=(True, False)), "is_causal"),
        (dict(kernel_size=3, layout=(32, 0)), "layout"),
    ],
)
def test_neighborhood_errors(params, needle):
    q, k, v = qkv(1, 2, 2, 32, requires_grad=True)
    with pytest.raises(AttnzooError, match=needle):
        az.attention(q, k, v, method="neighborhood", **params)


@pytest.mark.parametrize("params", [{"kernel_size": 5, "dilation": 2}, {"layout": (5, 6), "kernel_size": (3, 5)},
                                    {"layout": (3, 10), "kernel_size": 3, "dilation": (1, 3)}])
def test_neighborhood_decodes_ragged_prompts(params: dict) -> None:
    assert_decodes("neighborhood", *qkv(2, 4, 2, 30), [12, 9], **params)


def test_neighborhood_decoding_memory_does_not_grow_with_the_context() -> None:
    q, k, v = qkv(1, 2, 1, 40)
    state = assert_decodes("neighborhood", q, k, v, [20], kernel_size=5, dilation=2)
    assert state.data.slots == (5 - 1) * 2 + 1
