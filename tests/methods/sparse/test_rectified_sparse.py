"""D10 rectified_sparse: the pooled block mass (with multiplicities) and the selection rule by hand, the GAPR test by
hand, the rectified map's rows sum to one, every block kept is softmax attention, block-constant queries and keys are
rectified exactly (where plain block-sparse attention is not), a lower error than plain block-sparse attention with the
same selection on structured input, determinism, the fast path against the reference (fp64, GQA, cross, ragged
blocks, forward and backward), at_density and bad parameters."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse.rectified_sparse import plan
from attnzoo.registry import Call
from tests.helpers import F64, assert_matches_reference, qkv


def _means(x: torch.Tensor, block: int) -> torch.Tensor:
    return torch.stack([x[:, :, s : s + block].mean(2) for s in range(0, x.shape[2], block)], dim=2)


def test_mass_is_the_pooled_softmax_weighted_by_block_sizes():
    q, k, _ = qkv(1, 2, 1, 13, skv=18, seed=1)
    p = plan(q, k, scale=0.4, block_size=5, keep=0.0, threshold=0.3)
    sizes = torch.tensor([5.0, 5.0, 5.0, 3.0], dtype=F64)
    logits = 0.4 * _means(q, 5) @ _means(k, 5).expand(-1, 2, -1, -1).transpose(-1, -2)
    want = sizes * logits.exp()
    torch.testing.assert_close(p.mass, want / want.sum(-1, keepdim=True))


@pytest.mark.parametrize(("keep", "threshold"), [(0.0, 0.0), (0.0, 0.5), (0.5, 0.2), (0.25, 0.9), (1.0, 0.0)])
def test_selection_is_the_threshold_count_with_a_top_k_floor(keep, threshold):
    q, k, _ = qkv(2, 2, 2, 40, seed=2)
    p = plan(q, k, scale=0.5, block_size=4, keep=keep, threshold=threshold)
    ranked, order = p.mass.sort(-1, descending=True)
    count = ((ranked.cumsum(-1) <= threshold).sum(-1) + 1).clamp(min=int(keep * 10), max=10)
    want = torch.zeros_like(p.pooled).scatter_(-1, order, torch.arange(10) < count.unsqueeze(-1))
    assert torch.equal(p.selection.blocks(), want)


def test_pooled_blocks_are_the_dropped_ones_whose_gain_beats_the_pooling_error():
    q, k, _ = qkv(1, 1, 1, 24, seed=3)
    p = plan(q, k, scale=0.35, block_size=4, keep=0.0, threshold=0.2)
    qb, kb = _means(q, 4), _means(k, 4)
    dq = _means((q - qb.repeat_interleave(4, 2)).abs(), 4)
    dk = _means((k - kb.repeat_interleave(4, 2)).abs(), 4)
    gain = (qb @ kb.transpose(-1, -2)).abs()
    error = (dq @ kb.transpose(-1, -2)).abs() + (qb @ dk.transpose(-1, -2)).abs()
    assert torch.equal(p.pooled, (gain > error) & ~p.selection.blocks())
    assert bool((~p.pooled).any()) and bool(p.pooled.any())  # both kinds of dropped block occur here


def test_the_rectified_map_rows_sum_to_one():
    q, k, _ = qkv(2, 4, 2, 30, seed=4)
    ones = torch.ones(2, 2, 30, 1, dtype=F64)
    for backend in ("reference", "torch"):
        out = az.attention(q, k, ones, method="rectified_sparse", backend=backend, block_size=4, keep=0.1,
                           threshold=0.2)
        torch.testing.assert_close(out, torch.ones_like(out))


def test_every_block_kept_is_softmax_attention():
    q, k, v = qkv(2, 4, 2, 21, seed=5)
    out = az.attention(q, k, v, method="rectified_sparse", backend="torch", block_size=4, keep=1.0)
    torch.testing.assert_close(out, az.attention(q, k, v, method="softmax", backend="reference"))


def _block_constant(x: torch.Tensor, block: int) -> torch.Tensor:
    return _means(x, block).repeat_interleave(block, 2)[:, :, : x.shape[2]]


def test_block_constant_queries_and_keys_are_rectified_exactly():
    q, k, v = qkv(1, 2, 2, 32, seed=6)
    q, k = _block_constant(q, 4), _block_constant(k, 4)
    params = {"block_size": 4, "keep": 0.25, "threshold": 0.0}
    full = az.attention(q, k, v, method="softmax", backend="reference")
    out = az.attention(q, k, v, method="rectified_sparse", backend="torch", **params)
    torch.testing.assert_close(out, full)
    selection = plan(q, k, scale=1 / math.sqrt(8), **params).selection
    plain = az.attention(q, k, v, method="block_sparse", selection=selection)
    assert float((plain - full).norm()) > 0.1 * float(full.norm())


def test_lower_error_than_plain_block_sparse_with_the_same_selection():
    gen = torch.Generator().manual_seed(7)
    q, k, v = qkv(1, 4, 4, 256, d=16, seed=gen)
    # block-smooth queries and keys (video-like: neighbouring tokens alike)
    q = _block_constant(q, 16) + 0.1 * torch.randn(q.shape, generator=gen, dtype=F64)
    k = _block_constant(k, 16) + 0.1 * torch.randn(k.shape, generator=gen, dtype=F64)
    full = az.attention(q, k, v, method="softmax", backend="reference")
    params = {"block_size": 16, "keep": 0.125, "threshold": 0.0}
    out = az.attention(q, k, v, method="rectified_sparse", backend="torch", **params)
    selection = plan(q, k, scale=0.25, **params).selection
    plain = az.attention(q, k, v, method="block_sparse", selection=selection)
    assert float((out - full).norm()) < 0.6 * float((plain - full).norm())


def test_deterministic():
    q, k, v = qkv(2, 4, 2, 64, seed=8, dtype=torch.float32)
    a, b = (az.attention(q, k, v, method="rectified_sparse", backend="torch", block_size=8, keep=0.2)
            for _ in range(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize(("b", "h", "hkv", "sq", "skv", "params"), [
    (2, 4, 2, 37, 37, {"block_size": 5}),
    (1, 2, 2, 16, 16, {"block_size": 4, "keep": 0.5, "threshold": 0.0}),
    (2, 6, 3, 19, 30, {"block_size": 7, "threshold": 0.6}),
    (1, 2, 1, 25, 11, {"block_size": 3, "keep": 0.0, "threshold": 0.1}),
])
def test_torch_matches_reference(b, h, hkv, sq, skv, params):
    q, k, v = qkv(b, h, hkv, sq, skv=skv, seed=9, requires_grad=True)
    assert_matches_reference("rectified_sparse", q, k, v, **params)


def test_at_density_reads_the_fraction_of_the_keys():
    call = Call(1, 2, 2, 2048, 2048, 8, 8, False, torch.device("cpu"), torch.float32, False, False, False)
    params = az.get("rectified_sparse").spec.at_density(call, 1 / 8)
    q, k, _ = qkv(1, 2, 2, 2048, seed=10, dtype=torch.float32)
    assert plan(q, k, scale=0.35, **params).selection.density() == pytest.approx(1 / 8)


@pytest.mark.parametrize("params", [{"block_size": 0}, {"keep": 1.5}, {"threshold": -0.1}, {"keep": "all"}])
def test_bad_parameters_name_the_argument(params):
    q, k, v = qkv(1, 2, 2, 8)
    name = next(iter(params))
    with pytest.raises(AttnzooError, match=f"^{name}:"):
        az.attention(q, k, v, method="rectified_sparse", **params)


def test_causal_is_refused():
    q, k, v = qkv(1, 2, 2, 8)
    with pytest.raises(AttnzooError, match="^causal:"):
        az.attention(q, k, v, method="rectified_sparse", causal=True)
