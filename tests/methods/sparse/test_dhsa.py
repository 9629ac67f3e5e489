"""D9 dhsa: boundaries at planted key-similarity drops, the length-normalised chunk score upsampled to keys, the kept
set (budget, sink, local, no future block), user boundaries, determinism, causality, the fast path against the
reference (fp64, GQA, ragged tails, cross, mask and bias, forward and backward), at_density, and bad parameters."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.methods.sparse.dhsa import SPEC, causal_rows, chunk_scores, chunk_starts, select
from attnzoo.registry import Call
from tests.helpers import F64, assert_matches_reference, qkv

SEGMENTS = (0, 5, 12, 20, 32)  # planted chunks [0, 5), [5, 12), [12, 20), [20, 32)


def _planted_keys(hkv: int = 2, d: int = 8) -> torch.Tensor:
    """Keys constant within each planted segment, along a different axis per segment (plus a little noise)."""
    g = torch.Generator().manual_seed(0)
    k = 0.01 * torch.randn(1, hkv, SEGMENTS[-1], d, generator=g, dtype=F64)
    for axis, (start, stop) in enumerate(pairwise(SEGMENTS)):
        k[:, :, start:stop, axis] += 1.0
    return k


def test_boundaries_fall_on_the_planted_similarity_drops():
    starts = chunk_starts(_planted_keys(), chunk_size=8, window=2, key_block=1)  # ⌈32 / 8⌉ = 4 chunks
    assert torch.nonzero(starts[0]).flatten().tolist() == list(SEGMENTS[:-1])


def test_boundaries_snap_to_key_blocks():
    starts = chunk_starts(_planted_keys(), chunk_size=8, window=2, key_block=4)  # edges at 0, 4, 8, ...
    assert starts.shape == (1, 8)
    assert torch.nonzero(starts[0]).flatten().tolist() == [0, 1, 3, 5]  # 4 ~ 5, 12 and 20 exactly


def test_chunk_score_is_mean_times_root_size_upsampled_to_keys():
    q, k, _ = qkv(1, 2, 1, 32, seed=1)
    starts = torch.zeros(1, 32, dtype=torch.bool)
    starts[0, list(SEGMENTS[:-1])] = True
    scores = chunk_scores(q, k, starts, block_size=8, key_block=1, share="head")  # (1, 2, 4, 32)
    for h in range(2):
        for a in range(4):
            rows = q[0, h, 8 * a: 8 * a + 8].float()
            q_hat = rows.mean(0) * 8**0.5
            for start, stop in pairwise(SEGMENTS):
                k_hat = k[0, 0, start:stop].float().mean(0) * (stop - start) ** 0.5
                want = (q_hat * k_hat).sum()
                torch.testing.assert_close(scores[0, h, a, start:stop], want.expand(stop - start).float())


def test_length_normalisation_lets_a_long_aligned_chunk_win():
    """Every key along e_0 at 1.0, except a 2-key chunk at 1.2: its mean is larger, but the 8-key chunk's √8 wins."""
    k = torch.zeros(1, 1, 16, 4, dtype=F64)
    k[..., 0] = 1.0
    k[:, :, 8:10, 0] = 1.2
    q = torch.zeros(1, 1, 16, 4, dtype=F64)
    q[..., 0] = 1.0
    starts = torch.zeros(1, 16, dtype=torch.bool)
    starts[0, [0, 8, 10]] = True  # chunks of 8, 2 and 6 keys
    sel = select(q, k, causal=False, block_size=16, budget=8, sink=0, local=0, boundaries=starts)
    assert sorted(int(i) for i in sel.indices[0, 0, 0] if i >= 0) == list(range(8))


def test_kept_keys_budget_sink_local_and_no_future_block():
    q, k, _ = qkv(2, 4, 2, 60, seed=2)
    sel = select(q, k, causal=True, block_size=8, key_block=2, budget=12, sink=3, local=5, chunk_size=6, window=2)
    assert sel.indices.shape == (2, 1, 8, 6) and sel.block_q == 8 and sel.block_k == 2
    blocks = sel.blocks()[:, 0]  # (2, 8, 30)
    for a in range(8):
        last = min(8 * a + 7, 59) // 2
        seen = blocks[:, a]
        assert not bool(seen[:, last + 1:].any())  # nothing after the block's last query
        assert bool(seen[:, max(0, last - 2): last + 1].all())  # local: ⌈5 / 2⌉ = 3 blocks
        assert bool(seen[:, : min(2, last + 1)].all())  # sink: ⌈3 / 2⌉ = 2 blocks
        assert bool((seen.sum(-1) == min(6, last + 1)).all())


def test_user_boundaries_decide_the_chunks():
    q, k, _ = qkv(1, 2, 2, 24, seed=3)
    starts = torch.zeros(1, 24, dtype=torch.bool)
    starts[0, [0, 6, 18]] = True
    scores = chunk_scores(q, k, starts, block_size=4, key_block=1, share="all")
    for start, stop in ((0, 6), (6, 18), (18, 24)):
        assert bool((scores[..., start:stop] == scores[..., start:start + 1]).all())
    a = select(q, k, causal=True, block_size=4, budget=6, sink=0, local=1, boundaries=starts)
    b = select(q, k, causal=True, block_size=4, budget=6, sink=0, local=1, boundaries=starts.clone())
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("share", ["all", "group", "head"])
def test_share_gives_one_selection_per_batch_group_or_head(share):
    q, k, _ = qkv(2, 6, 3, 20, seed=4)
    sel = select(q, k, causal=False, block_size=4, key_block=2, budget=6, sink=0, local=0, share=share)
    assert sel.indices.shape[1] == {"all": 1, "group": 3, "head": 6}[share]


def test_deterministic():
    q, k, v = qkv(2, 4, 2, 50, seed=5, dtype=torch.float32)
    params = {"block_size": 8, "budget": 16, "sink": 2, "local": 4, "chunk_size": 5}
    a = az.attention(q, k, v, method="dhsa", causal=True, backend="torch", **params)
    b = az.attention(q, k, v, method="dhsa", causal=True, backend="torch", **params)
    assert torch.equal(a, b)
    assert torch.equal(select(q, k, causal=True, **params).indices, select(q, k, causal=True, **params).indices)


def test_whole_budget_is_full_attention():
    q, k, v = qkv(2, 4, 2, 23, seed=6)
    for causal in (False, True):
        out = az.attention(q, k, v, method="dhsa", causal=causal, backend="torch", block_size=5, key_block=3,
                           budget=24, sink=0, local=0)
        want = az.attention(q, k, v, method="softmax", backend="reference", causal=causal)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_causal_no_output_depends_on_a_later_token():
    q, k, v = qkv(1, 2, 1, 30, seed=7, requires_grad=True)
    out = az.attention(q, k, v, method="dhsa", causal=True, backend="torch", block_size=4, budget=8, sink=2,
                       local=2, chunk_size=4)
    out[0, :, 13].sum().backward()
    for t in (q, k, v):
        assert bool((t.grad[:, :, 14:] == 0).all())


@pytest.mark.parametrize(
    ("b", "h", "hkv", "sq", "skv", "causal", "params"),
    [
        (2, 4, 2, 37, 37, True, {"block_size": 5, "key_block": 1, "budget": 9, "sink": 2, "local": 3}),
        (2, 4, 2, 29, 41, True, {"block_size": 8, "key_block": 3, "budget": 12, "share": "group"}),
        (1, 6, 3, 33, 20, False, {"block_size": 4, "key_block": 2, "budget": 8, "share": "head", "chunk_size": 3}),
        (2, 2, 1, 9, 9, False, {"block_size": 1, "key_block": 1, "budget": 3, "sink": 1, "local": 1}),
        (2, 4, 2, 37, 37, True, {"block_size": 8, "key_block": 2, "budget": 10}),  # attended as causal_rows
        (1, 4, 2, 20, 52, True, {"block_size": 12, "key_block": 4, "budget": 16, "share": "head"}),
    ],
)
def test_torch_matches_reference(b, h, hkv, sq, skv, causal, params):
    q, k, v = qkv(b, h, hkv, sq, skv=skv, seed=8, requires_grad=True)
    assert_matches_reference("dhsa", q, k, v, causal=causal, **params)


def test_causal_rows_is_the_same_causal_mask_in_key_block_rows():
    q, k, _ = qkv(2, 4, 2, 45, skv=53, seed=11)
    sel = select(q, k, causal=True, block_size=12, key_block=4, budget=16, sink=4, local=4, chunk_size=8)
    rows = causal_rows(sel)
    assert (rows.block_q, rows.block_k) == (4, 4) and rows.indices.shape[2] == 12
    pos = torch.arange(45).view(-1, 1) + 8 >= torch.arange(53)
    assert torch.equal(rows.dense(4) & pos, sel.dense(4) & pos)
    last = (torch.arange(12) * 4 + 3).clamp(max=44) + 8  # each sub-block's last query, in key positions
    assert bool(((rows.indices * 4 <= last.view(1, 1, -1, 1)) | (rows.indices < 0)).all())  # no hidden block


def test_torch_matches_reference_with_mask_and_bias():
    q, k, v = qkv(2, 4, 2, 26, seed=9, requires_grad=True)
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(2, 1, 26, 26, generator=g) < 0.8
    bias = torch.randn(1, 4, 26, 26, generator=g, dtype=F64)
    assert_matches_reference("dhsa", q, k, v, causal=True, mask=mask, bias=bias, block_size=4, budget=10, sink=2,
                             local=2)


@pytest.mark.parametrize(("causal", "fraction"), [(False, 1 / 4), (True, 1 / 8), (True, 1 / 16)])
def test_at_density_reads_about_that_fraction(causal, fraction):
    n = 1024
    call = Call(batch=1, heads=2, kv_heads=2, seq_q=n, seq_kv=n, head_dim=16, head_dim_v=16, causal=causal,
                device=torch.device("cpu"), dtype=torch.float32, requires_grad=False, has_mask=False, has_bias=False)
    params = SPEC.at_density(call, fraction)
    q, k, _ = qkv(1, 2, 2, n, d=16, seed=10, dtype=torch.float32)
    sel = select(q, k, causal=causal, **params)
    allowed = 0.5 + 0.5 / n if causal else 1.0
    seen = sel.density() / allowed
    assert abs(seen - fraction) < 0.35 * fraction  # block-level counting: whole query blocks see whole budgets


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"budget": 41}, "budget"),  # more than the 40 keys
        ({"key_block": 3, "budget": 10}, "budget"),  # not a multiple of key_block
        ({"block_size": 0}, "block_size"),
        ({"key_block": 0}, "key_block"),
        ({"sink": -1}, "sink"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"window": 0}, "window"),
        ({"share": "kv"}, "share"),
        ({"boundaries": torch.zeros(1, 39, dtype=torch.bool)}, "boundaries"),
        ({"boundaries": torch.ones(1, 40, dtype=torch.bool), "key_block": 2, "budget": 8}, "boundaries"),
    ],
)
def test_bad_parameters_name_the_argument(params, name):
    q, k, v = qkv(1, 2, 2, 40)
    with pytest.raises(AttnzooError, match=name):
        az.attention(q, k, v, method="dhsa", causal=True, **{"budget": 8, **params})
