"""K10 MatryoshkaKV: full rank is exact, error falls with rank (nested bases), real bytes, ragged decoding,
calibration, training keeps the bases orthogonal, budgets and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses import MatryoshkaKVPress, presses
from attnzoo.kv.presses.base import PressContext
from attnzoo.kv.presses.matryoshka import MatryoshkaProjections, calibrate_matryoshka, train_matryoshka
from attnzoo.kv.projected import ProjectedKVCache
from tests.helpers import qkv

F64 = torch.float64


def low_rank(b: int, hkv: int, n: int, d: int, rank: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """Tokens in a (shared, per head) ``rank``-dimensional subspace with decaying spread, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(hkv, d, d, generator=torch.Generator().manual_seed(99), dtype=F64))[0]
    spread = 2.0 ** -torch.arange(rank, dtype=F64)
    z = torch.randn(b, hkv, n, rank, generator=g, dtype=F64) * spread
    return z @ basis[:, :, :rank].transpose(-1, -2).unsqueeze(0) + 0.5 + noise * torch.randn(
        b, hkv, n, d, generator=g, dtype=F64)


def test_registered() -> None:
    info = next(p for p in presses() if p.cls is MatryoshkaKVPress)
    assert info.mechanism == "K10" and info.arxiv == "2410.14731"


def test_full_rank_reproduces_attention_exactly() -> None:
    q, k, v = qkv(2, 4, 2, 24, 8, dtype=F64)
    lengths = torch.tensor([20, 13])
    out, state = az.prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20], method="softmax", lengths=lengths,
                            press=MatryoshkaKVPress(rank=8))
    ref, exact = az.prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20], method="softmax", lengths=lengths)
    assert isinstance(state.data, ProjectedKVCache)
    for t in range(20, 24):
        x = [t_[:, :, t : t + 1] for t_ in (q, k, v)]
        out, state = az.step(state, *x)
        ref, exact = az.step(exact, *x)
        torch.testing.assert_close(out, ref)


def test_error_falls_with_rank_on_low_rank_data() -> None:
    d = 16
    calib_k, calib_v = low_rank(4, 2, 64, d, 6, seed=1), low_rank(4, 2, 64, d, 6, seed=2)
    projections = calibrate_matryoshka(calib_k, calib_v)
    q = torch.randn(1, 4, 48, d, generator=torch.Generator().manual_seed(3), dtype=F64)
    k, v = low_rank(1, 2, 48, d, 6, seed=4), low_rank(1, 2, 48, d, 6, seed=5)
    exact, _ = az.prefill(q, k, v, method="softmax")
    errors = []
    for rank in (1, 2, 4, 6, 8, 16):
        cache = MatryoshkaKVPress(rank=rank, projections=projections).compress(
            KVCache.from_prompt(k, v), PressContext(q, d**-0.5, "softmax"))
        out = softmax_attention(cache, q[:, :, -1:], d**-0.5)
        errors.append(float((out - exact[:, :, -1:]).norm() / exact[:, :, -1:].norm()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[3] < 0.05 and errors[-1] < 1e-12, errors  # the data's rank is 6: rank 6 nearly exact


def test_nested_bases_and_pca() -> None:
    k, v = low_rank(3, 2, 40, 8, 3, seed=6), low_rank(3, 2, 40, 8, 3, seed=7)
    k[2, :, 10:] = v[2, :, 10:] = float("nan")  # padding never enters
    p = calibrate_matryoshka(k, v, lengths=torch.tensor([40, 40, 10]))
    assert p.key_basis.shape == (1, 2, 8, 8) and p.key_mean.shape == (1, 2, 8)
    eye = torch.eye(8, dtype=F64).expand(1, 2, 8, 8)
    torch.testing.assert_close(p.key_basis.transpose(-1, -2) @ p.key_basis, eye)
    kr, _ = p.truncated(3, 2)
    assert torch.equal(kr.basis, p.key_basis[..., :3])  # a prefix of the same basis
    real = torch.cat([k[:2].permute(1, 0, 2, 3).reshape(2, 80, 8), k[2, :, :10]], 1)  # (Hkv, tokens, D)
    torch.testing.assert_close(p.key_mean[0], real.mean(1))
    variances = ((real - real.mean(1, keepdim=True)) @ p.key_basis[0]).var(1)  # decreasing along the basis
    assert bool((variances[:, :-1] >= variances[:, 1:] - 1e-12).all())


def test_bytes_floor_half_rank() -> None:
    """The floor of issue 10: at half rank, float16 storage, B=1, H=8, D=64, context 4096: ≤ 0.52 of float16."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 8, 4096, 64, generator=g) for _ in range(2))
    cache = MatryoshkaKVPress(rank=32, dtype=torch.float16).compress(
        KVCache.from_prompt(k, v), PressContext(k, 0.125, "softmax"))
    fp16 = KVCache.from_prompt(k.half(), v.half()).nbytes
    bases = 2 * 8 * (64 * 32 + 64) * 2  # key and value bases and means, float16
    assert cache.nbytes == 8 * 4096 * (2 * 32 * 2 + 4) + bases
    assert cache.keys.dtype == torch.float16 and cache.nbytes <= 0.52 * fp16


def test_ragged_decoding_matches_each_sequence_alone() -> None:
    q, k, v = qkv(2, 4, 2, 30, 8, dtype=F64, seed=1)
    lengths = torch.tensor([24, 11])
    press = MatryoshkaKVPress(rank=3, value_rank=5)
    out, state = az.prefill(q[:, :, :24], k[:, :, :24], v[:, :, :24], method="softmax", lengths=lengths, press=press)
    assert state.data.keys.shape[-1] == 3 and state.data.values.shape[-1] == 5
    alone = [az.prefill(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], method="softmax", press=press)
             for b, n in enumerate(lengths.tolist())]
    for t in range(24, 28):
        x = [t_[:, :, t : t + 1] for t_ in (q, k, v)]
        out, state = az.step(state, *x)
        for b, (_, s) in enumerate(alone):
            o, s = az.step(s, *(t_[b : b + 1] for t_ in x))
            alone[b] = (o, s)
            torch.testing.assert_close(out[b : b + 1], o)
    assert state.data.token_counts().tolist() == [[28, 28], [15, 15]]


def test_scoring_presses_can_follow() -> None:
    """A projected cache keeps slots per head like any cache (its projections follow)."""
    _, k, v = qkv(1, 2, 2, 10, 8, dtype=F64)
    cache = MatryoshkaKVPress(rank=4).compress(KVCache.from_prompt(k, v), PressContext(k, 1.0, "softmax"))
    kept = cache.keep(torch.tensor([[[0, 3], [5, 9]]]))
    assert isinstance(kept, ProjectedKVCache) and kept.key_projection is cache.key_projection
    assert kept.positions.tolist() == [[[0, 3], [5, 9]]]
    torch.testing.assert_close(kept.keys[0, 1], cache.keys[0, 1, [5, 9]])


def test_rings_and_appends_stay_exact_at_full_rank() -> None:
    q, k, v = qkv(1, 2, 1, 12, 4, dtype=F64, seed=2)
    ring = KVCache.from_prompt(k[:, :, :8], v[:, :, :8], ring=5)
    cache = MatryoshkaKVPress(rank=4).compress(ring, PressContext(q, 0.5, "softmax"))
    for t in range(8, 12):
        ring, cache = ring.append(k[:, :, t : t + 1], v[:, :, t : t + 1]), cache.append(k[:, :, t : t + 1],
                                                                                       v[:, :, t : t + 1])
        assert torch.equal(cache.positions, ring.positions)
        x = q[:, :, t : t + 1]
        torch.testing.assert_close(softmax_attention(cache, x, 0.5), softmax_attention(ring, x, 0.5))


def test_training_keeps_bases_orthogonal_and_lowers_the_error() -> None:
    d = 8
    k, v = low_rank(2, 2, 32, d, 4, seed=8, noise=0.3), low_rank(2, 2, 32, d, 4, seed=9, noise=0.3)
    q = torch.randn(2, 2, 32, d, generator=torch.Generator().manual_seed(10), dtype=F64)
    start = calibrate_matryoshka(k, v)

    def error(p: MatryoshkaProjections) -> float:
        cache = MatryoshkaKVPress(rank=2, projections=p).compress(KVCache.from_prompt(k, v),
                                                                  PressContext(q, d**-0.5, "softmax"))
        exact = az.attention(q, k, v, method="softmax", causal=True)
        ref = softmax_attention(cache, q, d**-0.5)
        return float((ref - exact).pow(2).mean())

    trained = train_matryoshka(start, q, k, v, ranks=[2], steps=12, lr=3e-2)
    eye = torch.eye(d, dtype=F64).expand(1, 2, d, d)
    torch.testing.assert_close(trained.key_basis.transpose(-1, -2) @ trained.key_basis, eye)
    torch.testing.assert_close(trained.value_basis.transpose(-1, -2) @ trained.value_basis, eye)
    assert error(trained) < error(start)


def test_for_budget_and_ranks() -> None:
    assert MatryoshkaKVPress.for_budget(0.25).ranks(64, 32) == (16, 8)
    assert MatryoshkaKVPress().ranks(64, 64) == (32, 32)
    assert MatryoshkaKVPress(rank=5).ranks(8, 16) == (5, 5)


def test_bad_input() -> None:
    q, k, v = qkv(1, 2, 2, 6, 8, dtype=F64)
    with pytest.raises(AttnzooError, match="^rank: expected at most the head dimension 8, got 9"):
        az.prefill(q, k, v, method="softmax", press=MatryoshkaKVPress(rank=9))
    with pytest.raises(AttnzooError, match="^value_rank:"):
        az.prefill(q, k, v, method="softmax", press=MatryoshkaKVPress(rank=4, value_rank=9))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(AttnzooError, match="^rank:"):
            MatryoshkaKVPress(rank=bad)  # type: ignore[arg-type]
    for bad in (0, 1.5, "half"):
        with pytest.raises(AttnzooError, match="^fraction:"):
            MatryoshkaKVPress(fraction=bad)  # type: ignore[arg-type]
    with pytest.raises(AttnzooError, match="^fraction:"):
        MatryoshkaKVPress(rank=2, fraction=0.5)
    other = calibrate_matryoshka(*qkv(1, 2, 2, 6, 4, dtype=F64)[1:])
    with pytest.raises(AttnzooError, match="^projections:"):
        az.prefill(q, k, v, method="softmax", press=MatryoshkaKVPress(rank=2, projections=other))
    with pytest.raises(AttnzooError, match="^ranks:"):
        train_matryoshka(other, q, k, v, ranks=[0])
