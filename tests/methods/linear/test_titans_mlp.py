"""L12 Titans' deep (two-layer MLP) memory: the hand-derived chunked fast path against the ``torch.func`` token loop
for every loss and chunk size, groups of chunks, decoding across chunk borders, its default weights and errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kernels import memory_scan
from tests.helpers import qkv
from tests.methods.linear.test_titans import gates

F64 = torch.float64


def deep(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, **params: Any) -> torch.Tensor:
    return az.attention(q, k, v, method="titans_mlp", causal=True, backend=backend, **params)


def small_gates(b: int, h: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gates(b, h, n, seed)
    return {**g, "theta": 0.2 * g["theta"]}


@pytest.mark.parametrize("loss", ["l2", "huber", "lp"])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 40])
def test_fast_path_equals_the_func_grad_reference(loss: str, chunk_size: int) -> None:
    q, k, v = qkv(2, 4, 2, 29, 4, 3, seed=2)  # GQA, Dv ≠ Dk
    params = {**small_gates(2, 4, 29, seed=3), "loss": loss, "delta": 0.3, "p": 1.5, "chunk_size": chunk_size,
              "expansion": 3}
    want = deep(q, k, v, "reference", **params)
    torch.testing.assert_close(deep(q, k, v, "torch", **params), want, atol=1e-12, rtol=1e-10)


def test_groups_of_chunks_with_gradients_of_the_initial_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_scan, "GROUP_BUDGET", 1)
    q, k, v = qkv(1, 2, 2, 17, 4, seed=4, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    w1 = (torch.randn(2, 4, 8, generator=gen, dtype=F64) / 2).requires_grad_(True)
    w2 = (torch.randn(2, 8, 4, generator=gen, dtype=F64) / 3).requires_grad_(True)
    leaves = (q, k, v, w1, w2)
    results = []
    for backend in ("reference", "torch"):
        out = deep(q, k, v, backend, chunk_size=4, memory_w1=w1, memory_w2=w2, **small_gates(1, 2, 17))
        results.append((out, torch.autograd.grad(out.square().sum(), leaves)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-12, rtol=1e-10)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(("cut", "single"), [(8, 2), (5, 3), (1, 0)])
def test_decoding_across_chunk_borders(cut: int, single: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_scan, "GROUP_BUDGET", 1)
    n = 19
    q, k, v = qkv(2, 2, 1, n, 4, 3, seed=6)
    params: dict[str, Any] = small_gates(2, 2, n)
    want = deep(q, k, v, "reference", chunk_size=4, **params)

    def part(lo: int, hi: int) -> dict[str, Any]:
        return {name: t[..., lo:hi] for name, t in params.items()}

    out, state = az.prefill(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], method="titans_mlp", chunk_size=4,
                            **part(0, cut))
    outs = [out]
    for lo, hi in [(t, t + 1) for t in range(cut, cut + single)] + [(cut + single, n)]:
        out, state = az.step(state, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], **part(lo, hi))
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), want, atol=1e-12, rtol=1e-10)
    assert state.data.position == n % 4 and state.data.nbytes == 3 * 8 * (2 * 2 * 4 * 8 + 2 * 2 * 8 * 3)


def test_default_weights_are_fixed_and_the_memory_learns() -> None:
    q, k, v = qkv(1, 2, 2, 12, 4, seed=7)
    first, again = (deep(q, k, v, "torch", theta=0.5, chunk_size=1) for _ in range(2))
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    frozen = deep(q, k, v, "torch", theta=0.0, chunk_size=1)  # θ = 0: the initial memory, never written
    assert (first - frozen).abs().max() > 1e-3 and frozen.abs().max() > 1e-3


def test_bad_weight_shapes_name_the_argument() -> None:
    q, k, v = qkv(1, 2, 2, 6, 4)
    with pytest.raises(AttnzooError, match="memory_w1"):
        deep(q, k, v, "torch", memory_w1=torch.zeros(2, 4, 5, dtype=F64))
    with pytest.raises(AttnzooError, match="memory_w2"):
        deep(q, k, v, "torch", expansion=1, memory_w1=torch.zeros(2, 4, 4, dtype=F64),
             memory_w2=torch.zeros(2, 8, 4, dtype=F64))
