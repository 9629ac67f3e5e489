"""D12 token_topk: each score keeps its planted tokens, counts and fractions, the kept keys are the only keys and the
kept queries the only rows, keep=1 is full attention, the fast path against the reference (fp64, both sides, causal
and cross, GQA, shares, several causal chunks, forward and backward), determinism, causality, the learned scorer's
gradient, return_lse on both sides, and bad parameters."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse import token_topk
from attnzoo.methods.sparse.token_topk import select, token_scores
from tests.helpers import F64, assert_lse_matches_reference, assert_matches_reference, qkv

PLANTED = [3, 7, 12, 18]


def _planted(axis_scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries along e_0; keys small and random except the planted ones, along e_0 (large)."""
    q, k, _ = qkv(1, 2, 2, 24, seed=0)
    q = 0.1 * q
    q[..., 0] += 1.0
    k = 0.1 * k
    k[:, :, PLANTED, 0] = axis_scale
    return q, k


@pytest.mark.parametrize("score", ["attention", "cls", "norm"])
def test_training_free_scores_keep_the_planted_keys(score):
    q, k = _planted()
    kept = select(q, k, keep=4, score=score)
    assert kept.shape == (1, 1, 4) and kept[0, 0].tolist() == PLANTED


def test_learned_scorer_keeps_what_it_projects_onto():
    q, k = _planted()
    scorer = torch.zeros(2, 8, dtype=F64)
    scorer[:, 0] = 1.0
    kept = select(q, k, keep=4, score="learned", scorer=scorer, share="group")
    assert kept.shape == (1, 2, 4) and all(kept[0, h].tolist() == PLANTED for h in range(2))


def test_queries_side_scores_the_queries():
    q, k, _ = qkv(2, 4, 2, 30, seed=1)
    q[:, :, [2, 9, 20], :] *= 10.0
    kept = select(q, k, keep=3, side="queries", score="norm", share="head")
    assert kept.shape == (2, 4, 3) and bool((kept == torch.tensor([2, 9, 20])).all())


@pytest.mark.parametrize(("keep", "count"), [(5, 5), (0.25, 10), (0.01, 1), (1.0, 40), (40, 40)])
def test_keep_is_a_count_or_a_fraction(keep, count):
    q, k, _ = qkv(1, 2, 2, 40, seed=2)
    kept = select(q, k, keep=keep)
    assert kept.shape == (1, 1, count)
    assert bool((kept[..., 1:] > kept[..., :-1]).all())  # ascending, no repeats


def test_kept_keys_are_the_only_keys():
    q, k, v = qkv(2, 4, 2, 26, seed=3)
    kept = select(q, k, keep=0.3, share="group")  # (2, 2, 8)
    out = az.attention(q, k, v, method="token_topk", backend="torch", keep=0.3, share="group")
    seen = torch.zeros(2, 2, 26, dtype=torch.bool).scatter_(2, kept, True).repeat_interleave(2, dim=1)
    want = az.attention(q, k, v, method="softmax", backend="reference", mask=seen.unsqueeze(2).expand(2, 4, 26, 26))
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_kept_queries_attend_fully_and_the_others_give_zero(causal):
    q, k, v = qkv(2, 4, 2, 21, seed=4)
    kept = select(q, k, keep=7, side="queries")
    out = az.attention(q, k, v, method="token_topk", causal=causal, backend="torch", keep=7, side="queries")
    full = az.attention(q, k, v, method="softmax", backend="reference", causal=causal)
    rows = torch.zeros(2, 21, dtype=torch.bool).scatter_(1, kept[:, 0], True)
    for b in range(2):
        torch.testing.assert_close(out[b, :, rows[b]], full[b, :, rows[b]], atol=1e-12, rtol=1e-12)
        assert bool((out[b, :, ~rows[b]] == 0).all())


@pytest.mark.parametrize("side", ["keys", "queries"])
@pytest.mark.parametrize("causal", [False, True])
def test_keeping_everything_is_full_attention(side, causal):
    q, k, v = qkv(2, 4, 2, 19, skv=23, seed=5)
    out = az.attention(q, k, v, method="token_topk", causal=causal, backend="torch", keep=1.0, side=side)
    want = az.attention(q, k, v, method="softmax", backend="reference", causal=causal)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("b", "h", "hkv", "sq", "skv", "causal", "params"),
    [
        (2, 4, 2, 37, 37, True, {"keep": 0.4}),
        (2, 4, 2, 29, 41, True, {"keep": 9, "share": "head", "score": "cls"}),
        (1, 6, 3, 33, 20, True, {"keep": 0.5, "side": "queries", "share": "group"}),  # early rows see no key
        (2, 2, 1, 9, 16, False, {"keep": 5, "side": "queries", "score": "norm"}),
        (2, 4, 4, 25, 25, False, {"keep": 0.2, "share": "head"}),
    ],
)
def test_torch_matches_reference(b, h, hkv, sq, skv, causal, params):
    q, k, v = qkv(b, h, hkv, sq, skv=skv, seed=6, requires_grad=True)
    assert_matches_reference("token_topk", q, k, v, causal=causal, **params)


@pytest.mark.parametrize("side", ["keys", "queries"])
def test_causal_row_chunks_match_the_reference(monkeypatch, side):
    monkeypatch.setattr(token_topk, "MASK_ELEMENTS", 64)  # a few rows per SDPA call
    q, k, v = qkv(2, 4, 2, 30, skv=24, seed=7, requires_grad=True)
    assert_matches_reference("token_topk", q, k, v, causal=True, keep=0.5, side=side, share="group")


@pytest.mark.parametrize(("side", "causal"), [("keys", False), ("keys", True), ("queries", False), ("queries", True)])
def test_return_lse_on_both_sides(monkeypatch, side, causal):
    # several causal chunks, cross (30 queries, 24 keys: early rows see no key), GQA; the dropped queries' lse is -inf
    monkeypatch.setattr(token_topk, "MASK_ELEMENTS", 64)
    q, k, v = qkv(2, 4, 2, 30, skv=24, seed=7, requires_grad=True)
    assert_lse_matches_reference("token_topk", q, k, v, causal=causal, keep=0.5, side=side, share="group")


def test_deterministic():
    q, k, v = qkv(2, 4, 2, 50, seed=8, dtype=torch.float32)
    a = az.attention(q, k, v, method="token_topk", causal=True, backend="torch", keep=0.3)
    b = az.attention(q, k, v, method="token_topk", causal=True, backend="torch", keep=0.3)
    assert torch.equal(a, b) and torch.equal(select(q, k, keep=0.3), select(q, k, keep=0.3))


def test_causal_no_output_depends_on_a_later_value():
    q, k, v = qkv(1, 2, 1, 30, seed=9, requires_grad=True)
    out = az.attention(q, k, v, method="token_topk", causal=True, backend="torch", keep=0.5)
    out[0, :, 13].sum().backward()
    for t in (q, k, v):
        assert bool((t.grad[:, :, 14:] == 0).all())


def test_learned_scores_are_differentiable_in_the_scorer():
    q, k, _ = qkv(1, 4, 2, 12, seed=10)
    scorer = torch.randn(2, 8, dtype=F64, requires_grad=True)
    token_scores(q, k, score="learned", scorer=scorer).sum().backward()
    assert scorer.grad is not None and bool(scorer.grad.abs().sum() > 0)


def test_nn_layer_owns_the_scorer():
    layer = az.nn.Attention(dim=32, heads=4, kv_heads=2, method="token_topk", score="learned", keep=0.5)
    assert tuple(layer.learnable["scorer"].shape) == (2, 8)
    assert layer(torch.randn(2, 10, 32)).shape == (2, 10, 32)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"keep": 41}, "keep"),  # more than the 40 keys
        ({"keep": 1.5}, "keep"),
        ({"keep": 0}, "keep"),
        ({"side": "both"}, "side"),
        ({"score": "random"}, "score"),
        ({"share": "kv"}, "share"),
        ({"score": "learned"}, "scorer"),
        ({"score": "learned", "scorer": torch.zeros(4, 8)}, "scorer"),  # the keys side has 2 KV heads
    ],
)
def test_bad_parameters_name_the_argument(params, name):
    q, k, v = qkv(1, 4, 2, 40)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="token_topk", **params)
