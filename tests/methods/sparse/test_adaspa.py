"""D11 adaspa: the exact block masses and log-sum-exps (against the dense softmax, chunked or not), the search (row-wise
top-k of the true mass, the head-adaptive hierarchy, the text sink, the recall target, no future block when causal),
the cached LSE and the reuse of a stored selection, the fast paths against the reference (fp64, GQA, cross lengths,
forward and backward), full selection = softmax attention, determinism, at_density and bad parameters."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kernels.selection import BlockSelection
from attnzoo.methods.common import dense_scores, visible
from attnzoo.methods.sparse import adaspa
from attnzoo.methods.sparse.adaspa import SPEC, block_mass, log_sum_exp, search
from attnzoo.registry import Call
from tests.helpers import F64, assert_matches_reference, qkv


def _dense_weights(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    s = dense_scores(q, k, scale).masked_fill(~visible(causal, None, q, k), float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(("causal", "sq", "skv"), [(False, 21, 21), (True, 21, 21), (False, 9, 22), (True, 22, 9)])
def test_block_mass_is_the_softmax_weight_of_each_block(monkeypatch, chunked, causal, sq, skv):
    if chunked:  # one block row per chunk
        monkeypatch.setattr(adaspa, "LOGITS_ELEMENTS", 1)
    q, k, _ = qkv(2, 4, 2, sq, skv=skv, seed=1)
    w = _dense_weights(q, k, causal, 0.4)
    lse = log_sum_exp(q, k, causal=causal, scale=0.4, block_size=4)
    want_lse = dense_scores(q, k, 0.4).masked_fill(~visible(causal, None, q, k), float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    mass = block_mass(q, k, lse, causal=causal, scale=0.4, block_size=4)
    nq, nk = -(-sq // 4), -(-skv // 4)
    padded = torch.nn.functional.pad(w, (0, nk * 4 - skv, 0, nq * 4 - sq))
    want = padded.view(2, 4, nq, 4, nk, 4).sum(dim=(3, 5))
    torch.testing.assert_close(mass.double(), want, atol=1e-5, rtol=1e-5)


def test_search_keeps_the_blocks_of_largest_true_mass():
    q, k, _ = qkv(1, 2, 2, 32, seed=2)
    k[:, :, 20:24] += 3 * q[:, :, 5:6]  # key block 5 draws query block 1's attention
    sel = search(q, k, scale=0.35, block_size=4, sparsity=0.75, head_adaptive=False)
    assert bool((sel.counts == 2).all())  # round(0.25 · 8) blocks per query block
    mass = block_mass(q, k, log_sum_exp(q, k, causal=False, scale=0.35), causal=False, scale=0.35, block_size=4)
    best = mass.topk(2, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(sel.indices, best)
    assert bool((sel.indices[0, :, 1] == 5).any(dim=-1).all())


def test_causal_search_never_picks_a_future_block():
    q, k, _ = qkv(2, 4, 2, 30, seed=3)
    sel = search(q, k, causal=True, scale=0.35, block_size=3, sparsity=0.5, text_tokens=4)
    own = torch.arange(10).view(1, 1, -1, 1)
    assert bool(((sel.indices <= own) | (sel.indices == -1)).all())


def test_head_adaptive_hierarchy_moves_blocks_from_fine_heads_to_poor_ones():
    """Head 0 attends to one key block (recall near 1), heads 1–3 nearly uniformly: one head above 0.8, so head 0
    gets sparsity (1 + s)/2 and the head of lowest recall (3s − 1)/2; the others keep s."""
    q, k, _ = qkv(1, 4, 4, 64, seed=4)
    q[:, 0] = 0.0
    q[:, 0, :, 0] = 8.0
    k[:, 0, :, 0] = -1.0
    k[:, 0, 8:16, 0] = 1.0
    q[:, 1:] *= 0.01
    sel = search(q, k, scale=1.0, block_size=8, sparsity=0.5, fine_recall=0.8)
    counts = sel.counts[0, :, 0].tolist()
    assert counts[0] == 2  # round((1 − 0.75) · 8)
    assert sorted(counts[1:]) == [4, 4, 6]  # round(0.5 · 8) twice, round((1 − 0.25) · 8) for the poorest head
    flat = search(q, k, scale=1.0, block_size=8, sparsity=0.5, head_adaptive=False)
    assert bool((flat.counts == 4).all())


def test_text_sink_keeps_text_rows_and_columns():
    q, k, _ = qkv(1, 2, 2, 40, seed=5)
    sel = search(q, k, scale=0.35, block_size=4, sparsity=0.9, head_adaptive=False, text_tokens=6)
    blocks = sel.blocks()
    assert bool(blocks[..., 8:].all())  # key blocks holding text keys 34..39
    assert bool(blocks[:, :, 8:].all())  # query blocks holding text queries


def test_recall_target_keeps_the_fewest_blocks_reaching_it():
    q, k, _ = qkv(1, 2, 1, 48, seed=6)
    sel = search(q, k, scale=1.0, block_size=4, recall_target=0.7)
    mass = block_mass(q, k, log_sum_exp(q, k, causal=False, scale=1.0), causal=False, scale=1.0, block_size=4)
    blocks = sel.blocks()
    kept = (mass * blocks).sum(-1) / mass.sum(-1)
    assert bool((kept >= 0.7 - 1e-5).all())
    smallest = mass.masked_fill(~blocks, float("inf")).amin(-1)  # dropping the weakest kept block falls short
    assert bool(((kept - smallest / mass.sum(-1)) < 0.7).all())


def test_cached_lse_gives_the_same_search_and_a_stale_one_is_accepted():
    q, k, _ = qkv(2, 4, 2, 36, seed=7)
    lse = log_sum_exp(q, k, causal=False, scale=0.35, block_size=4)
    a = search(q, k, scale=0.35, block_size=4, sparsity=0.7)
    b = search(q, k, scale=0.35, block_size=4, sparsity=0.7, lse=lse)
    assert torch.equal(a.indices, b.indices)
    q2 = q + 0.05 * torch.randn_like(q)  # the next denoising step: the previous LSE serves its search
    stale = search(q2, k, scale=0.35, block_size=4, sparsity=0.7, lse=lse)
    assert stale.indices.shape[:3] == a.indices.shape[:3]


def test_a_stored_selection_is_reused_as_it_is():
    q, k, v = qkv(2, 4, 2, 36, seed=8)
    sel = search(q, k, causal=True, scale=0.35, block_size=4, sparsity=0.7)
    q2, k2, v2 = (t + 0.05 * torch.randn_like(t) for t in (q, k, v))
    out = az.attention(q2, k2, v2, method="adaspa", causal=True, backend="torch", scale=0.35, selection=sel)
    want = az.attention(q2, k2, v2, method="block_sparse", causal=True, backend="reference", scale=0.35,
                        selection=sel)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_full_selection_is_softmax_attention(causal):
    q, k, v = qkv(2, 4, 2, 27, seed=9)
    want = az.attention(q, k, v, method="softmax", backend="reference", causal=causal)
    for backend in ("reference", "torch"):
        for params in ({"sparsity": 0.0, "head_adaptive": False}, {"recall_target": 1.0}):
            out = az.attention(q, k, v, method="adaspa", causal=causal, backend=backend, block_size=4, **params)
            torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("b", "h", "hkv", "sq", "skv", "params"),
                         [(2, 4, 2, 37, 37, {"block_size": 4}), (1, 2, 2, 9, 30, {"block_size": 3, "sparsity": 0.5}),
                          (2, 6, 3, 25, 11, {"block_size": 5, "text_tokens": 3, "recall_target": 0.8}),
                          (1, 2, 1, 1, 1, {"block_size": 2})])
def test_torch_matches_reference(causal, b, h, hkv, sq, skv, params):
    q, k, v = qkv(b, h, hkv, sq, skv=skv, seed=10, requires_grad=True)
    assert_matches_reference("adaspa", q, k, v, causal=causal, **params)


def test_deterministic():
    q, k, v = qkv(2, 4, 2, 40, seed=11, dtype=torch.float32)
    assert torch.equal(search(q, k, block_size=4).indices, search(q, k, block_size=4).indices)
    a, b = (az.attention(q, k, v, method="adaspa", backend="torch", block_size=4) for _ in range(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("fraction", [1 / 4, 1 / 8, 1 / 16])
def test_at_density_keeps_the_fraction_on_average(fraction):
    n = 1024
    call = Call(1, 4, 4, n, n, 8, 8, causal=False, device=torch.device("cpu"), dtype=F64, requires_grad=False,
                has_mask=False, has_bias=False)
    params = SPEC.at_density(call, fraction)
    q, k, _ = qkv(1, 4, 4, n, seed=12, dtype=torch.float32)
    density = search(q, k, **params).density()
    assert fraction * 0.75 <= density <= fraction * 1.25


@pytest.mark.parametrize("params", [{"block_size": 0}, {"sparsity": 1.5}, {"sparsity": -0.1}, {"fine_recall": 0.0},
                                    {"text_tokens": 40}, {"recall_target": 0.0}, {"lse": torch.zeros(1, 2, 5)},
                                    {"selection": BlockSelection(torch.zeros(1, 2, 3, 1, dtype=torch.long), 4, 4, 8,
                                                                 8)}])
def test_bad_parameters_name_the_argument(params):
    q, k, v = qkv(1, 2, 2, 32)
    name = next(iter(params))
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="adaspa", **{"block_size": 4, **params})
