"""L5 NaLaFormer and L7 EcoFormer: parallel = chunked = recurrent, gradients, the methods' defining properties."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.linear import ecoformer, nala

F64 = torch.float64


def _qkv(gen: torch.Generator, n: int, heads: int = 4, kv_heads: int = 2, d: int = 6, dv: int = 3) -> tuple:
    return (
        torch.randn(2, heads, n, d, generator=gen, dtype=F64),
        torch.randn(2, kv_heads, n, d, generator=gen, dtype=F64),
        torch.randn(2, kv_heads, n, dv, generator=gen, dtype=F64),
    )


def _eco_params(gen: torch.Generator, kv_heads: int = 2, d: int = 6, m: int = 7, bits: int = 5) -> dict[str, Any]:
    return {
        "anchors": torch.randn(kv_heads, m, d, generator=gen, dtype=F64),
        "hash_weight": torch.randn(kv_heads, bits, m, generator=gen, dtype=F64),
        "kernel_mean": 0.3 * torch.rand(kv_heads, m, generator=gen, dtype=F64),
    }


CASES = [
    ("nala", nala, lambda gen: {"alpha": 2.0}),
    ("ecoformer", ecoformer, _eco_params),
]


@pytest.mark.parametrize(("name", "module", "make"), CASES)
def test_reference_chunked_prefill_step_agree(name: str, module: Any, make: Any) -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen, 23)
    params = {**make(gen), "chunk_size": 5}  # 5 does not divide 23
    ref = az.attention(q, k, v, method=name, causal=True, backend="reference", **params)
    torch.testing.assert_close(az.attention(q, k, v, method=name, causal=True, **params), ref)
    out, state = module.prefill(q[:, :, :13], k[:, :, :13], v[:, :, :13], **params)
    outs = [out]
    for t in range(13, 23):
        o_t, state = module.step(state, q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], **params)
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, dim=2), ref)
    # the state after a prefill of everything equals the state reached by steps
    _, full_state = module.prefill(q, k, v, **params)
    torch.testing.assert_close(full_state, state)
    # noncausal cross lengths
    kc, vc = k[:, :, :17], v[:, :, :17]
    torch.testing.assert_close(
        az.attention(q, kc, vc, method=name, **params),
        az.attention(q, kc, vc, method=name, backend="reference", **params),
    )


@pytest.mark.parametrize(("name", "module", "make"), CASES)
def test_gradients_agree(name: str, module: Any, make: Any) -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v = (t.requires_grad_() for t in _qkv(gen, 19))
    params = {name_: t.requires_grad_() if isinstance(t, torch.Tensor) else t for name_, t in make(gen).items()}
    params["chunk_size"] = 8
    leaves = [q, k, v, *(t for t in params.values() if isinstance(t, torch.Tensor))]
    grads = []
    for backend in ("reference", "torch"):
        out = az.attention(q, k, v, method=name, causal=True, backend=backend, **params)
        grads.append(torch.autograd.grad((out * out.detach().cos()).sum(), leaves))
    for ref_g, fast_g in zip(*grads, strict=True):
        assert bool(torch.isfinite(fast_g).all())
        torch.testing.assert_close(fast_g, ref_g)
    # the straight-through estimator lets the hash parameters and the queries learn
    assert all(float(g.abs().sum()) > 0 for g in grads[1][:2])


def _entropy(w: torch.Tensor) -> torch.Tensor:
    return -(w * w.clamp_min(1e-30).log()).sum(-1)


def test_nala_query_norm_sharpens_the_weights() -> None:
    """Softmax-like: the same direction with a larger norm gives a spikier (lower-entropy) distribution."""
    gen = torch.Generator().manual_seed(5)
    q, k, _ = _qkv(gen, 64, heads=2, kv_heads=2, d=8)
    entropies = []
    for c in (0.2, 1.0, 5.0):
        qf, kf = nala.features(q * c, k, 3.0, 3)
        a = qf @ kf.transpose(-1, -2)
        entropies.append(_entropy(a / a.sum(-1, keepdim=True)).mean())
    assert entropies[0] > entropies[1] > entropies[2]
    # plain normalised linear attention would be norm-blind: features are non-negative, zero queries give 0
    qf, kf = nala.features(torch.zeros(1, 1, 2, 8, dtype=F64), k[:1, :1], 3.0, 3)
    assert bool((qf == 0).all()) and bool((kf >= 0).all())
    out = az.attention(torch.zeros(1, 1, 2, 8), k[:1, :1, :2].float(), k[:1, :1, :2].float(), method="nala")
    assert bool((out == 0).all())
    with pytest.raises(AttnzooError, match="key_power"):
        az.attention(q, k, k, method="nala", key_power=2)


def test_ecoformer_codes_and_hamming_weights() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, v = _qkv(gen, 12, heads=2, kv_heads=2)
    params = {**_eco_params(gen, bits=4), "bandwidth": 2.0}
    h = ecoformer.hash_codes(q, params, 2)
    assert h.shape == (2, 2, 12, 4) and bool(((h == 1) | (h == -1)).all())
    # a key with the query's own code scores 2b + 1, the opposite code 1: keys equal to the queries attend to
    # themselves most, and scaling a vector does not change its code (the hash sees the direction only)
    torch.testing.assert_close(ecoformer.hash_codes(3.0 * q, params, 2), h)
    qf, kf = ecoformer.features(q, q, params)
    a = qf @ kf.transpose(-1, -2)
    assert bool((a.diagonal(dim1=-2, dim2=-1) == 9).all()) and float(a.min()) >= 1
    # defaults draw the hash from the seed; mismatched sizes are refused naming the argument
    out = az.attention(q.float(), k.float(), v.float(), method="ecoformer", causal=True, bits=8, num_anchors=5)
    assert bool(torch.isfinite(out).all())
    with pytest.raises(AttnzooError, match="hash_weight"):
        az.attention(q, k, v, method="ecoformer", anchors=params["anchors"], hash_weight=torch.randn(2, 4, 3))
    with pytest.raises(AttnzooError, match="anchors"):
        az.attention(q, k, v, method="ecoformer", anchors=torch.randn(3, 7, 6, dtype=F64))


def test_ecoformer_layer_owns_the_hash() -> None:
    layer = az.nn.Attention(32, 4, kv_heads=2, method="ecoformer", causal=True, bits=8, num_anchors=6)
    assert set(ecoformer.NAMES) <= set(layer.learnable.keys())
    assert tuple(layer.learnable["hash_weight"].shape) == (2, 8, 6)
    assert tuple(layer.learnable["anchors"].shape) == (2, 6, 8)
    x = torch.randn(2, 9, 32)
    layer(x).square().sum().backward()
    assert float(layer.learnable["hash_weight"].grad.abs().sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["nala", "ecoformer"])
def test_long_sequences_stay_finite(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = ((3 * torch.randn(1, 1, 65536, 8, generator=gen)).to(dtype) for _ in range(3))
    out = az.attention(q, k, v, method=name, causal=True)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
