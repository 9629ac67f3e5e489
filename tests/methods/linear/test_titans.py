"""L12 Titans memory: the chunked fast path against the token loop, the chunk size's meaning, the Miras losses, the
reductions to simpler rules, decoding across chunk borders and the library's errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kernels import memory_scan
from tests.helpers import qkv

F64 = torch.float64


def gates(b: int, h: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-token ``eta, theta, alpha`` in the ranges a layer's sigmoids give."""
    g = torch.Generator().manual_seed(seed)
    return {
        "eta": torch.sigmoid(torch.randn(b, h, n, generator=g, dtype=F64) + 1.0),
        "theta": 0.5 * torch.sigmoid(torch.randn(b, h, n, generator=g, dtype=F64)),
        "alpha": torch.sigmoid(torch.randn(b, h, n, generator=g, dtype=F64) - 3.0),
    }


def titans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, **params: Any) -> torch.Tensor:
    return az.attention(q, k, v, method="titans", causal=True, backend=backend, **params)


def token_by_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor,
                   alpha: torch.Tensor) -> torch.Tensor:
    """Titans eqs. (12)–(15) for one memory per (batch, head), written out: every gradient at the current memory."""
    b, h, n, _ = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for i in range(b):
        for j in range(h):
            memory = torch.zeros(k.shape[-1], v.shape[-1], dtype=q.dtype)
            momentum = torch.zeros_like(memory)
            for t in range(n):
                key, value = k[i, j, t], v[i, j, t]
                grad = torch.outer(key, memory.T @ key - value)  # ∇ ½‖Mᵀk − v‖² with respect to M
                momentum = eta[i, j, t] * momentum - theta[i, j, t] * grad
                memory = (1 - alpha[i, j, t]) * memory + momentum
                out[i, j, t] = memory.T @ q[i, j, t]
    return out


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_chunk_size_one_is_the_token_by_token_recurrence(backend: str) -> None:
    q, k, v = qkv(2, 3, 3, 11, 5, 4, seed=1)
    g = gates(2, 3, 11)
    got = titans(q, k, v, backend, scale=1.0, qk_l2norm=False, chunk_size=1, **g)
    torch.testing.assert_close(got, token_by_token(q, k, v, **g), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("loss", ["l2", "huber", "lp"])
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 8, 37, 64])
def test_fast_path_equals_reference(loss: str, chunk_size: int) -> None:
    q, k, v = qkv(2, 4, 2, 37, 6, 5, seed=2)  # GQA, Dv ≠ Dk, 37 tokens: never a multiple of the chunk (but 1, 37)
    # p = 1.5: with p = 3 these learning rates make the memory diverge (the gradient grows like e²)
    params = {**gates(2, 4, 37, seed=3), "loss": loss, "delta": 0.4, "p": 1.5, "chunk_size": chunk_size}
    want = titans(q, k, v, "reference", **params)
    torch.testing.assert_close(titans(q, k, v, "torch", **params), want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("budget", [1, 3 * 2 * 4 * 4 * 4])
def test_groups_of_chunks_are_exact_with_gradients(budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path cuts the chunks into groups (one chunk, or four, here) to bound its temporaries."""
    monkeypatch.setattr(memory_scan, "GROUP_BUDGET", budget)
    q, k, v = qkv(3, 2, 1, 30, 4, 3, seed=11, requires_grad=True)
    g = {n: t.requires_grad_(True) for n, t in gates(3, 2, 30).items()}
    leaves = (q, k, v, *g.values())
    results = []
    for backend in ("reference", "torch"):
        out = titans(q, k, v, backend, chunk_size=4, loss="huber", delta=0.5, **g)
        results.append((out, torch.autograd.grad(out.square().sum(), leaves)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-12, rtol=1e-10)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    with torch.no_grad():  # the no-grad path writes each group into the output in place
        torch.testing.assert_close(titans(q, k, v, "torch", chunk_size=4, **g), titans(q, k, v, "reference",
                                                                                        chunk_size=4, **g))


def test_chunk_size_changes_the_method() -> None:
    q, k, v = qkv(1, 2, 2, 16, 4, seed=4)
    g = gates(1, 2, 16)
    one, four = (titans(q, k, v, "torch", chunk_size=c, **g) for c in (1, 4))
    torch.testing.assert_close(one[:, :, :1], four[:, :, :1])  # the first token's gradient is at M₀ = 0 either way
    assert (one - four).abs().max() > 1e-3


def test_huge_huber_threshold_and_lp_with_p_two_are_l2() -> None:
    q, k, v = qkv(2, 2, 2, 21, 5, seed=5)
    params = {**gates(2, 2, 21), "chunk_size": 4}
    l2 = titans(q, k, v, "torch", **params)
    torch.testing.assert_close(titans(q, k, v, "torch", loss="huber", delta=1e9, **params), l2)
    torch.testing.assert_close(titans(q, k, v, "torch", loss="lp", p=2.0, **params), l2)


def test_huber_clips_and_lp_maps_the_error() -> None:
    """One token from an empty memory: M₁ = −θ k φ(−v)ᵀ, so the output is −θ (q·k) φ(−v) for each loss's φ."""
    q, k, v = qkv(1, 1, 1, 1, 4, 6, seed=6)
    v = v * 3.0
    theta, dot = 0.5, (q[0, 0, 0] @ k[0, 0, 0])
    expected = {
        ("huber", 0.7, 3.0): (-v).clamp(-0.7, 0.7),
        ("lp", 1.0, 3.0): (-v).sign() * v.square(),
        ("lp", 1.0, 1.0): (-v).sign(),
        ("lp", 1.0, 2.5): (-v).sign() * v.abs() ** 1.5,
    }
    for (loss, delta, p), phi in expected.items():
        got = titans(q, k, v, "torch", theta=theta, eta=0.0, loss=loss, delta=delta, p=p, scale=1.0,
                     qk_l2norm=False)
        torch.testing.assert_close(got, -theta * dot * phi)


def test_without_momentum_and_forgetting_it_is_the_delta_rule() -> None:
    """η = 0, α = 0, one token per chunk: M_t = (I − θ_t k_t k_tᵀ) M_{t−1} + θ_t k_t v_tᵀ, DeltaNet with β = θ (the
    gated delta rule's own kernel, an independent implementation)."""
    q, k, v = qkv(2, 4, 2, 23, 6, seed=7)
    theta = gates(2, 4, 23)["theta"]
    got = titans(q, k, v, "torch", eta=0.0, alpha=0.0, theta=theta, chunk_size=1)
    want = az.attention(q, k, v, method="gated_delta", causal=True, beta=theta)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_without_momentum_and_forgetting_a_chunk_is_one_minibatch_step() -> None:
    """η = 0, α = 0: within a chunk starting at M₀, M_t = M₀ − Σ_{i≤t} θ_i k_i (M₀ᵀk_i − v_i)ᵀ; the next chunk starts
    at the last of these."""
    q, k, v = qkv(1, 2, 2, 14, 4, 3, seed=8)
    theta = gates(1, 2, 14)["theta"]
    chunk = 5
    got = titans(q, k, v, "torch", eta=0.0, alpha=0.0, theta=theta, chunk_size=chunk, scale=1.0, qk_l2norm=False)
    want = torch.zeros_like(got)
    for h in range(2):
        memory = torch.zeros(4, 3, dtype=F64)
        for lo in range(0, 14, chunk):
            ks, vs, qs, th = (x[0, h, lo : lo + chunk] for x in (k, v, q, theta))
            steps = th[:, None, None] * torch.einsum("id,ie->ide", ks, ks @ memory - vs)  # θ_i k_i e_iᵀ
            memories = memory - steps.cumsum(0)
            want[0, h, lo : lo + chunk] = torch.einsum("td,tde->te", qs, memories)
            memory = memories[-1]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_gates_at_their_bounds_are_exact_with_finite_gradients() -> None:
    q, k, v = qkv(1, 2, 2, 19, 4, seed=9)
    g = gates(1, 2, 19)
    g["eta"][..., ::3] = 0.0
    g["alpha"][..., ::4] = 1.0
    g["alpha"][..., 1::4] = 0.0
    tensors = [t.requires_grad_(True) for t in (q, k, v, *g.values())]
    results = []
    for backend in ("reference", "torch"):
        out = titans(q, k, v, backend, chunk_size=4, loss="lp", p=1.5, **g)
        results.append((out, torch.autograd.grad(out.square().sum(), tensors)))
    (ref, ref_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-10)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(("cut", "single"), [(8, 3), (6, 2), (3, 0), (1, 9)])
def test_decoding_across_chunk_borders(cut: int, single: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt of ``cut`` tokens, ``single`` one-token steps, then the rest in one step, chunks of 4, one chunk per
    group (the conformance suite decodes with the default groups)."""
    monkeypatch.setattr(memory_scan, "GROUP_BUDGET", 1)
    n = 22
    q, k, v = qkv(2, 2, 1, n, 4, 3, seed=10)
    params: dict[str, Any] = {**gates(2, 2, n), "delta": 0.3 + torch.rand(2, 2, n, dtype=F64)}
    fixed = {"loss": "huber", "chunk_size": 4}
    want = titans(q, k, v, "reference", **params, **fixed)

    def part(lo: int, hi: int) -> dict[str, Any]:
        return {name: t[..., lo:hi] for name, t in params.items()}

    outs = []
    out, state = az.prefill(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], method="titans", **part(0, cut), **fixed)
    outs.append(out)
    bounds = [(t, t + 1) for t in range(cut, cut + single)] + [(cut + single, n)]
    for lo, hi in bounds:
        out, state = az.step(state, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], **part(lo, hi))
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), want, atol=1e-12, rtol=1e-10)
    assert state.data.position == n % 4


@pytest.mark.parametrize(
    ("name", "value"),
    [("loss", "l3"), ("chunk_size", 0), ("p", 0.5), ("delta", 0.0), ("eta", 1.5), ("alpha", -0.1), ("theta", -1.0)],
)
def test_bad_parameters_name_the_argument(name: str, value: Any) -> None:
    q, k, v = qkv(1, 2, 2, 6, 4)
    with pytest.raises(AttnzooError, match=name):
        titans(q, k, v, "torch", **{name: value})


def test_bad_gate_tensors_name_the_argument() -> None:
    q, k, v = qkv(1, 2, 2, 6, 4)
    with pytest.raises(AttnzooError, match="theta"):
        titans(q, k, v, "torch", theta=torch.full((1, 2, 5), 0.1, dtype=F64))  # 5 tokens, not 6
    with pytest.raises(AttnzooError, match="eta"):
        titans(q, k, v, "torch", eta=torch.full((1, 2, 6), 2.0, dtype=F64))
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="titans", causal=False)
