"""L12 Miras memories (Moneta, Yaad, Memora): the fast paths against the token loop, the token recurrence written out,
Memora's simplex, the reductions to titans, one-token closed forms, decoding across chunk borders and the library's
errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from tests.helpers import qkv

F64 = torch.float64
METHODS = ("moneta", "yaad", "memora")


def gates(b: int, h: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-token ``theta, alpha`` in the ranges a layer's sigmoids give."""
    g = torch.Generator().manual_seed(seed)
    return {
        "theta": 0.5 * torch.sigmoid(torch.randn(b, h, n, generator=g, dtype=F64)),
        "alpha": torch.sigmoid(torch.randn(b, h, n, generator=g, dtype=F64) - 3.0),
    }


def run(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "torch",
        **params: Any) -> torch.Tensor:
    return az.attention(q, k, v, method=method, causal=True, backend=backend, **params)


def written_out(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
                alpha: torch.Tensor, delta: float = 1.0, p: float = 3.0, q_norm: float = 4.0) -> torch.Tensor:
    """Miras eqs. (24), (26), (27) token by token for one memory per (batch, head), every gradient at the current
    weights, the memory ``W (Dv, Dk)`` as the paper writes it (``M(k) = W k``)."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    out = torch.zeros(b, h, n, dv, dtype=q.dtype)
    for i in range(b):
        for j in range(h):
            acc = torch.zeros(dv, dk, dtype=q.dtype)  # Moneta's A, Yaad's W
            weights = torch.full((dv, dk), 1.0 / dk, dtype=q.dtype) if method == "memora" else acc
            for t in range(n):
                key, value, a, lr = k[i, j, t], v[i, j, t], 1 - alpha[i, j, t], theta[i, j, t]
                err = weights @ key - value
                if method == "moneta":
                    acc = a * acc - lr * torch.outer(err.sign() * err.abs() ** (p - 1), key)
                    weights = acc / (acc.abs() ** q_norm).sum() ** ((q_norm - 2) / q_norm)
                elif method == "yaad":
                    phi = err if err.norm() <= delta else delta * err.sign()
                    weights = a * weights - lr * torch.outer(phi, key)
                else:
                    weights = torch.softmax(a * weights.log() - lr * torch.outer(err, key), dim=1)  # rows: simplex
                out[i, j, t] = weights @ q[i, j, t]
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_chunk_size_one_is_the_papers_token_recurrence(method: str, backend: str) -> None:
    q, k, v = qkv(2, 2, 2, 9, 4, 3, seed=1)
    g = gates(2, 2, 9)
    extra = {"delta": 0.8} if method == "yaad" else {}
    got = run(method, q, k, v, backend, scale=1.0, qk_l2norm=False, chunk_size=1, **g, **extra)
    torch.testing.assert_close(got, written_out(method, q, k, v, **g, delta=0.8), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 37])
def test_fast_path_equals_reference(method: str, chunk_size: int) -> None:
    q, k, v = qkv(2, 4, 2, 37, 6, 5, seed=2)  # GQA, Dv ≠ Dk, 37 tokens
    params: dict[str, Any] = {**gates(2, 4, 37, seed=3), "chunk_size": chunk_size}
    if method == "yaad":
        params["delta"] = 0.3 + torch.rand(2, 4, 37, dtype=F64)
    want = run(method, q, k, v, "reference", **params)
    torch.testing.assert_close(run(method, q, k, v, **params), want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_the_reference(method: str) -> None:
    q, k, v = qkv(2, 2, 1, 13, 4, 3, seed=4, requires_grad=True)
    g = {n: t.requires_grad_(True) for n, t in gates(2, 2, 13).items()}
    leaves = (q, k, v, *g.values())
    results = []
    for backend in ("reference", "torch"):
        out = run(method, q, k, v, backend, chunk_size=4, **g)
        results.append(torch.autograd.grad(out.square().sum(), leaves))
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("q_norm", [1.0, 2.5, 3.0, 6.0, 10.0])
def test_moneta_fast_path_equals_reference_for_other_retention_norms(q_norm: float) -> None:
    """Integer exponents take repeated products in the fast path, others ``pow``; the reference takes the norm."""
    q, k, v = qkv(1, 2, 2, 11, 4, seed=12)
    params = {**gates(1, 2, 11), "chunk_size": 4, "q_norm": q_norm, "p": 2.5}
    want = run("moneta", q, k, v, "reference", **params)
    torch.testing.assert_close(run("moneta", q, k, v, **params), want, atol=1e-12, rtol=1e-10)


def test_memora_weights_stay_on_the_simplex() -> None:
    """Each value coordinate's weights over the key coordinates are a probability vector, whatever the learning
    rate; the output is then a convex combination of the query's coordinates."""
    q, k, v = qkv(1, 2, 2, 30, 5, 4, seed=5)
    _, state = az.prefill(q, k * 5.0, v * 5.0, method="memora", theta=3.0, chunk_size=4)
    weights = state.data.memory.exp()
    assert bool((weights > 0).all())
    torch.testing.assert_close(weights.sum(dim=-2), torch.ones(1, 2, 4, dtype=F64))
    out = run("memora", q, k, v, theta=3.0, scale=1.0, qk_l2norm=False)
    low, high = q.min(dim=-1, keepdim=True).values, q.max(dim=-1, keepdim=True).values
    assert bool(((out >= low - 1e-12) & (out <= high + 1e-12)).all())


def test_moneta_with_q_two_is_titans_lp_without_momentum() -> None:
    q, k, v = qkv(2, 2, 2, 21, 5, seed=6)
    g = gates(2, 2, 21)
    got = run("moneta", q, k, v, q_norm=2.0, p=1.5, chunk_size=4, **g)
    want = az.attention(q, k, v, method="titans", causal=True, eta=0.0, loss="lp", p=1.5, chunk_size=4, **g)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_yaad_is_titans_with_the_norm_switch_without_momentum() -> None:
    q, k, v = qkv(2, 2, 2, 21, 5, seed=7)
    params = {**gates(2, 2, 21), "delta": 0.5, "chunk_size": 4}
    want = az.attention(q, k, v, method="titans", causal=True, backend="reference", eta=0.0, loss="huber_switch",
                        **params)
    torch.testing.assert_close(run("yaad", q, k, v, **params), want, atol=1e-12, rtol=1e-10)


def test_one_token_closed_forms() -> None:
    """From the empty memory, one token: Yaad's ``W₁ = −θ k φ(−v)ᵀ`` with the switch on ``‖v‖``; Moneta's
    ``A₁ = −θ k φ(−v)ᵀ`` scaled by ``‖A₁‖_q^{2−q} = (θ ‖k‖_q ‖φ‖_q)^{2−q}`` (the entrywise norm of an outer
    product); Memora's columns ``softmax(log(1/Dk) − θ k e_j)`` over the key coordinates, ``e = W₀ᵀk − v``."""
    q, k, v = qkv(1, 1, 1, 1, 4, 6, seed=8)
    theta, dot = 0.5, q[0, 0, 0] @ k[0, 0, 0]
    kw = {"theta": theta, "scale": 1.0, "qk_l2norm": False}
    norm = v.norm()
    for delta, phi in ((2 * norm, -v), (0.5 * norm, 0.5 * norm * (-v).sign())):
        torch.testing.assert_close(run("yaad", q, k, v, delta=float(delta), **kw), -theta * dot * phi)
    phi = (-v).sign() * v.square()  # p = 3
    size = theta * torch.linalg.vector_norm(k, ord=4) * torch.linalg.vector_norm(phi, ord=4)
    torch.testing.assert_close(run("moneta", q, k, v, **kw), -theta * dot * phi / size**2)
    key = k[0, 0, 0]
    err = key.mean() - v[0, 0, 0]  # the uniform W₀ = 1/Dk predicts mean(k) for every value coordinate
    weights = torch.softmax(-math.log(4) - theta * torch.outer(key, err), dim=0)  # (Dk, Dv)
    torch.testing.assert_close(run("memora", q, k, v, **kw)[0, 0, 0], q[0, 0, 0] @ weights)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("cut", "single"), [(6, 2), (3, 0), (1, 9)])
def test_decoding_across_chunk_borders(method: str, cut: int, single: int) -> None:
    """A prompt of ``cut`` tokens, ``single`` one-token steps, then the rest in one step, chunks of 4."""
    n = 19
    q, k, v = qkv(2, 2, 1, n, 4, 3, seed=9)
    params: dict[str, Any] = gates(2, 2, n)
    if method == "yaad":
        params["delta"] = 0.3 + torch.rand(2, 2, n, dtype=F64)
    want = run(method, q, k, v, "reference", chunk_size=4, **params)

    def part(lo: int, hi: int) -> dict[str, Any]:
        return {name: t[..., lo:hi] for name, t in params.items()}

    out, state = az.prefill(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], method=method, chunk_size=4,
                            **part(0, cut))
    outs = [out]
    for lo, hi in [(t, t + 1) for t in range(cut, cut + single)] + [(cut + single, n)]:
        out, state = az.step(state, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], **part(lo, hi))
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), want, atol=1e-12, rtol=1e-10)
    assert state.data.position == n % 4


@pytest.mark.parametrize(
    ("method", "name", "value"),
    [("moneta", "q_norm", 0.5), ("moneta", "p", 0.5), ("yaad", "delta", 0.0), ("memora", "alpha", 1.5),
     ("memora", "theta", -1.0), ("moneta", "chunk_size", 0), ("memora", "eta", 0.5), ("yaad", "loss", "l2")],
)
def test_bad_parameters_name_the_argument(method: str, name: str, value: Any) -> None:
    q, k, v = qkv(1, 2, 2, 6, 4)
    with pytest.raises(AttnzooError, match=name):
        run(method, q, k, v, **{name: value})
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method=method, causal=False)
