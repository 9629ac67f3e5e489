"""D2 biformer: the routing on planted region means, the selection's shape and determinism, the union-of-regions
semantics against a mask built by hand on the grid, shared routing as BiFormer's full-width affinity, the fast path
against the reference (fp64, GQA, every routing, mask and bias, forward and backward), at_density, bad parameters."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse.biformer import SPEC, at_density, region_order, select
from attnzoo.registry import Call
from tests.helpers import F64, assert_matches_reference, qkv


def _planted() -> tuple[torch.Tensor, torch.Tensor]:
    """One head on a 4×4 grid of 2×2 regions (regions 0 1 / 2 3): every key of region ``r`` is ``e_r`` (so the region
    mean is ``e_r``); the queries of region 0 point along ``3·e_2 + 2·e_3 + e_1``, the others along ``2·e_0 + e_3``."""
    q = torch.zeros(1, 1, 16, 4, dtype=F64)
    k = torch.zeros(1, 1, 16, 4, dtype=F64)
    for i in range(16):
        y, x = divmod(i, 4)
        r = (y // 2) * 2 + x // 2
        k[0, 0, i, r] = 1.0
        q[0, 0, i] = torch.tensor([0.0, 1.0, 3.0, 2.0]) if r == 0 else torch.tensor([2.0, 0.0, 0.0, 1.0])
    return q, k


def test_routes_each_region_to_its_planted_regions():
    q, k = _planted()
    sel = select(q, k, layout=(4, 4), region=2, top_k=2)
    assert (sel.block_q, sel.block_k) == (4, 4)
    assert sel.indices[0, 0, 0].tolist() == [2, 3]
    assert sel.indices[0, 0, 1:].tolist() == [[0, 3]] * 3
    assert select(q, k, layout=(4, 4), region=2, top_k=3).indices[0, 0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(("routing", "heads"), [("shared", 1), ("group", 2), ("head", 4)])
def test_selection_shape_and_determinism(routing, heads):
    q, k, _ = qkv(2, 4, 2, 48, seed=1, dtype=torch.float32)
    sel = select(q, k, layout=(6, 8), region=(2, 4), top_k=3, routing=routing)
    assert sel.indices.shape == (2, heads, 6, 3)
    assert (sel.block_q, sel.block_k, sel.seq_q, sel.seq_kv) == (8, 8, 48, 48)
    assert bool((sel.counts == 3).all())
    sel.check(q, k)  # in range, no region twice
    again = select(q, k, layout=(6, 8), region=(2, 4), top_k=3, routing=routing)
    assert torch.equal(sel.indices, again.indices)
    assert sel.density() == pytest.approx(3 / 6)


def test_region_order_makes_each_region_one_block():
    perm = region_order((6, 8), (2, 4))
    assert sorted(perm.tolist()) == list(range(48))
    for r in range(6):
        tokens = perm[r * 8 : (r + 1) * 8]
        rows, cols = tokens // 8, tokens % 8
        assert bool(((rows // 2) * 2 + cols // 4 == r).all())


def test_shared_routing_is_the_full_width_affinity():
    """BiFormer routes with the means of the whole (all heads) query and key vectors; with GQA a key head serves its
    group's query heads."""
    q, k, _ = qkv(1, 4, 2, 36, d=3, seed=2)
    layout, region = (6, 6), (3, 2)
    sel = select(q, k, layout=layout, region=region, top_k=2)
    full_q = q.permute(0, 2, 1, 3).reshape(1, 6, 6, 12)
    full_k = k.repeat_interleave(2, dim=1).permute(0, 2, 1, 3).reshape(1, 6, 6, 12)
    means = [x.reshape(1, 2, 3, 3, 2, 12).mean(dim=(2, 4)).reshape(1, 6, 12) for x in (full_q, full_k)]
    want = (means[0] @ means[1].transpose(1, 2)).topk(2, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(sel.indices[:, 0], want)


@pytest.mark.parametrize("routing", ["shared", "head"])
def test_union_of_routed_regions_against_a_hand_built_mask(routing):
    """Query ``i`` sees key ``j`` iff ``j``'s region is one of the regions routed from ``i``'s, read off the grid."""
    q, k, v = qkv(2, 4, 2, 24, seed=3)
    layout, region = (4, 6), (2, 3)  # regions: 0 1 / 2 3
    sel = select(q, k, layout=layout, region=region, top_k=2, routing=routing)
    mask = torch.zeros(2, 4, 24, 24, dtype=torch.bool)
    for b in range(2):
        for h in range(4):
            for i in range(24):
                rq = (i // 6 // 2) * 2 + i % 6 // 3
                routed = sel.indices[b, h if routing == "head" else 0, rq].tolist()
                for j in range(24):
                    mask[b, h, i, j] = (j // 6 // 2) * 2 + j % 6 // 3 in routed
    want = az.attention(q, k, v, method="softmax", backend="reference", mask=mask)
    for backend in ("torch", "reference"):
        out = az.attention(q, k, v, method="biformer", backend=backend, layout=layout, region=region, top_k=2,
                           routing=routing)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_every_region_is_full_attention():
    q, k, v = qkv(1, 4, 2, 30, seed=4)
    out = az.attention(q, k, v, method="biformer", backend="torch", layout=(5, 6), region=(5, 2), top_k=3)
    torch.testing.assert_close(out, az.attention(q, k, v, method="softmax", backend="reference"),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("b", "h", "hkv", "layout", "region", "top_k", "routing"), [
    (2, 4, 2, (6, 8), (2, 4), 2, "shared"), (1, 6, 3, (4, 9), (2, 3), 3, "group"),
    (2, 2, 2, (12,), 3, 2, "head"), (1, 4, 1, (2, 3, 4), (1, 3, 2), 4, "shared"),
])
def test_torch_matches_reference(b, h, hkv, layout, region, top_k, routing):
    q, k, v = qkv(b, h, hkv, math.prod(layout), seed=5, requires_grad=True)
    assert_matches_reference("biformer", q, k, v, layout=layout, region=region, top_k=top_k, routing=routing)


def test_torch_matches_reference_with_mask_and_bias():
    q, k, v = qkv(2, 4, 2, 24, seed=6, requires_grad=True)
    gen = torch.Generator().manual_seed(7)
    mask = torch.rand(2, 1, 24, 24, generator=gen) < 0.8
    bias = torch.randn(1, 4, 24, 24, generator=gen, dtype=F64).requires_grad_(True)
    assert_matches_reference("biformer", q, k, v, mask=mask, bias=bias, grads=(bias,), layout=(4, 6),
                             region=(2, 3), top_k=2)


@pytest.mark.parametrize(("n", "fraction", "layout", "region", "top_k"), [
    (1024, 1 / 4, (32, 32), (8, 8), 4), (4096, 1 / 16, (64, 64), (8, 8), 4), (2048, 1 / 8, (32, 64), (8, 8), 4),
])
def test_at_density_reads_the_fraction(n, fraction, layout, region, top_k):
    call = Call(1, 2, 2, n, n, 8, 8, causal=False, device=torch.device("cpu"), dtype=torch.float32,
                requires_grad=False, has_mask=False, has_bias=False)
    params = at_density(call, fraction)
    assert params == {"layout": layout, "region": region, "top_k": top_k}
    q, k, _ = qkv(1, 2, 2, n, seed=8, dtype=torch.float32)
    assert select(q, k, **params).density() == pytest.approx(fraction)
    assert SPEC.at_density is at_density


@pytest.mark.parametrize(("params", "name"), [
    ({"layout": (3, 8), "region": 2}, "region"),  # 2 does not divide 3
    ({"layout": (4, 6), "region": (2, 3, 1)}, "region"),  # one size per axis
    ({"layout": (4, 7), "region": 2}, "layout"),  # 28 tokens, not 24
    ({"layout": (4, 6), "region": 2, "top_k": 7}, "top_k"),  # 6 regions
    ({"layout": (4, 6), "region": 2, "top_k": 0}, "top_k"),
    ({"layout": (4, 6), "region": 2, "routing": "per-token"}, "routing"),
])
def test_bad_parameters_name_the_argument(params, name):
    q, k, v = qkv(1, 2, 2, 24)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="biformer", **params)


def test_causal_and_cross_are_refused():
    q, k, v = qkv(1, 2, 2, 16)
    with pytest.raises(AttnzooError, match="causal"):
        az.attention(q, k, v, method="biformer", causal=True, layout=(4, 4), region=2, top_k=2)
    q2, k2, v2 = qkv(1, 2, 2, 16, skv=20)
    with pytest.raises(AttnzooError):
        az.attention(q2, k2, v2, method="biformer", layout=(4, 4), region=2, top_k=2)
