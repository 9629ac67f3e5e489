"""The selection layer: BlockSelection's views (counts, dense, block mask, density), its checks, and the shared rules
(top-k with always-on blocks and causal exclusion, mass threshold, block means, group sharing): results, determinism
and bad inputs."""

from __future__ import annotations

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.kernels.selection import (
    BlockSelection,
    allowed_blocks,
    block_means,
    group_scores,
    random_selection,
    shared_by_group,
    threshold_blocks,
    topk_blocks,
)

SIZES = dict(seq_q=18, seq_kv=14, block_q=4, block_k=4)  # 5 query blocks, 4 key blocks, both ragged


def test_from_blocks_counts_and_dense_round_trip():
    blocks = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    blocks[0, 0, 0] = False  # an empty row
    sel = BlockSelection.from_blocks(blocks, **SIZES)
    assert torch.equal(sel.blocks(), blocks)
    assert torch.equal(sel.counts, blocks.sum(-1))
    assert (sel.num_q_blocks, sel.num_kv_blocks) == (5, 4)
    dense = sel.dense(6)  # 2 query heads per selection head
    assert dense.shape == (2, 6, 18, 14)
    assert bool(dense[0, 1, 5, 9]) == bool(blocks[0, 0, 1, 2]) and bool(dense[1, 5, 17, 13]) == bool(blocks[1, 2, 4, 3])
    assert not dense[0, 0, :4].any()


def test_density_counts_ragged_blocks_by_their_real_rows_and_keys():
    full = BlockSelection.from_blocks(torch.ones(1, 1, 5, 4, dtype=torch.bool), **SIZES)
    assert full.density() == pytest.approx(1.0)
    last = BlockSelection(torch.tensor([[[[3]]] * 5]).view(1, 1, 5, 1), **SIZES)  # the 2-key last block for all
    assert last.density() == pytest.approx(2 / 14)


def test_block_mask_has_the_selection_per_head():
    sel = random_selection(2, 2, density=0.5, generator=torch.Generator().manual_seed(1), **SIZES)
    bm = sel.block_mask(4)
    assert bm.shape == (2, 4, 18, 14)
    assert torch.equal(bm.kv_num_blocks.long(), sel.counts.repeat_interleave(2, dim=1))
    for b, h, a in ((0, 0, 0), (1, 3, 4)):
        got = set(bm.kv_indices[b, h, a, : int(bm.kv_num_blocks[b, h, a])].tolist())
        assert got == {i for i in sel.indices[b, h // 2, a].tolist() if i >= 0}


def test_topk_keeps_the_highest_allowed_blocks_and_counts_always_in_top_k():
    scores = torch.tensor([[[[0.1, 0.9, 0.5, 0.3]] * 5]])
    sel = topk_blocks(scores, 2, causal=False, **SIZES)
    assert sel.indices[0, 0, 0].tolist() == [1, 2]
    always = torch.tensor([True, False, False, False])
    sel = topk_blocks(scores, 2, causal=False, always=always, **SIZES)
    assert sel.indices[0, 0, 0].tolist() == [0, 1]


def test_topk_causal_never_selects_a_future_block_and_own_block_via_always():
    g = torch.Generator().manual_seed(2)
    for seq_q, seq_kv in ((40, 40), (24, 40), (40, 24)):
        nq, nk = -(-seq_q // 8), -(-seq_kv // 8)
        scores = torch.rand(2, 3, nq, nk, generator=g)
        sel = topk_blocks(scores, min(3, nk), causal=True, seq_q=seq_q, seq_kv=seq_kv, block_q=8, block_k=8)
        # a selected key block always holds a key that some query of the block may see
        causal = torch.arange(seq_kv) <= torch.arange(seq_q)[:, None] + seq_kv - seq_q
        reachable = (sel.dense(3) & causal).view(2, 3, seq_q, nk, 8).any(-1) if seq_kv % 8 == 0 else None
        allowed = allowed_blocks(causal=True, seq_q=seq_q, seq_kv=seq_kv, block_q=8, block_k=8)
        assert not (sel.blocks() & ~allowed).any()
        if reachable is not None:
            assert torch.equal(reachable.view(2, 3, nq, 8, nk).any(3), sel.blocks())
    own = torch.eye(5, 4, dtype=torch.bool)  # block a's own key block when block sizes and lengths agree
    sel = topk_blocks(torch.zeros(1, 1, 4, 4), 1, causal=True, always=own[:4], seq_q=16, seq_kv=16, block_q=4,
                      block_k=4)
    assert sel.indices[0, 0, :, 0].tolist() == [0, 1, 2, 3]


def test_rules_are_deterministic():
    scores = torch.randn(2, 4, 5, 4, generator=torch.Generator().manual_seed(3))
    ties = torch.zeros(2, 4, 5, 4)
    for s in (scores, ties):
        assert torch.equal(topk_blocks(s, 2, causal=True, **SIZES).indices,
                           topk_blocks(s.clone(), 2, causal=True, **SIZES).indices)
        assert torch.equal(threshold_blocks(s, 0.7, causal=False, **SIZES).indices,
                           threshold_blocks(s.clone(), 0.7, causal=False, **SIZES).indices)


def test_threshold_keeps_the_fewest_blocks_reaching_the_mass():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.25, 0.05])).expand(1, 1, 5, 4)
    assert threshold_blocks(logits, 0.6, causal=False, **SIZES).indices[0, 0, 0].tolist() == [1]
    assert threshold_blocks(logits, 0.8, causal=False, **SIZES).indices[0, 0, 0].tolist() == [1, 2]
    assert threshold_blocks(logits, 0.9, causal=False, **SIZES).indices[0, 0, 0].tolist() == [0, 1, 2]
    assert threshold_blocks(logits, 1.0, causal=False, **SIZES).counts.tolist() == [[[4] * 5]]
    always = torch.tensor([False, False, False, True])
    assert threshold_blocks(logits, 0.6, causal=False, always=always, **SIZES).indices[0, 0, 0].tolist() == [1, 3]


def test_block_means_average_ragged_last_block_over_its_rows():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    assert block_means(x, 4).flatten().tolist() == [1.5, 5.5, 8.5]


def test_group_sharing():
    scores = torch.arange(2 * 4 * 5 * 4, dtype=torch.float).view(2, 4, 5, 4)
    pooled = group_scores(scores, 2)
    assert torch.equal(pooled[:, 0], scores[:, 0] + scores[:, 1])
    blocks = torch.zeros(1, 4, 5, 4, dtype=torch.bool)
    blocks[0, 0, 0, 1] = blocks[0, 1, 0, 3] = blocks[0, 2, 0, 0] = True
    shared = shared_by_group(BlockSelection.from_blocks(blocks, **SIZES), 4, 2)
    assert shared.indices.shape[1] == 2
    assert shared.blocks()[0, 0, 0].tolist() == [False, True, False, True]
    assert shared.blocks()[0, 1, 0].tolist() == [True, False, False, False]


def test_bad_inputs_name_the_argument():
    scores = torch.zeros(1, 1, 5, 4)
    with pytest.raises(AttnzooError, match="top_k"):
        topk_blocks(scores, 5, causal=False, **SIZES)
    with pytest.raises(AttnzooError, match="block_q"):
        topk_blocks(scores, 1, causal=False, seq_q=18, seq_kv=14, block_q=0, block_k=4)
    with pytest.raises(AttnzooError, match="scores"):
        topk_blocks(torch.zeros(1, 1, 4, 4), 1, causal=False, **SIZES)
    with pytest.raises(AttnzooError, match="tau"):
        threshold_blocks(scores, 1.5, causal=False, **SIZES)
    with pytest.raises(AttnzooError, match="block"):
        block_means(torch.zeros(1, 1, 4, 2), 0)
    q, k = torch.zeros(1, 4, 18, 8), torch.zeros(1, 2, 14, 8)
    sel = BlockSelection.from_blocks(torch.ones(1, 4, 5, 4, dtype=torch.bool), **SIZES)
    sel.check(q, k)
    for bad in (BlockSelection(sel.indices[:, :, :4], **SIZES),  # wrong number of query blocks
                BlockSelection(sel.indices.repeat(2, 1, 1, 1), **SIZES),  # wrong batch
                BlockSelection(sel.indices[:, :3], **SIZES),  # 3 heads do not divide 4
                BlockSelection(sel.indices + 1, **SIZES),  # an index past the last key block
                BlockSelection(sel.indices.int(), **SIZES),
                BlockSelection(torch.zeros(1, 4, 5, 2, dtype=torch.long), **SIZES),  # a repeated block
                BlockSelection(sel.indices, seq_q=18, seq_kv=13, block_q=4, block_k=4)):
        with pytest.raises(AttnzooError, match="selection"):
            bad.check(q, k)
