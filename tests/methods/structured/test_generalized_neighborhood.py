"""P3 generalized neighborhood attention: stride 1 is neighborhood and stride = kernel is blocked attention, the
tiled fast path and FlexAttention against the dense reference beyond the conformance suite's 1-D shapes, a user mask
and bias, and parameter errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.masks.neighborhood import generalized_neighborhood, neighborhood
from attnzoo.masks.partitions import window_partition
from tests.helpers import assert_decodes, assert_matches_reference, dense_mask, qkv


def test_gna_stride_one_is_neighborhood_and_stride_kernel_is_blocked():
    layout, kernel, dilation = (6, 10), (3, 5), (2, 1)
    for causal in ((False, False), (True, False), (True, True)):
        assert torch.equal(dense_mask(generalized_neighborhood(layout, kernel, (1, 1), dilation, causal), 60),
                           dense_mask(neighborhood(layout, kernel, dilation, causal), 60))
    blocked = dense_mask(generalized_neighborhood((6, 10), (3, 5), (3, 5), (1, 1), (False, False)), 60)
    assert torch.equal(blocked, dense_mask(window_partition((6, 10), (3, 5)), 60))
    q, k, v = qkv(1, 2, 2, 60, requires_grad=True)
    kw = dict(kernel_size=(3, 5), dilation=(2, 1), layout=(6, 10))
    torch.testing.assert_close(az.attention(q, k, v, method="generalized_neighborhood", stride=1, **kw),
                               az.attention(q, k, v, method="neighborhood", **kw))


GNA_PARAMS = [
    dict(kernel_size=31, stride=4, dilation=3),  # 300 = 3 groups of 100; tiles of 128 → 128 (multiple of 4)
    dict(kernel_size=31, stride=31),  # blocked, tiles of 124
    dict(kernel_size=(5, 7), stride=(2, 3), dilation=(2, 1), layout=(15, 20)),
    dict(kernel_size=(5, 7), stride=(3, 2), layout=(15, 20), is_causal=(True, False)),
    dict(kernel_size=(3, 5, 3), stride=(2, 5, 3), dilation=(1, 1, 2), layout=(5, 6, 10)),
]


@pytest.mark.parametrize("params", GNA_PARAMS)
@pytest.mark.parametrize("causal", [False, True])
def test_gna_torch_matches_reference(params, causal):
    q, k, v = qkv(2, 4, 2, 300, requires_grad=True)
    assert_matches_reference("generalized_neighborhood", q, k, v, causal=causal, **params)


@pytest.mark.flex
def test_gna_flex_matches_reference():
    q, k, v = (t.detach().float() for t in qkv(1, 2, 2, 300, requires_grad=True))
    kw = dict(method="generalized_neighborhood", kernel_size=(5, 7), stride=(2, 3), dilation=(2, 1), layout=(15, 20),
              is_causal=(True, False))
    torch.testing.assert_close(az.attention(q, k, v, backend="flex", **kw),
                               az.attention(q, k, v, backend="reference", **kw), atol=1e-5, rtol=1e-5)


def test_gna_user_mask_and_bias():
    q, k, v = qkv(1, 2, 1, 65, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(1, 1, 65, 65, generator=g) > 0.3
    bias = torch.randn(1, 2, 65, 65, generator=g, dtype=torch.float64)
    assert_matches_reference("generalized_neighborhood", q, k, v, mask=mask, bias=bias, kernel_size=(3, 5),
                             stride=(2, 3), layout=(5, 13))


@pytest.mark.parametrize(
    ("params", "needle"),
    [(dict(kernel_size=5, stride=6), "stride"), (dict(kernel_size=4, stride=2), "kernel_size"),
     (dict(kernel_size=3, layout=(5, 7)), "layout"), (dict(kernel_size=(3, 3), stride=(1, 2, 1), layout=(6, 5)),
     "stride"), (dict(kernel_size=41), "kernel_size"), (dict(kernel_size=5, stride=0), "stride")],
)
def test_gna_errors(params, needle):
    q = torch.randn(1, 2, 30, 8)
    with pytest.raises(AttnzooError, match=needle):
        az.attention(q, q, q, method="generalized_neighborhood", **params)


@pytest.mark.parametrize("params", [
    {"layout": (5, 6), "kernel_size": 3, "stride": (2, 3), "dilation": (1, 2)},
    {"layout": (2, 3, 5), "kernel_size": (1, 3, 3), "stride": (1, 2, 3)},
    {"layout": (30,), "kernel_size": 5, "stride": 3},
])
def test_gna_decodes_ragged_prompts_that_start_the_layout(params: dict) -> None:
    assert_decodes("generalized_neighborhood", *qkv(2, 4, 2, 30), [11, 7], **params)


def test_gna_decoding_keeps_a_ring_of_its_look_back_on_a_large_grid() -> None:
    q, k, v = qkv(1, 2, 1, 96, seed=1)
    state = assert_decodes("generalized_neighborhood", q, k, v, [80], layout=(8, 12), kernel_size=3, stride=2)
    assert state.data.ring == state.data.slots == 2 * 12 + 2 + 1  # (k − 1)·12 + (k − 1) + 1


def test_gna_decoding_with_a_stride_needs_the_layout_and_stops_at_its_end() -> None:
    q, k, v = qkv(1, 2, 2, 8)
    with pytest.raises(AttnzooError, match="layout"):
        az.prefill(q, k, v, method="generalized_neighborhood", kernel_size=3, stride=2)
    _, state = az.prefill(q, k, v, method="generalized_neighborhood", kernel_size=3, stride=2, layout=(8,))
    with pytest.raises(AttnzooError, match="layout"):
        az.step(state, q[:, :, :1], k[:, :, :1], v[:, :, :1])
