"""Method-specific checks for S3 selective, S4 momentum, S7 topk, S8 score_mod and S9 urpe.

Only what the generic conformance suite cannot know: neutral parameters reduce to softmax, paper constants, boundary
and alignment conventions, parameter errors. Outputs are compared with S1 softmax (SDPA) or a hand-built bias.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.softmax.score_mod import alibi_slopes


def qkv(
    b: int = 2, h: int = 4, hkv: int = 2, sq: int = 13, skv: int = 13, d: int = 8, dv: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, skv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, skv, dv or d, generator=g, dtype=torch.float64)
    return q, k, v


def weights_of(method: str, q: torch.Tensor, k: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The attention weights, read off by attending over one-hot values (v = identity)."""
    b, hkv, skv, _ = k.shape
    eye = torch.eye(skv, dtype=q.dtype).expand(b, hkv, skv, skv)
    return az.attention(q, k, eye, method=method, **kwargs)


# --- S7 top-k -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_topk_with_k_at_least_seq_kv_is_softmax(backend: str) -> None:
    q, k, v = qkv(sq=9, skv=11)
    want = az.attention(q, k, v, causal=True)
    got = az.attention(q, k, v, method="topk", causal=True, top_k=11, backend=backend)
    torch.testing.assert_close(got, want)
    got = az.attention(q, k, v, method="topk", causal=True, top_k=1000, backend=backend)
    torch.testing.assert_close(got, want)


def test_topk_keeps_exactly_k_largest() -> None:
    q, k, _ = qkv(sq=17, skv=17)
    w = weights_of("topk", q, k, top_k=5, backend="torch")
    assert ((w > 0).sum(-1) == 5).all()
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)
    kept = logits.topk(5, dim=-1).indices
    assert (w.gather(-1, kept) > 0).all()


def test_topk_counts_only_visible_keys() -> None:
    q, k, _ = qkv(sq=8, skv=8)
    w = weights_of("topk", q, k, top_k=3, causal=True, backend="torch")
    assert ((w > 0).sum(-1) == torch.arange(1, 9).clamp(max=3)).all()
    assert (w.triu(1) == 0).all()


@pytest.mark.parametrize("bad", [0, -2, 2.5, "3"])
def test_topk_rejects_bad_k(bad: object) -> None:
    q, k, v = qkv()
    with pytest.raises(AttnzooError, match="top_k"):
        az.attention(q, k, v, method="topk", top_k=bad)


# --- S4 momentum ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_momentum_gamma_zero_is_softmax(backend: str) -> None:
    q, k, v = qkv()
    torch.testing.assert_close(
        az.attention(q, k, v, method="momentum", gamma=0.0, causal=True, backend=backend),
        az.attention(q, k, v, causal=True),
    )


def test_momentum_shear_and_first_token_boundary() -> None:
    q, k, v = qkv(hkv=4)
    gamma = 0.7
    # x̂_t = x_t + γ(x_t − x_{t−1}) with x_{−1} = x_0: the first token is left unchanged.
    sheared = [torch.cat((t[:, :, :1], t[:, :, 1:] + gamma * (t[:, :, 1:] - t[:, :, :-1])), dim=2) for t in (q, k)]
    torch.testing.assert_close(
        az.attention(q, k, v, method="momentum", gamma=gamma), az.attention(sheared[0], sheared[1], v)
    )


def test_momentum_refuses_cross_attention() -> None:
    q, k, v = qkv(sq=5, skv=9)
    with pytest.raises(AttnzooError, match="momentum"):
        az.attention(q, k, v, method="momentum")


# --- S8 score modifiers ---------------------------------------------------------------------------------------------


def test_alibi_slopes_match_the_paper() -> None:
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(4) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    # not a power of two: the 8-head slopes, then every other slope of the 16-head series
    assert alibi_slopes(12) == [2.0**-i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_is_a_linear_distance_bias(backend: str, causal: bool) -> None:
    q, k, v = qkv(h=8, hkv=8, sq=6, skv=10)
    slopes = torch.tensor(alibi_slopes(8), dtype=q.dtype).view(1, 8, 1, 1)
    rows = torch.arange(6).view(-1, 1) + 4  # bottom-right aligned query positions
    distance = (rows - torch.arange(10).view(1, -1)).abs().to(q.dtype)
    want = az.attention(q, k, v, causal=causal, bias=-slopes * distance)
    got = az.attention(q, k, v, method="score_mod", alibi=True, causal=causal, backend=backend)
    torch.testing.assert_close(got, want)


def test_alibi_decode_chunk_matches_full_sequence() -> None:
    q, k, v = qkv(sq=12, skv=12)
    slopes = torch.rand(4, dtype=q.dtype)
    full = az.attention(q, k, v, method="score_mod", alibi=slopes, causal=True, backend="torch")
    tail = az.attention(q[:, :, -3:], k, v, method="score_mod", alibi=slopes, causal=True, backend="torch")
    torch.testing.assert_close(tail, full[:, :, -3:])


def test_softcap_bounds_the_logits_before_the_bias() -> None:
    q, k, v = qkv(sq=5, skv=5)
    q = 50 * q
    bias = torch.randn(1, 4, 5, 5, dtype=q.dtype)
    cap = 3.0
    logits = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / math.sqrt(8)
    want = torch.softmax(cap * torch.tanh(logits / cap) + bias, dim=-1) @ v.repeat_interleave(2, dim=1)
    got = az.attention(q, k, v, method="score_mod", softcap=cap, bias=bias, backend="torch")
    torch.testing.assert_close(got, want)


def test_score_mod_neutral_is_softmax() -> None:
    q, k, v = qkv()
    bias = torch.randn(2, 1, 13, 13, dtype=q.dtype)
    torch.testing.assert_close(
        az.attention(q, k, v, method="score_mod", bias=bias, causal=True, backend="torch"),
        az.attention(q, k, v, bias=bias, causal=True),
    )


def test_score_mod_rejects_bad_parameters() -> None:
    q, k, v = qkv()
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


# --- S9 URPE --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_urpe_with_ones_is_softmax(backend: str) -> None:
    q, k, v = qkv()
    ones = torch.ones(4, 2 * 20 - 1, dtype=q.dtype)
    want = az.attention(q, k, v, causal=True)
    got = az.attention(q, k, v, method="urpe", urpe_coeffs=ones, causal=True, backend=backend)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(az.attention(q, k, v, method="urpe", causal=True, backend=backend), want)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_urpe_weights_are_softmax_times_toeplitz(backend: str) -> None:
    q, k, _ = qkv(sq=6, skv=6)
    max_len = 8
    coeffs = torch.randn(4, 2 * max_len - 1, dtype=q.dtype)
    w = weights_of("urpe", q, k, urpe_coeffs=coeffs, backend=backend)
    p = weights_of("softmax", q, k)
    for i in range(6):
        for j in range(6):
            torch.testing.assert_close(w[:, :, i, j], p[:, :, i, j] * coeffs[:, i - j + max_len - 1])


def test_urpe_coefficient_gradients_match_reference() -> None:
    q, k, v = qkv(sq=9, skv=9)
    coeffs = torch.randn(4, 2 * 9 - 1, dtype=q.dtype, requires_grad=True)
    grads = []
    for backend in ("torch", "reference"):
        out = az.attention(q, k, v, method="urpe", urpe_coeffs=coeffs, causal=True, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), coeffs)[0])
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][:, :8].abs().sum() == 0  # causal: negative distances i − j < 0 (columns < 8) are never used


def test_urpe_rejects_bad_coefficients_and_cross() -> None:
    q, k, v = qkv(sq=9, skv=9)
    for bad in (torch.ones(3, 17), torch.ones(4, 16), torch.ones(4, 15), torch.ones(4, 17, 1)):
        with pytest.raises(AttnzooError, match="urpe_coeffs"):
            az.attention(q, k, v, method="urpe", urpe_coeffs=bad.to(q.dtype))
    q2, k2, v2 = qkv(sq=4, skv=9)
    with pytest.raises(AttnzooError, match="urpe"):
        az.attention(q2, k2, v2, method="urpe")


# --- S3 selective ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_selective_with_neutral_temperatures_is_softmax(backend: str) -> None:
    q, k, v = qkv(sq=7, skv=10)
    neutral = {
        "query_temp": torch.zeros(4, 8, dtype=q.dtype),
        "pos_beta": torch.full((4,), 40.0, dtype=q.dtype),  # exp(−exp(40)) == 0 exactly
        "value_temp": torch.zeros(2, 8, dtype=q.dtype),
    }
    want = az.attention(q, k, v, causal=True)
    torch.testing.assert_close(az.attention(q, k, v, method="selective", causal=True, backend=backend, **neutral), want)
    torch.testing.assert_close(az.attention(q, k, v, method="selective", causal=True, backend=backend), want)


def test_selective_position_temperature_grows_with_log_context() -> None:
    q, k, v = qkv(h=2, hkv=2, sq=6, skv=6)
    beta = torch.tensor([0.0, -1.0], dtype=q.dtype)
    tau = 1 + torch.exp(-torch.exp(beta)).view(1, 2, 1, 1) * torch.log(torch.arange(1.0, 7.0, dtype=q.dtype)).view(
        1, 1, 6, 1
    )
    want = az.attention(q * tau, k, v, causal=True)
    torch.testing.assert_close(az.attention(q, k, v, method="selective", pos_beta=beta, causal=True), want)


def test_selective_temperature_gradients_match_reference() -> None:
    q, k, v = qkv(sq=9, skv=9)
    g = torch.Generator().manual_seed(5)
    params = {
        "query_temp": 0.3 * torch.randn(4, 8, generator=g, dtype=q.dtype),
        "pos_beta": torch.randn(4, generator=g, dtype=q.dtype),
        "value_temp": 0.3 * torch.randn(2, 8, generator=g, dtype=q.dtype),
    }
    params = {name: t.requires_grad_() for name, t in params.items()}
    grads = []
    for backend in ("sdpa", "reference"):
        out = az.attention(q, k, v, method="selective", causal=True, backend=backend, **params)
        grads.append(torch.autograd.grad(out.square().sum(), list(params.values())))
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref)
        assert fast.abs().sum() > 0


def test_selective_rejects_wrong_shapes() -> None:
    q, k, v = qkv()
    with pytest.raises(AttnzooError, match="query_temp"):
        az.attention(q, k, v, method="selective", query_temp=torch.zeros(2, 8, dtype=q.dtype))
    with pytest.raises(AttnzooError, match="value_temp"):
        az.attention(q, k, v, method="selective", value_temp=torch.zeros(4, 8, dtype=q.dtype))
    with pytest.raises(AttnzooError, match="pos_beta"):
        az.attention(q, k, v, method="selective", pos_beta=torch.zeros(4, 1, dtype=q.dtype))


# --- learnable parts in az.nn.Attention -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "learnable"),
    [
        ("selective", {}, {"query_temp": (8, 8), "pos_beta": (8,), "value_temp": (2, 8)}),
        ("urpe", {"max_len": 32}, {"urpe_coeffs": (8, 63)}),
    ],
)
def test_layer_owns_and_trains_the_learnable_parts(
    method: str, params: dict[str, object], learnable: dict[str, tuple[int, ...]]
) -> None:
    torch.manual_seed(0)
    layer = az.nn.Attention(64, 8, kv_heads=2, method=method, causal=True, **params)
    plain = az.nn.Attention(64, 8, kv_heads=2, method="softmax", causal=True)
    plain.load_state_dict(layer.state_dict(), strict=False)
    assert {n: tuple(p.shape) for n, p in layer.learnable.items()} == learnable
    x = torch.randn(2, 20, 64)
    out = layer(x)
    if method == "urpe":  # initialised to ones: starts as softmax attention
        torch.testing.assert_close(out, plain(x))
    out.square().sum().backward()
    for name, p in layer.learnable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
