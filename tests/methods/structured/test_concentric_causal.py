"""P13 concentric causal attention: the fast path against the dense reference (with and without an image grid), a
user mask, bias and empty rows, and parameter errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import assert_decodes, assert_matches_reference, qkv


@pytest.mark.parametrize("params", [dict(layout=(16, 20), image_start=37), dict(layout=(3, 130), image_start=0),
                                    dict(layout=None)])
@pytest.mark.parametrize("return_lse", [False, True])
def test_concentric_torch_matches_reference(params, return_lse):
    q, k, v = qkv(2, 4, 2, 400, requires_grad=True)
    assert_matches_reference("concentric_causal", q, k, v, causal=True, return_lse=return_lse, **params)


@pytest.mark.parametrize("return_lse", [False, True])
def test_concentric_user_mask_bias_and_empty_rows(return_lse):
    q, k, v = qkv(2, 4, 2, 300, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, 300, 300, generator=g) > 0.3
    mask[..., 7, :] = False
    bias = torch.randn(1, 4, 300, 300, generator=g, dtype=torch.float64)
    assert_matches_reference("concentric_causal", q, k, v, causal=True, mask=mask, bias=bias, layout=(12, 12),
                             image_start=100, return_lse=return_lse)
    out = az.attention(q, k, v, method="concentric_causal", causal=True, mask=mask, layout=(12, 12),
                       return_lse=return_lse)
    if return_lse:
        out, lse = out
        assert bool(torch.isneginf(lse[:, :, 7]).all())
    assert out[:, :, 7].abs().max() == 0


@pytest.mark.parametrize(("params", "name"), [(dict(layout=(5, 5), image_start=10), "layout"),
                                              (dict(layout=(5,)), "layout"), (dict(layout=(0, 3)), "layout"),
                                              (dict(image_start=-1), "image_start")])
def test_concentric_errors(params, name):
    q, k, v = qkv(1, 2, 2, 30, requires_grad=True)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="concentric_causal", causal=True, **params)
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="concentric_causal", layout=(2, 2))


def test_concentric_causal_decodes_the_text_after_an_image_held_by_the_prompt() -> None:
    assert_decodes("concentric_causal", *qkv(2, 4, 2, 24), [14, 11], layout=(3, 3), image_start=2)


def test_concentric_causal_decoding_refuses_a_prompt_without_the_whole_image() -> None:
    q, k, v = qkv(2, 2, 2, 12)
    with pytest.raises(AttnzooError, match="layout"):
        az.prefill(q[:, :, :8], k[:, :, :8], v[:, :, :8], method="concentric_causal", layout=(3, 3), image_start=2)
    with pytest.raises(AttnzooError, match="lengths"):
        az.prefill(q, k, v, method="concentric_causal", layout=(3, 3), image_start=2, lengths=torch.tensor([12, 9]))
