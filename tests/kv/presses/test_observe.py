from __future__ import annotations

import math

import torch

from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.observe import (
    attention_blocks,
    decode_target,
    evict_to,
    kept_mask,
    protect,
    query_positions,
    slot_counts,
)
from tests.helpers import qkv


def ragged_cache(seq: int = 6) -> KVCache:
    _, k, v = qkv(2, 2, 1, seq, seed=0)
    return KVCache.from_prompt(k, v, torch.tensor([seq, 4]))


def test_query_positions_of_a_right_padded_prompt_and_of_a_step() -> None:
    cache = ragged_cache()
    assert query_positions(cache, 6).view(2, 6).tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, -1, -1]]
    assert query_positions(cache, 1).view(2).tolist() == [5, 3]


def test_attention_blocks_cover_every_row_and_padding_rows_see_nothing() -> None:
    cache = ragged_cache()
    q = qkv(2, 2, 1, 6, seed=1)[0]
    blocks = list(attention_blocks(cache, q, 0.5, block=4))
    assert [start for start, _, _ in blocks] == [0, 4]
    weights = torch.cat([w for _, w, _ in blocks], 2)
    torch.testing.assert_close(weights.sum(-1), torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2]).view(2, 1, 6).expand(
        2, 2, 6))


def test_protect_ranks_the_kept_slots_first_the_latest_first() -> None:
    cache = ragged_cache()
    scores = torch.tensor([9.0, 8.0, 1.0, 0.0, 5.0, 7.0]).expand(2, 1, 6)
    ranked = protect(scores, cache, cache.positions >= 2)
    assert ranked[0, 0].argsort(descending=True).tolist() == [5, 4, 3, 2, 0, 1]


def test_decode_target_and_eviction() -> None:
    cache = ragged_cache()
    assert decode_target(cache, 0.5, None).tolist() == [[3], [2]]
    assert decode_target(cache, 0.0, 5).tolist() == [[5], [4]]
    out = evict_to(cache, cache.positions.float(), torch.tensor([[3], [2]]))
    assert out.token_counts().tolist() == [[3], [2]]
    assert evict_to(cache, cache.positions.float(), torch.tensor([[6], [4]])) is cache


def test_kept_mask_and_slot_counts() -> None:
    cache = ragged_cache()
    assert kept_mask(torch.tensor([[[4, 0, -1]], [[1, -1, -1]]]), 6).long().tolist() == [
        [[1, 0, 0, 0, 1, 0]], [[0, 1, 0, 0, 0, 0]]]
    assert slot_counts(cache).tolist() == [[[1.0] * 6], [[1.0] * 4 + [0.0] * 2]]
    merged = cache.keep(torch.tensor([[[0, 1]], [[2, -1]]]), log_weight=torch.full((2, 1, 2), math.log(3.0)))
    torch.testing.assert_close(slot_counts(merged), torch.tensor([[[3.0, 3.0]], [[3.0, 0.0]]]))
