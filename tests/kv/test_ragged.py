"""RaggedKVCache: attention equals dense masked attention over the same kept tokens; appends; memory; values."""

from __future__ import annotations

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import top_slots
from attnzoo.kv.ragged import RaggedKVCache

F64 = torch.float64


def kept(page_size: int, seed: int = 0) -> tuple[KVCache, RaggedKVCache]:
    """A B=2 prompt of ragged lengths (37, 20), rows keeping different numbers of tokens: the dense cache of the
    kept slots (padded with empty slots) and the ragged one."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, 2, 37, 8, generator=g, dtype=F64), torch.randn(2, 2, 37, 6, generator=g, dtype=F64)
    full = KVCache.from_prompt(k, v, torch.tensor([37, 20]))
    index = top_slots(torch.rand(2, 2, 37, generator=g), full, torch.tensor([[10, 25], [3, 20]]))
    return full.keep(index), RaggedKVCache.from_cache(full, index, page_size)


def queries(tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 4, tokens, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("page_size", [1, 4, 7, 64])
def test_attention_equals_dense_over_kept_tokens(page_size: int) -> None:
    dense, ragged = kept(page_size)
    assert ragged.counts.tolist() == [[10, 25], [3, 20]]
    q = queries(1)
    torch.testing.assert_close(softmax_attention(ragged, q, 0.3), softmax_attention(dense, q, 0.3))
    k, v = torch.randn(2, 2, 3, 8, dtype=F64), torch.randn(2, 2, 3, 6, dtype=F64)
    q3 = queries(3)  # three new tokens at once: causal among them
    dense, ragged = dense.append(k, v), ragged.append(k, v)
    torch.testing.assert_close(softmax_attention(ragged, q3, 0.3), softmax_attention(dense, q3, 0.3))
    assert ragged.counts.tolist() == [[13, 28], [6, 23]]


def test_slot_view_serves_methods_with_own_visibility_and_scores() -> None:
    dense, ragged = kept(4)
    q = queries(1)
    for cache in (dense, ragged):  # a window of 12 positions and a soft-cap, as a method would pass them
        window = cache.key_positions(4) >= cache.query_positions(1) - 12
        capped = 5 * torch.tanh(cache.scores(q, 0.3) / 5)
        out = softmax_attention(cache, q, 0.3, visible=window, scores=capped)
        if cache is dense:
            expected = out
    torch.testing.assert_close(out, expected)
    assert ragged.keys.shape[:3] == ragged.positions.shape == (2, 2, ragged.slots)
    assert sorted(ragged.positions[ragged.occupied()].tolist()) == sorted(dense.positions[dense.occupied()].tolist())


def test_nbytes_counts_the_kept_tokens_only() -> None:
    full = KVCache.from_prompt(torch.randn(1, 4, 1000, 16), torch.randn(1, 4, 1000, 16))
    index = top_slots(torch.rand(1, 4, 1000), full, torch.tensor([[100, 300, 500, 700]]))
    ragged = RaggedKVCache.from_cache(full, index, page_size=16)
    per_slot = 16 * 4 * 2 + 4 + 2 * 8 / 16  # key, value, position; page row and index per page
    kept_bytes = 1600 * per_slot
    assert kept_bytes <= ragged.nbytes <= kept_bytes + 4 * 15 * per_slot + 1000
    assert ragged.nbytes < 0.42 * full.nbytes  # 40 % of the tokens kept


def test_appends_are_values_and_branches_do_not_share() -> None:
    _, ragged = kept(4)
    k1, k2 = torch.ones(2, 2, 1, 8, dtype=F64), -torch.ones(2, 2, 1, 8, dtype=F64)
    v = torch.zeros(2, 2, 1, 6, dtype=F64)
    before = ragged.keys.clone()
    one, two = ragged.append(k1, v), ragged.append(k2, v)  # two branches from one cache
    torch.testing.assert_close(ragged.keys, before)
    last_one, _ = one.latest()
    last_two, _ = two.latest()
    assert bool((last_one == 1).all()) and bool((last_two == -1).all())
    assert one.length.tolist() == [38, 21] and ragged.length.tolist() == [37, 20]


def test_many_appends_grow_pages_and_keep_attention_exact() -> None:
    dense, ragged = kept(3)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        k, v = torch.randn(2, 2, 1, 8, generator=g, dtype=F64), torch.randn(2, 2, 1, 6, generator=g, dtype=F64)
        dense, ragged = dense.append(k, v), ragged.append(k, v)
    q = queries(1)
    torch.testing.assert_close(softmax_attention(ragged, q, 0.3), softmax_attention(dense, q, 0.3))
    assert ragged.counts.tolist() == [[30, 45], [23, 40]]
    assert ragged.page_table.shape[2] == 15  # ceil(45 / 3) pages for the longest row


def test_keep_and_retract() -> None:
    dense, ragged = kept(4)
    index = top_slots(-ragged.positions.float(), ragged, torch.tensor([[2, 2], [2, 2]]))  # the two oldest per row
    smaller = ragged.keep(index)
    assert smaller.counts.tolist() == [[2, 2], [2, 2]]
    firsts = dense.positions.masked_fill(~dense.occupied(), 10**6).sort(-1).values[:, :, :2]
    assert smaller.positions[smaller.occupied()].view(2, 2, 2).sort(-1).values.tolist() == firsts.tolist()
    grown = ragged.append(torch.ones(2, 2, 1, 8, dtype=F64), torch.ones(2, 2, 1, 6, dtype=F64))
    back = grown.retract(torch.tensor([[True, False], [False, True]]))
    assert back.counts.tolist() == [[10, 26], [4, 20]]
    assert back.length.tolist() == [38, 21]


def test_bad_inputs_name_the_argument() -> None:
    dense, _ = kept(4)
    with pytest.raises(AttnzooError, match="page_size"):
        RaggedKVCache.from_cache(dense, page_size=0)
    with pytest.raises(AttnzooError, match="index"):
        RaggedKVCache.from_cache(dense, torch.zeros(2, 3, 4, dtype=torch.long))
