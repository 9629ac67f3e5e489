"""The banded tiled kernel (used by neighborhood and sliding-window attention): user masks, biases and empty rows,
and tiny chunks that force several gathered and bounded chunks, checkpointed under autograd."""

from __future__ import annotations

import torch

import attnzoo as az
from attnzoo.kernels import band
from tests.helpers import assert_matches_reference, qkv


def test_user_mask_bias_and_empty_rows():
    q, k, v = qkv(2, 4, 2, 65, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, 65, 65, generator=g) > 0.3
    mask[..., 3, :] = False  # a row that sees nothing gives zeros, not NaN
    bias = torch.randn(1, 4, 65, 65, generator=g, dtype=torch.float64)
    for method, params in (("neighborhood", dict(kernel_size=(3, 5), layout=(5, 13))), ("sliding_window",
                           dict(window=4))):
        assert_matches_reference(method, q, k, v, mask=mask, bias=bias, **params)
        out = az.attention(q, k, v, method=method, mask=mask, **params)
        assert not out.isnan().any() and bool((out[:, :, 3] == 0).all())


def test_small_chunks_gather_and_checkpoint(monkeypatch):
    """Tiny chunks force several gathered (2-D) and bounded (masked 1-D) chunks, checkpointed under autograd."""
    monkeypatch.setattr(band, "CHUNK_BYTES", 1)
    q, k, v = qkv(1, 2, 1, 300, requires_grad=True)
    assert_matches_reference("neighborhood", q, k, v, kernel_size=(3, 5), layout=(15, 20))
    mask = torch.rand(300, 300, generator=torch.Generator().manual_seed(2)) > 0.2
    assert_matches_reference("sliding_window", q, k, v, mask=mask, window=40)


def test_band_chunks_written_into_one_output_match_reference(monkeypatch):
    monkeypatch.setattr(band, "CHUNK_BYTES", 1 << 12)  # many chunks
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 200, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(200, 200, generator=g) < 0.8
    ref = az.attention(q, k, v, method="neighborhood", kernel_size=15, mask=mask, backend="reference")
    with torch.no_grad():
        out = az.attention(q, k, v, method="neighborhood", kernel_size=15, mask=mask, backend="torch")
    torch.testing.assert_close(out, ref)


def test_return_lse_in_small_chunks_with_mask_bias_and_empty_rows(monkeypatch):
    """The log-sum-exp path: gathered and strided chunks (checkpointed under autograd), GQA, a user mask with a row
    that sees nothing (0 and -inf), a bias, and the chunk-by-chunk path without autograd."""
    monkeypatch.setattr(band, "CHUNK_BYTES", 1 << 12)
    q, k, v = qkv(1, 4, 2, 65, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(1, 1, 65, 65, generator=g) > 0.3
    mask[..., 3, :] = False
    bias = torch.randn(1, 4, 65, 65, generator=g, dtype=torch.float64)
    for method, params in (("neighborhood", dict(kernel_size=(3, 5), layout=(5, 13))), ("sliding_window",
                           dict(window=4))):
        assert_matches_reference(method, q, k, v, mask=mask, bias=bias, return_lse=True, **params)
        assert_matches_reference(method, q, k, v, causal=True, return_lse=True, **params)
        with torch.no_grad():
            out, lse = az.attention(q, k, v, method=method, mask=mask, return_lse=True, backend="torch", **params)
        ref, ref_lse = az.attention(q, k, v, method=method, mask=mask, return_lse=True, backend="reference", **params)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(lse, ref_lse)
        assert bool((out[:, :, 3] == 0).all()) and bool(torch.isneginf(lse[:, :, 3]).all())
