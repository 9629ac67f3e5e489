"""S5 energy-gated attention: the gate is the paper's σ(α(z − τ)) of z-scored key energies (over the prefix when
causal), the output is the paper's renormalised gated softmax, a constant gate is softmax, gradients reach u, τ and
α, causal outputs ignore later keys, the layer owns the parameters, and bad parameters name themselves."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.softmax.energy_gated import log_gates
from tests.helpers import qkv

BACKENDS = ["sdpa", "reference"]


def _params(kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "energy_proj": torch.randn(kv_heads, head_dim, generator=g, dtype=dtype),
        "threshold": 0.35 + 0.2 * torch.randn(kv_heads, generator=g, dtype=dtype),
        "sharpness": 2.0 + torch.rand(kv_heads, generator=g, dtype=dtype),
    }


def _zscore(e: torch.Tensor) -> torch.Tensor:
    return (e - e.mean(-1, keepdim=True)) / e.std(-1, keepdim=True, correction=0)


@pytest.mark.parametrize("causal", [False, True])
def test_gate_is_the_sigmoid_of_the_zscored_energy(causal: bool) -> None:
    _, k, _ = qkv(2, 4, 2, 12)
    p = _params(2, 8, k.dtype)
    gate = log_gates(k, p["energy_proj"], p["threshold"], p["sharpness"], causal).exp()
    e = torch.einsum("bgsd,gd->bgs", k, p["energy_proj"])
    if causal:  # key j z-scored against keys 0..j (the first key alone: z = 0)
        z = torch.stack([torch.zeros_like(e[..., 0])] + [_zscore(e[..., : j + 1])[..., -1] for j in range(1, 12)], -1)
    else:
        z = _zscore(e)
    want = torch.sigmoid(p["sharpness"].view(1, 2, 1) * (z - p["threshold"].view(1, 2, 1)))
    torch.testing.assert_close(gate, want)
    assert bool(((gate > 0) & (gate < 1)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_the_papers_renormalised_gated_softmax(backend: str) -> None:
    q, k, v = qkv(2, 4, 2, 9, skv=11)
    p = _params(2, 8, q.dtype)
    gate = log_gates(k, p["energy_proj"], p["threshold"], p["sharpness"], causal=False).exp()
    a = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8**0.5, dim=-1)
    att = a * gate.repeat_interleave(2, 1).unsqueeze(-2)
    want = (att / att.sum(-1, keepdim=True)) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(az.attention(q, k, v, method="energy_gated", backend=backend, **p), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_a_constant_gate_is_softmax_attention(backend: str, causal: bool) -> None:
    q, k, v = qkv(2, 4, 2, 10)
    p = _params(2, 8, q.dtype)
    want = az.attention(q, k, v, causal=causal)
    opened = {**p, "threshold": -1e4, "sharpness": 1.0}  # g = σ(≈1e4) == 1 for every key
    flat = {**p, "sharpness": 0.0}  # g = σ(0) = 1/2 for every key: renormalised away
    for params in (opened, flat, {}):
        got = az.attention(q, k, v, method="energy_gated", causal=causal, backend=backend, **params)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_reach_every_gate_parameter_and_match_the_reference(causal: bool) -> None:
    q, k, v = qkv(2, 4, 2, 9)
    params = {name: t.requires_grad_() for name, t in _params(2, 8, q.dtype).items()}
    grads = []
    for backend in BACKENDS:
        out = az.attention(q, k, v, method="energy_gated", causal=causal, backend=backend, **params)
        grads.append(torch.autograd.grad(out.square().sum(), list(params.values())))
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref)
        assert fast.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_outputs_do_not_depend_on_later_keys(backend: str) -> None:
    q, k, v = qkv(1, 4, 2, 16)
    p = _params(2, 8, q.dtype)
    cut = 7
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1 :] = 10 * torch.randn_like(k2[:, :, cut + 1 :])  # energies far out of the earlier range
    v2[:, :, cut + 1 :] = torch.randn_like(v2[:, :, cut + 1 :])
    before = az.attention(q, k, v, method="energy_gated", causal=True, backend=backend, **p)
    after = az.attention(q, k2, v2, method="energy_gated", causal=True, backend=backend, **p)
    torch.testing.assert_close(after[:, :, : cut + 1], before[:, :, : cut + 1], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, cut + 1 :], before[:, :, cut + 1 :])


def test_layer_owns_and_trains_the_gate_parameters() -> None:
    torch.manual_seed(0)
    layer = az.nn.Attention(32, heads=4, kv_heads=2, method="energy_gated", causal=True)
    shapes = {name: tuple(t.shape) for name, t in layer.learnable.items()}
    assert shapes == {"energy_proj": (2, 8), "threshold": (2,), "sharpness": (2,)}
    assert bool((layer.learnable["threshold"] == 0).all()) and bool((layer.learnable["sharpness"] == 2).all())
    layer(torch.randn(2, 12, 32)).square().mean().backward()
    for name, t in layer.learnable.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("threshold", torch.zeros(3)),
        ("threshold", torch.zeros(2, 1)),
        ("sharpness", -1.0),
        ("sharpness", torch.ones(4)),
        ("energy_proj", torch.zeros(4, 8)),
        ("energy_proj", torch.zeros(2, 8, dtype=torch.long)),
        ("energy_proj", 0.5),
    ],
)
def test_bad_parameters_name_themselves(name: str, value: object) -> None:
    q, k, v = qkv(1, 4, 2, 5)
    params = {**_params(2, 8, q.dtype), name: value}
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="energy_gated", **params)
