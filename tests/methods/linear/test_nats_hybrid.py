"""L11 nats_hybrid: parallel = chunked = recurrent, routing limits, learnable scorer, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.linear import nats_hybrid

F64 = torch.float64


def _qkv(b: int, h: int, hkv: int, n: int, d: int, dv: int, seed: int = 0, dtype: torch.dtype = F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, n, dv, generator=gen, dtype=dtype)
    return q, k, v


def _params(kind: str, b: int, h: int, hkv: int, n: int, d: int) -> dict:
    gen = torch.Generator().manual_seed(3)
    gates = {
        "log_gate": torch.nn.functional.logsigmoid(torch.randn(b, h, n, generator=gen, dtype=F64) + 2.0),
        "beta": torch.rand(b, h, n, generator=gen, dtype=F64),
    }
    if kind == "flags":
        return {**gates, "flags": torch.rand(b, hkv, n, generator=gen) < 0.3}
    weight = torch.randn(hkv, d, generator=gen, dtype=F64).requires_grad_(True)
    return {**gates, "scorer_weight": weight, "scorer_bias": torch.zeros(hkv, dtype=F64, requires_grad=True)}


def _token(params: dict, t: int) -> dict:
    return {name: p[:, :, t : t + 1] if torch.is_tensor(p) and p.dim() == 3 else p for name, p in params.items()}


@pytest.mark.parametrize("kind", ["flags", "scorer"])
@pytest.mark.parametrize(("n", "chunk"), [(37, 8), (5, 16)])
def test_parallel_chunked_recurrent_agree(kind: str, n: int, chunk: int) -> None:
    q, k, v = _qkv(2, 4, 2, n, 6, 5)
    for t in (q, k, v):
        t.requires_grad_(True)
    params = {**_params(kind, 2, 4, 2, n, 6), "chunk_size": chunk}
    ref = az.attention(q, k, v, method="nats_hybrid", causal=True, backend="reference", **params)
    fast = az.attention(q, k, v, method="nats_hybrid", causal=True, backend="torch", **params)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-9)

    out, state = nats_hybrid.prefill(q, k, v, **params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    steps, rec = [], None
    for t in range(n):
        one = (x[:, :, t : t + 1] for x in (q, k, v))
        o_t, rec = nats_hybrid.step(rec, *one, **_token(params, t))
        steps.append(o_t)
    torch.testing.assert_close(torch.cat(steps, dim=2), ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(rec.delta, state.delta, atol=1e-10, rtol=1e-9)
    assert rec.keys.shape[2] >= int(state.positions.lt(n).sum(-1).max())  # the same retained tokens, padded

    leaves = [q, k, v, *(p for p in params.values() if torch.is_tensor(p) and p.requires_grad)]
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves)
    g_fast = torch.autograd.grad((fast * w).sum(), leaves)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8)
    if kind == "scorer":
        assert float(g_fast[-2].abs().sum()) > 0  # the router learns (straight-through)


def test_routing_extremes() -> None:
    q, k, v = _qkv(1, 4, 2, 29, 8, 8, seed=1)
    everything = torch.ones(1, 2, 29, dtype=torch.bool)
    # every token retained: the state stays empty and the layer is causal softmax attention
    torch.testing.assert_close(
        az.attention(q, k, v, method="nats_hybrid", causal=True, flags=everything),
        az.attention(q, k, v, method="softmax", causal=True),
    )
    # no token retained: the gated delta rule
    torch.testing.assert_close(
        az.attention(q, k, v, method="nats_hybrid", causal=True, flags=~everything, beta=0.5),
        az.attention(q, k, v, method="gated_delta", causal=True, beta=0.5),
    )


def test_rows_before_the_first_retained_token() -> None:
    q, k, v = _qkv(1, 2, 1, 300, 4, 4, seed=3)
    flags = torch.zeros(1, 1, 300, dtype=torch.bool)
    flags[..., 280] = True  # the first query block (256 rows) sees no retained key
    params = {"flags": flags, "beta": 0.0}  # β = 0: the state stays empty, only the softmax part is left
    out = az.attention(q, k, v, method="nats_hybrid", causal=True, **params)
    torch.testing.assert_close(out, az.attention(q, k, v, method="nats_hybrid", causal=True, backend="reference",
                                                 **params))
    assert bool((out[:, :, :280] == 0).all()) and bool((out[:, :, 280:] != 0).all())


def test_prefill_then_decode_and_cache_size() -> None:
    q, k, v = _qkv(1, 4, 1, 60, 8, 8, seed=2)
    flags = torch.zeros(1, 1, 60, dtype=torch.bool)
    flags[..., ::10] = True
    full = az.attention(q, k, v, method="nats_hybrid", causal=True, flags=flags)
    out, state = nats_hybrid.prefill(q[:, :, :45], k[:, :, :45], v[:, :, :45], flags=flags[..., :45])
    assert state.keys.shape[2] == 5  # only retained tokens are cached
    outs = [out]
    for t in range(45, 60):
        o_t, state = nats_hybrid.step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1],
                                      flags=flags[..., t : t + 1])
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-10, rtol=1e-9)
    assert state.keys.shape[2] == 6


def test_layer_owns_and_trains_the_scorer() -> None:
    torch.manual_seed(0)
    layer = az.nn.Attention(32, heads=4, kv_heads=2, method="nats_hybrid", causal=True)
    assert set(layer.learnable) == {"scorer_weight", "scorer_bias"}
    layer(torch.randn(2, 40, 32)).square().mean().backward()
    assert float(layer.learnable["scorer_weight"].grad.abs().sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_stays_finite(dtype: torch.dtype) -> None:
    q, k, v = _qkv(1, 2, 1, 4096, 16, 16, seed=4, dtype=dtype)
    flags = torch.rand(1, 1, 4096, generator=torch.Generator().manual_seed(0)) < 0.02
    out = az.attention(q * 10, k * 10, v, method="nats_hybrid", causal=True, flags=flags)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_bad_routing_is_refused() -> None:
    q, k, v = _qkv(1, 2, 2, 8, 4, 4)
    with pytest.raises(AttnzooError, match="flags"):
        az.attention(q, k, v, method="nats_hybrid", causal=True)
    with pytest.raises(AttnzooError, match="flags"):
        az.attention(q, k, v, method="nats_hybrid", causal=True, flags=torch.ones(1, 2, 8))
    with pytest.raises(AttnzooError, match="scorer_weight"):
        az.attention(q, k, v, method="nats_hybrid", causal=True, scorer_weight=torch.ones(2, 5, dtype=F64))
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="nats_hybrid", causal=False, flags=torch.ones(1, 2, 8, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------------
# L9 l2vit


def _lcm(h: int, dv: int, kernel: tuple[int, ...], seed: int = 5, zero: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=F64) if zero else torch.randn(*shape, generator=gen, dtype=F64) * 0.3

    return {"lcm_weight1": rnd(h, dv, *kernel), "lcm_bias1": rnd(h, dv),
            "lcm_weight2": rnd(h, dv, *kernel), "lcm_bias2": rnd(h, dv)}


@pytest.mark.parametrize(("layout", "kernel"), [((5, 7), (3, 5)), ((4, 9), (7, 7)), (None, (7,))])
def test_l2vit_fast_matches_reference_on_layouts(layout: tuple | None, kernel: tuple) -> None:
    n = 35 if layout is None else layout[0] * layout[1]
    q, k, v = _qkv(2, 4, 2, n, 6, 5, seed=6)
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
    q, k, v = _qkv(2, 4, 2, 24, 8, 8, seed=7)
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
    q, k, v = _qkv(1, 2, 2, 8 * 8, 4, 3, seed=8)
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
    q, k, v = _qkv(1, 2, 1, 65536, 8, 8, seed=9, dtype=dtype)
    q[:, :, :10] = -1.0  # no positive query feature: the clamp keeps the row finite
    out = az.attention(q, k, v, method="l2vit", min_denominator=0.0, **{
        n: t.to(dtype) for n, t in _lcm(2, 8, (7,)).items()})
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_l2vit_bad_parts_are_refused() -> None:
    q, k, v = _qkv(1, 2, 2, 12, 4, 4)
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
