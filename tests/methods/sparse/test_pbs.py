"""D3 pbs: the key permutation (inside segments only, by the last query block's attention, clustering the keys it
needs), the selection (diagonal segment and sink always, no future segment when causal), full density equal to
unpermuted softmax attention (causal and noncausal), the causal mask by original position, the fast paths against the
reference (fp64, GQA, ragged tails, forward and backward), determinism, at_density and bad parameters."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse.pbs import SPEC, extended, permutation, select
from attnzoo.registry import Call
from tests.helpers import F64, assert_matches_reference, qkv


def test_permutation_moves_keys_only_inside_complete_segments():
    q, k, _ = qkv(2, 4, 2, 45, seed=1)
    order = permutation(q, k, block_size=4, segment_size=8, scale=0.3)
    assert order.shape == (2, 2, 45)
    for s in range(5):  # five complete segments of 8, each a permutation of its own positions
        seg = order[..., s * 8 : (s + 1) * 8]
        assert torch.equal(seg.sort(dim=-1).values, torch.arange(s * 8, (s + 1) * 8).expand(2, 2, 8))
    assert torch.equal(order[..., 40:], torch.arange(40, 45).expand(2, 2, 5))  # the partial tail keeps its order


def test_permutation_clusters_the_keys_the_last_queries_need():
    """Keys 1, 6, 9 and 14 (scattered over two blocks of each segment) are the only ones the last queries attend to:
    after the permutation each segment starts with them, so they fill one block per segment instead of two."""
    n, d = 16, 4
    k = torch.zeros(1, 1, n, d, dtype=F64)
    k[0, 0, :, 1] = 1.0
    for j in (1, 6, 9, 14):
        k[0, 0, j] = torch.tensor([10.0, 0.0, 0.0, 0.0])
    q = torch.zeros(1, 1, n, d, dtype=F64)
    q[0, 0, :, 0] = 1.0
    order = permutation(q, k, block_size=4, segment_size=8, scale=1.0)[0, 0]
    assert set(order[:2].tolist()) == {1, 6} and set(order[8:10].tolist()) == {9, 14}


def test_selection_keeps_the_diagonal_segment_and_the_sink_and_no_future_segment():
    q, k, _ = qkv(1, 2, 1, 40, seed=2)
    plan = select(q, k, causal=True, scale=0.35, block_size=4, segment_size=8, threshold=0.3, sink=True)
    blocks = plan.selection.blocks()  # (1, 2, 10, 10), permuted key blocks
    seg = torch.arange(10) // 2
    diagonal = seg.view(-1, 1) == seg.view(1, -1)
    future = seg.view(1, -1) > seg.view(-1, 1)
    assert bool(blocks[:, :, diagonal].all()) and not bool(blocks[:, :, future].any())
    sink = int((plan.order[0, 0] == 0).nonzero()) // 4
    assert bool(blocks[..., sink].all())
    assert plan.density() < 0.6  # a threshold below one leaves blocks out


def test_noncausal_selection_may_read_later_segments():
    q, k, _ = qkv(1, 2, 2, 32, seed=3)
    plan = select(q, k, causal=False, scale=0.35, block_size=4, segment_size=8, top_k=8)
    blocks = plan.selection.blocks()
    seg = torch.arange(8) // 2
    assert bool(blocks[:, :, seg.view(-1, 1) < seg.view(1, -1)].any())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("h", "hkv", "n", "block", "segment"), [(4, 2, 37, 4, 8), (2, 2, 16, 2, 6), (3, 1, 9, 4, 4)])
def test_full_density_is_unpermuted_softmax_attention(causal, h, hkv, n, block, segment):
    q, k, v = qkv(2, h, hkv, n, seed=4)
    want = az.attention(q, k, v, method="softmax", backend="reference", causal=causal)
    for backend in ("reference", "torch"):
        for params in ({"threshold": 1.0}, {"top_k": -(-n // block)}):
            out = az.attention(q, k, v, method="pbs", causal=causal, backend=backend, block_size=block,
                               segment_size=segment, **params)
            torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_diagonal_segment_is_causal_by_original_position():
    """The first segment's rows read only their own segment: causal softmax over it by original position, although
    the permutation reordered its keys."""
    q, k, v = qkv(1, 2, 2, 24, seed=5)
    plan = select(q, k, causal=True, scale=0.35, block_size=2, segment_size=8, top_k=1, sink=False)
    assert bool((plan.order[..., :8] != torch.arange(8)).any())  # the first segment was reordered
    pos = torch.arange(24)
    seen = (pos.view(-1, 1) // 8 == pos.view(1, -1) // 8) & (pos.view(1, -1) <= pos.view(-1, 1))
    out = az.attention(q, k, v, method="pbs", causal=True, backend="torch", block_size=2, segment_size=8,
                       top_k=1, sink=False)
    ref = az.attention(q, k, v, method="pbs", causal=True, backend="reference", block_size=2, segment_size=8,
                       top_k=1, sink=False)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    want = az.attention(q, k, v, method="softmax", backend="reference", mask=seen)
    torch.testing.assert_close(out[:, :, :8], want[:, :, :8], atol=1e-12, rtol=1e-12)


def test_causal_no_output_depends_on_a_later_key_or_value():
    q, k, v = qkv(1, 2, 1, 30, seed=6, requires_grad=True)
    out = az.attention(q, k, v, method="pbs", causal=True, backend="torch", block_size=3, segment_size=6,
                       threshold=0.7)
    out[0, :, 13].sum().backward()
    assert bool((k.grad[:, :, 14:] == 0).all()) and bool((v.grad[:, :, 14:] == 0).all())


def test_extended_keys_stay_linear_in_memory():
    q, k, v = qkv(1, 2, 2, 40, seed=7)
    plan = select(q, k, causal=True, scale=0.35, block_size=4, segment_size=8, threshold=0.5)
    kx, vx, sel = extended(plan, k, v, causal=True)
    assert kx.shape[2] == 32 + 40 and vx.shape == kx.shape and sel.seq_kv == 72  # four past segments + the keys
    assert torch.equal(kx[:, :, 32:], k)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("b", "h", "hkv", "n", "block", "segment", "params"),
                         [(2, 4, 2, 37, 4, 8, {"threshold": 0.6}), (1, 2, 2, 16, 2, 4, {"top_k": 2}),
                          (2, 6, 3, 50, 5, 10, {"threshold": 0.9, "sink": False}), (1, 2, 1, 1, 2, 2, {})])
def test_torch_matches_reference(causal, b, h, hkv, n, block, segment, params):
    q, k, v = qkv(b, h, hkv, n, seed=8, requires_grad=True)
    assert_matches_reference("pbs", q, k, v, causal=causal, block_size=block, segment_size=segment, **params)


def test_deterministic():
    q, k, v = qkv(2, 4, 2, 40, seed=9, dtype=torch.float32)
    kw = {"causal": True, "scale": 0.35, "block_size": 4, "segment_size": 8, "threshold": 0.8}
    a, b = select(q, k, **kw), select(q, k, **kw)
    assert torch.equal(a.order, b.order) and torch.equal(a.selection.indices, b.selection.indices)
    out = [az.attention(q, k, v, method="pbs", causal=True, backend="torch", block_size=4, segment_size=8)
           for _ in range(2)]
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("fraction", [1 / 4, 1 / 8, 1 / 16])
def test_at_density_reads_about_the_fraction(fraction):
    n = 1024
    call = Call(1, 2, 2, n, n, 8, 8, causal=True, device=torch.device("cpu"), dtype=F64, requires_grad=False,
                has_mask=False, has_bias=False)
    params = SPEC.at_density(call, fraction)
    q, k, _ = qkv(1, 2, 2, n, seed=10)
    plan = select(q, k, causal=False, scale=0.35, **params)
    late = plan.selection.counts[..., -1].float().mean() * params["block_size"] / n
    assert fraction / 2 <= float(late) <= fraction * 1.5


@pytest.mark.parametrize("params", [{"block_size": 0}, {"segment_size": 6}, {"threshold": 0.0}, {"threshold": 1.5},
                                    {"top_k": 0}, {"top_k": 9}, {"sink": "yes"}])
def test_bad_parameters_name_the_argument(params):
    q, k, v = qkv(1, 2, 2, 32)
    name = next(iter(params))
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="pbs", causal=True, **{"block_size": 4, "segment_size": 8, **params})


def test_cross_attention_is_refused():
    q, k, v = qkv(1, 2, 2, 8, skv=16)
    with pytest.raises(AttnzooError):
        az.attention(q, k, v, method="pbs", block_size=4, segment_size=8)
