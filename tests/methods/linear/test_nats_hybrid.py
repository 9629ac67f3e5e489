"""L11 nats_hybrid: parallel = chunked = recurrent, routing limits, learnable scorer, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import F64, decode_each_token, decoding, qkv


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


@pytest.mark.parametrize("kind", ["flags", "scorer"])
@pytest.mark.parametrize(("n", "chunk"), [(37, 8), (5, 16)])
def test_parallel_chunked_recurrent_agree(kind: str, n: int, chunk: int) -> None:
    q, k, v = qkv(2, 4, 2, n, 6, 5)
    for t in (q, k, v):
        t.requires_grad_(True)
    params = {**_params(kind, 2, 4, 2, n, 6), "chunk_size": chunk}
    ref = az.attention(q, k, v, method="nats_hybrid", causal=True, backend="reference", **params)
    fast = az.attention(q, k, v, method="nats_hybrid", causal=True, backend="torch", **params)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-9)

    out, state = decoding("nats_hybrid").prefill(q, k, v, **params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    decoded, rec = decode_each_token(decoding("nats_hybrid"), q, k, v, params)
    torch.testing.assert_close(decoded, ref, atol=1e-10, rtol=1e-9)
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
    q, k, v = qkv(1, 4, 2, 29, 8, 8, seed=1)
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
    q, k, v = qkv(1, 2, 1, 300, 4, 4, seed=3)
    flags = torch.zeros(1, 1, 300, dtype=torch.bool)
    flags[..., 280] = True  # the first query block (256 rows) sees no retained key
    params = {"flags": flags, "beta": 0.0}  # β = 0: the state stays empty, only the softmax part is left
    out = az.attention(q, k, v, method="nats_hybrid", causal=True, **params)
    torch.testing.assert_close(out, az.attention(q, k, v, method="nats_hybrid", causal=True, backend="reference",
                                                 **params))
    assert bool((out[:, :, :280] == 0).all()) and bool((out[:, :, 280:] != 0).all())


def test_prefill_then_decode_and_cache_size() -> None:
    q, k, v = qkv(1, 4, 1, 60, 8, 8, seed=2)
    flags = torch.zeros(1, 1, 60, dtype=torch.bool)
    flags[..., ::10] = True
    full = az.attention(q, k, v, method="nats_hybrid", causal=True, flags=flags)
    out, state = decoding("nats_hybrid").prefill(q[:, :, :45], k[:, :, :45], v[:, :, :45], flags=flags[..., :45])
    assert state.keys.shape[2] == 5  # only retained tokens are cached
    outs = [out]
    for t in range(45, 60):
        o_t, state = decoding("nats_hybrid").step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1],
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
    q, k, v = qkv(1, 2, 1, 4096, 16, 16, seed=4, dtype=dtype)
    flags = torch.rand(1, 1, 4096, generator=torch.Generator().manual_seed(0)) < 0.02
    out = az.attention(q * 10, k * 10, v, method="nats_hybrid", causal=True, flags=flags)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_bad_routing_is_refused() -> None:
    q, k, v = qkv(1, 2, 2, 8, 4, 4)
    with pytest.raises(AttnzooError, match="flags"):
        az.attention(q, k, v, method="nats_hybrid", causal=True)
    with pytest.raises(AttnzooError, match="flags"):
        az.attention(q, k, v, method="nats_hybrid", causal=True, flags=torch.ones(1, 2, 8))
    with pytest.raises(AttnzooError, match="scorer_weight"):
        az.attention(q, k, v, method="nats_hybrid", causal=True, scorer_weight=torch.ones(2, 5, dtype=F64))
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="nats_hybrid", causal=False, flags=torch.ones(1, 2, 8, dtype=torch.bool))
