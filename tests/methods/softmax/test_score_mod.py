"""S8 score modifiers: ALiBi slopes as in the paper, ALiBi as a linear distance bias (also when decoding a chunk),
the softcap before the bias, neutral modifiers are softmax, bad parameters refused, FlexAttention against torch."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.softmax.score_mod import alibi_slopes
from tests.helpers import qkv


def test_alibi_slopes_match_the_paper() -> None:
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(4) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    # not a power of two: the 8-head slopes, then every other slope of the 16-head series
    assert alibi_slopes(12) == [2.0**-i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_is_a_linear_distance_bias(backend: str, causal: bool) -> None:
    q, k, v = qkv(2, 8, 8, 6, skv=10)
    slopes = torch.tensor(alibi_slopes(8), dtype=q.dtype).view(1, 8, 1, 1)
    rows = torch.arange(6).view(-1, 1) + 4  # bottom-right aligned query positions
    distance = (rows - torch.arange(10).view(1, -1)).abs().to(q.dtype)
    want = az.attention(q, k, v, causal=causal, bias=-slopes * distance)
    got = az.attention(q, k, v, method="score_mod", alibi=True, causal=causal, backend=backend)
    torch.testing.assert_close(got, want)


def test_alibi_decode_chunk_matches_full_sequence() -> None:
    q, k, v = qkv(2, 4, 2, 12)
    slopes = torch.rand(4, dtype=q.dtype)
    full = az.attention(q, k, v, method="score_mod", alibi=slopes, causal=True, backend="torch")
    tail = az.attention(q[:, :, -3:], k, v, method="score_mod", alibi=slopes, causal=True, backend="torch")
    torch.testing.assert_close(tail, full[:, :, -3:])


def test_softcap_bounds_the_logits_before_the_bias() -> None:
    q, k, v = qkv(2, 4, 2, 5)
    q = 50 * q
    bias = torch.randn(1, 4, 5, 5, dtype=q.dtype)
    cap = 3.0
    logits = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / math.sqrt(8)
    want = torch.softmax(cap * torch.tanh(logits / cap) + bias, dim=-1) @ v.repeat_interleave(2, dim=1)
    got = az.attention(q, k, v, method="score_mod", softcap=cap, bias=bias, backend="torch")
    torch.testing.assert_close(got, want)


def test_score_mod_neutral_is_softmax() -> None:
    q, k, v = qkv(2, 4, 2, 13)
    bias = torch.randn(2, 1, 13, 13, dtype=q.dtype)
    torch.testing.assert_close(
        az.attention(q, k, v, method="score_mod", bias=bias, causal=True, backend="torch"),
        az.attention(q, k, v, bias=bias, causal=True),
    )


def test_score_mod_rejects_bad_parameters() -> None:
    q, k, v = qkv(2, 4, 2, 13)
    with pytest.raises(AttnzooError, match="softcap"):
        az.attention(q, k, v, method="score_mod", softcap=-1.0)
    with pytest.raises(AttnzooError, match="alibi"):
        az.attention(q, k, v, method="score_mod", alibi=torch.ones(3, dtype=q.dtype))
    with pytest.raises(AttnzooError, match="alibi"):
        az.attention(q, k, v, method="score_mod", alibi="yes")


def test_score_mod_flex_matches_torch() -> None:
    """One FlexAttention compile: every modifier at once, causal cross, GQA, a fully masked row."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 7, 16, generator=g)
    k = torch.randn(1, 2, 11, 16, generator=g)
    v = torch.randn(1, 2, 11, 16, generator=g)
    bias = torch.randn(1, 4, 1, 11, generator=g)
    mask = torch.rand(1, 1, 7, 11, generator=g) > 0.2
    mask[..., 2, :] = False
    params = {"alibi": True, "softcap": 4.0, "causal": True, "bias": bias, "mask": mask}
    got = az.attention(q, k, v, method="score_mod", backend="flex", **params)
    want = az.attention(q, k, v, method="score_mod", backend="torch", **params)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got[..., 2, :] == 0).all()
