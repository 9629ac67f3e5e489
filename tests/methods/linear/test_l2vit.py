"""L9 L2ViT: the fast path against the reference on layouts, its limits (ReLU linear attention, zero convolutions, the
denominator clamp), the local concentration stays local on the grid, the nn layer owns its parts, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import F64, qkv


def _lcm(h: int, dv: int, kernel: tuple[int, ...], seed: int = 5, zero: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=F64) if zero else torch.randn(*shape, generator=gen, dtype=F64) * 0.3

    return {"lcm_weight1": rnd(h, dv, *kernel), "lcm_bias1": rnd(h, dv),
            "lcm_weight2": rnd(h, dv, *kernel), "lcm_bias2": rnd(h, dv)}


@pytest.mark.parametrize(("layout", "kernel"), [((5, 7), (3, 5)), ((4, 9), (7, 7)), (None, (7,))])
def test_l2vit_fast_matches_reference_on_layouts(layout: tuple | None, kernel: tuple) -> None:
    n = 35 if layout is None else layout[0] * layout[1]
    q, k, v = qkv(2, 4, 2, n, 6, 5, seed=6)
    params = {**_lcm(4, 5, kernel), "layout": layout, "temperature": torch.rand(4, dtype=F64) + 0.5}
    leaves = [q, k, v, *(p for p in params.values() if torch.is_tensor(p))]
    for t in leaves:
        t.requires_grad_(True)
    ref = az.attention(q, k, v, method="l2vit", backend="reference", **params)
    fast = az.attention(q, k, v, method="l2vit", backend="torch", **params)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-9)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((fast * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), leaves),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)


def test_l2vit_limits() -> None:
    q, k, v = qkv(2, 4, 2, 24, 8, 8, seed=7)
    # no LCM, no clamp, τ = scale = 1: ReLU-kernel normalised linear attention
    torch.testing.assert_close(
        az.attention(q, k, v, method="l2vit", scale=1.0, min_denominator=0.0),
        az.attention(q, k, v, method="linear", feature_map="relu"),
    )
    # zero convolutions add nothing; the clamp divides by at least m
    plain = az.attention(q, k, v, method="l2vit")
    torch.testing.assert_close(az.attention(q, k, v, method="l2vit", layout=(4, 6), **_lcm(4, 8, (3, 3), zero=True)),
                               plain)
    big = az.attention(q, k, v, method="l2vit", min_denominator=1e6)
    assert float(big.abs().max()) < float(plain.abs().max()) * 1e-2


def test_l2vit_concentration_is_local_on_the_grid() -> None:
    q, k, v = qkv(1, 2, 2, 8 * 8, 4, 3, seed=8)
    params = {**_lcm(2, 3, (3, 3)), "layout": (8, 8)}
    base = az.attention(q, k, v, method="l2vit", **params)
    q2 = q.clone()
    q2[:, :, 2 * 8 + 3] += 1.0  # one query at row 2, column 3: only its own global output changes
    moved = (az.attention(q2, k, v, method="l2vit", **params) - base).abs().amax(dim=(0, 1, 3)).reshape(8, 8) > 0
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    reach = ((rows - 2).abs() <= 2) & ((cols - 3).abs() <= 2)  # two 3×3 convolutions reach 2 cells
    assert bool(moved[2, 3]) and not bool((moved & ~reach).any())
    assert int(moved.sum()) > 9  # the second convolution spreads beyond the first's 3×3


def test_l2vit_layer_owns_its_parts() -> None:
    torch.manual_seed(0)
    layer = az.nn.Attention(32, heads=4, method="l2vit", layout=(4, 5))
    shapes = {name: tuple(p.shape) for name, p in layer.learnable.items()}
    assert shapes == {"temperature": (4,), "lcm_weight1": (4, 8, 7, 7), "lcm_bias1": (4, 8),
                      "lcm_weight2": (4, 8, 7, 7), "lcm_bias2": (4, 8)}
    layer(torch.randn(2, 20, 32)).square().mean().backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in layer.learnable.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2vit_long_sequence_stays_finite(dtype: torch.dtype) -> None:
    q, k, v = qkv(1, 2, 1, 65536, 8, 8, seed=9, dtype=dtype)
    q[:, :, :10] = -1.0  # no positive query feature: the clamp keeps the row finite
    out = az.attention(q, k, v, method="l2vit", min_denominator=0.0, **{
        n: t.to(dtype) for n, t in _lcm(2, 8, (7,)).items()})
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_l2vit_bad_parts_are_refused() -> None:
    q, k, v = qkv(1, 2, 2, 12, 4, 4)
    with pytest.raises(AttnzooError, match="layout"):
        az.attention(q, k, v, method="l2vit", layout=(3, 5))
    with pytest.raises(AttnzooError, match="lcm_weight1"):
        az.attention(q, k, v, method="l2vit", layout=(3, 4), **_lcm(2, 4, (2, 2)))
    with pytest.raises(AttnzooError, match="lcm_weight1"):
        az.attention(q, k, v, method="l2vit", **{**_lcm(2, 4, (3,)), "lcm_weight2": None})
    with pytest.raises(AttnzooError, match="temperature"):
        az.attention(q, k, v, method="l2vit", temperature=torch.ones(3, dtype=F64))
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="l2vit", causal=True)
