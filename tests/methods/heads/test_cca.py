"""H4 CCA / CCGQA's functional core: what the conformance suite cannot know (the q-k mean and the value shift as the
paper defines them, causal convolutions, the parameters' shape errors, the KV bytes and FLOPs reported)."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.heads import cca

F64 = torch.float64


def latents(b: int = 2, h: int = 4, hkv: int = 2, n: int = 9, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, heads, n, d, generator=g, dtype=F64) for heads in (h, hkv, hkv))


def params(h: int = 4, hkv: int = 2, d: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {n: t.to(F64) for n, t in cca.initial_parameters(h, hkv, d, (2, 3)).items()}


def test_zero_convolutions_leave_the_qk_mean_normalised_as_the_paper_defines():
    """With both convolutions zero, q = √d·unit((q̃_h + k̃_g)/2) and k = τ_g·√d·unit(mean over g's heads of the same):
    written out here by hand, then plain softmax attention."""
    q, k, v = latents()
    d, group = q.shape[-1], 2
    zeros = {n: torch.zeros_like(t) for n, t in params().items() if n != "temperature"}
    tau = torch.tensor([0.5, 2.0], dtype=F64)
    out = az.attention(q, k, v, method="cca", causal=True, temperature=tau, value_shift=False, **zeros)

    m_q = (q + k.repeat_interleave(group, dim=1)) / 2
    m_k = torch.stack([m_q[:, 0:2].mean(1), m_q[:, 2:4].mean(1)], dim=1)
    unit = [math.sqrt(d) * x / x.norm(dim=-1, keepdim=True) for x in (m_q, m_k)]
    want = az.attention(unit[0], unit[1] * tau.view(1, 2, 1, 1), v, method="softmax", causal=True)
    torch.testing.assert_close(out, want)


def test_value_shift_takes_the_last_half_of_the_channels_from_the_previous_token():
    v = torch.arange(2 * 3 * 4, dtype=F64).view(1, 2, 3, 4)  # Hkv = 2, n = 3, dv = 4: channels 0-3 | 4-7
    shifted = cca.shift_values(v)
    torch.testing.assert_close(shifted[:, 0], v[:, 0])  # the first head: the first half of the 8 channels
    torch.testing.assert_close(shifted[:, 1, 1:], v[:, 1, :-1])
    assert bool((shifted[:, 1, 0] == 0).all())
    odd = torch.randn(1, 1, 5, 3, dtype=F64)  # 3 channels: the first 2 kept, the last one shifted
    got = cca.shift_values(odd)
    torch.testing.assert_close(got[..., :2], odd[..., :2])
    torch.testing.assert_close(got[..., 1:, 2], odd[..., :-1, 2])


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_convolutions_and_shift_are_causal(backend: str):
    """Changing token t's latents changes no output before t, in a causal call."""
    q, k, v = latents(n=12)
    p = params()
    out = az.attention(q, k, v, method="cca", causal=True, backend=backend, **p)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 7] += 3.0
    out2 = az.attention(q2, k2, v2, method="cca", causal=True, backend=backend, **p)
    torch.testing.assert_close(out[:, :, :7], out2[:, :, :7])
    assert not torch.allclose(out[:, :, 7:], out2[:, :, 7:])


def test_calls_are_deterministic():
    q, k, v = latents()
    p = params()
    first = az.attention(q, k, v, method="cca", causal=False, **p)
    assert torch.equal(first, az.attention(q, k, v, method="cca", causal=False, **p))


@pytest.mark.parametrize(
    ("name", "value"),
    [("conv_weight", torch.zeros(6, 8)), ("conv_weight", torch.zeros(5, 8, 2)),
     ("mix_weight", torch.zeros(6, 8, 4, 2)), ("mix_bias", torch.zeros(6, 7)), ("temperature", torch.zeros(4)),
     ("conv_bias", torch.zeros(6, 8, dtype=torch.long)), ("value_shift", 1)],
)
def test_bad_parameters_name_themselves(name: str, value: object):
    q, k, v = latents()
    good = params()
    with pytest.raises(AttnzooError, match=f"^{name}:"):
        az.attention(q, k, v, method="cca", **{**good, name: value})


def test_cross_attention_is_refused():
    q, k, v = latents()
    with pytest.raises(AttnzooError):
        az.attention(q[:, :, :5], k, v, method="cca", **params())


def test_decoding_caches_a_quarter_of_mha_kv_bytes():
    """The keys and values a CCA decoder holds for n tokens (C = 4: 2 latent heads of MHA's 8, same head dim) are
    the bytes :func:`cost` reports, a quarter of MHA's."""
    n, heads, d = 32, 8, 16
    q, k, v = (t.float() for t in latents(b=1, h=2, hkv=2, n=n, d=d))
    _, state = az.prefill(q, k, v, method="cca", **{n_: t.float() for n_, t in params(2, 2, d).items()})
    held = sum(t.numel() * t.element_size() for t in (state.data.keys, state.data.values))
    ours, mha = cca.cost(n, heads * d, 2, 2, d), cca.cost(n, heads * d, heads, heads, d, None)
    assert held == ours.kv_bytes
    assert ours.kv_bytes / mha.kv_bytes == 0.25
    assert ours.attention_flops / mha.attention_flops == 0.25


def test_cost_counts_visible_pairs_and_checks_its_arguments():
    causal, full = cca.cost(10, 64, 2, 1, 32, causal=True), cca.cost(10, 64, 2, 1, 32, causal=False)
    assert full.attention_flops == 2 * 2 * 100 * 64 and causal.attention_flops == 2 * 2 * 55 * 64
    assert full.kv_bytes == 2 * 10 * 32 * 4
    assert cca.cost(10, 64, 2, 1, 32, None).conv_flops == 0 < full.conv_flops
    assert full.flops == full.attention_flops + full.projection_flops + full.conv_flops
    with pytest.raises(AttnzooError, match="^n:"):
        cca.cost(0, 64, 2, 1, 32)
