"""Local-family methods: the tiled fast path against the dense reference beyond the conformance suite's 1-D shapes
(2-D/3-D layouts, dilation, per-axis causal, sizes not dividing the tile, chunked gathers, user masks), and errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kernels import band


def qkv(b: int, h: int, hkv: int, sq: int, skv: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, h, sq, d), (b, hkv, skv, d), (b, hkv, skv, d))
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes)


def assert_matches_reference(method: str, q, k, v, causal=False, mask=None, bias=None, backend="torch", **params):
    ref = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend="reference", **params)
    out = az.attention(q, k, v, method=method, causal=causal, mask=mask, bias=bias, backend=backend, **params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    if backend == "torch":
        grad = torch.randn_like(ref)
        want = torch.autograd.grad(ref, (q, k, v), grad)
        got = torch.autograd.grad(out, (q, k, v), grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


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
    q, k, v = qkv(2, 4, 2, 300, 300)
    assert_matches_reference("neighborhood", q, k, v, causal=causal, **params)


@pytest.mark.parametrize(
    ("sq", "skv", "causal", "params"),
    [(300, 300, False, dict(window=20)), (300, 300, True, dict(window=20)), (300, 300, False, dict(window=20,
     inward=True)), (100, 300, False, dict(window=20)), (300, 100, True, dict(window=20)), (300, 100, False,
     dict(window=3)), (129, 129, False, dict(window=500))],
)
def test_sliding_window_torch_matches_reference(sq, skv, causal, params):
    q, k, v = qkv(2, 4, 2, sq, skv)
    assert_matches_reference("sliding_window", q, k, v, causal=causal, **params)


@pytest.mark.parametrize(
    ("method", "causal", "params"),
    [("dilated", False, dict(dilation=3, window=20)), ("dilated", True, dict(dilation=4)),
     ("halo", False, dict(block_size=16, halo_size=3)),
     ("halo", False, dict(block_size=(4, 6), halo_size=(1, 2), layout=(15, 20))),
     ("halo", False, dict(block_size=(2, 4, 3), halo_size=(1, 0, 2), layout=(5, 6, 10)))],
)
def test_dilated_and_halo_torch_match_reference(method, causal, params):
    q, k, v = qkv(2, 4, 2, 300, 300)
    assert_matches_reference(method, q, k, v, causal=causal, **params)


def test_user_mask_bias_and_empty_rows():
    q, k, v = qkv(2, 4, 2, 65, 65)
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
    q, k, v = qkv(1, 2, 1, 300, 300)
    assert_matches_reference("neighborhood", q, k, v, kernel_size=(3, 5), layout=(15, 20))
    mask = torch.rand(300, 300, generator=torch.Generator().manual_seed(2)) > 0.2
    assert_matches_reference("sliding_window", q, k, v, mask=mask, window=40)


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
    q, k, v = qkv(1, 2, 2, 32, 32)
    with pytest.raises(AttnzooError, match=needle):
        az.attention(q, k, v, method="neighborhood", **params)


def test_sliding_window_negative_window():
    q, k, v = qkv(1, 2, 2, 32, 32)
    with pytest.raises(AttnzooError, match="window"):
        az.attention(q, k, v, method="sliding_window", window=-1)


@pytest.mark.flex
def test_flex_backends_forward():
    with torch.no_grad():
        q, k, v = (t.float() for t in qkv(1, 2, 1, 300, 300))
        for method, causal, params in (("neighborhood", False, dict(kernel_size=(5, 7), dilation=(2, 1),
                                        layout=(15, 20))), ("sliding_window", True, dict(window=37))):
            ref = az.attention(q, k, v, method=method, causal=causal, backend="reference", **params)
            out = az.attention(q, k, v, method=method, causal=causal, backend="flex", **params)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
