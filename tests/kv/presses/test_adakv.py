"""AdaKVPress: budgets across heads with a floor per head, in a ragged cache of the kept tokens only."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses import AdaKVPress, PressContext
from attnzoo.kv.presses.adakv import adaptive_slots
from attnzoo.kv.ragged import RaggedKVCache
from tests.kv.presses.wrap_helpers import KeyNormScorer, RecentAttentionScorer, decode, prompt, token

LENGTHS = torch.tensor([40, 23])


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
def test_budget_per_sequence_is_exact_with_a_floor_per_head(alpha: float) -> None:
    q, k, v = prompt(hkv=4, h=8)
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS,
                          press=AdaKVPress(KeyNormScorer(compression_ratio=0.7), alpha, page_size=4))
    cache = state.data
    assert isinstance(cache, RaggedKVCache)
    uniform = LENGTHS - torch.floor(LENGTHS * 0.7).long()  # what the wrapped press keeps per head: 12, 7
    assert cache.counts.sum(-1).tolist() == (4 * uniform).tolist()
    assert bool((cache.counts >= torch.floor(alpha * uniform).view(2, 1)).all())
    assert bool((cache.counts <= LENGTHS.view(2, 1)).all())
    assert len(set(cache.counts[0].tolist())) > 1  # the heads got different budgets
    assert bool((cache.positions < LENGTHS.view(2, 1, 1)).all())  # padding never kept


def test_choice_is_the_floor_then_the_best_over_all_heads() -> None:
    scores = torch.tensor([[[9.0, 8, 7, 6, 5, 4], [0.1, 0.3, 0.2, 0.0, 0.0, 0.0]]])
    occupied = torch.ones(1, 2, 6, dtype=torch.bool)
    index = adaptive_slots(scores, occupied, torch.tensor([[3, 3]]), 0.5)  # floors 1 + 1, then 4 best of the rest
    assert index.tolist() == [[[0, 1, 2, 3, 4], [1, -1, -1, -1, -1]]]
    index = adaptive_slots(scores, occupied, torch.tensor([[3, 3]]), 1.0)  # floor = the uniform share
    assert index.tolist() == [[[0, 1, 2], [0, 1, 2]]]


def test_full_safeguard_keeps_what_the_wrapped_press_keeps() -> None:
    q, k, v = prompt()
    scorer = KeyNormScorer(compression_ratio=0.5)
    _, uniform = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=scorer)
    _, ada = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=AdaKVPress(scorer, 1.0))
    for a, b in zip(ada.data.positions.unbind(), uniform.data.positions.unbind()):
        assert sorted(a[a >= 0].tolist()) == sorted(b[b >= 0].tolist())


def test_decoding_equals_dense_attention_over_the_kept_tokens() -> None:
    q, k, v = prompt()
    press = AdaKVPress(RecentAttentionScorer(compression_ratio=0.6), page_size=4)
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=press)
    full = KVCache.from_prompt(k, v, LENGTHS)
    dense = full.keep(state.data.positions)  # the kept prompt positions are slots of the full cache (-1: none)
    for i in range(6):
        tq, tk, tv = token(seed=10 + i)
        out, state = az.step(state, tq, tk, tv)
        dense = dense.append(tk, tv)
        torch.testing.assert_close(out, softmax_attention(dense, tq, state.scale))


def test_nbytes_is_the_kept_tokens_not_the_full_cache() -> None:
    q, k, v = prompt(b=1, h=4, hkv=4, s=2048, d=32, dtype=torch.float32)
    _, full = az.prefill(q, k, v, method="softmax")
    _, ada = az.prefill(q, k, v, method="softmax", press=AdaKVPress(KeyNormScorer(compression_ratio=0.5)))
    assert int(ada.data.counts.sum()) == 4 * 1024
    assert 0.5 * full.data.nbytes <= ada.data.nbytes <= 0.53 * full.data.nbytes


def test_compresses_a_ragged_cache_again_and_keeps_decoding() -> None:
    q, k, v = prompt()
    press = AdaKVPress(KeyNormScorer(compression_ratio=0.5), page_size=4)
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=press)
    _, state = decode(state, 3)
    again = press.compress(state.data, PressContext(q, state.scale, "softmax"))
    assert again.counts.sum(-1).tolist() == (state.data.counts - torch.floor(state.data.counts * 0.5).long()).sum(
        -1).tolist()


def test_for_budget_and_bad_inputs() -> None:
    press = AdaKVPress.for_budget(0.25, press=KeyNormScorer(), alpha_safeguard=0.1)
    assert isinstance(press, AdaKVPress) and press.press.compression_ratio == 0.75
    with pytest.raises(AttnzooError, match="press"):
        AdaKVPress(AdaKVPress(KeyNormScorer()))  # type: ignore[arg-type]
    with pytest.raises(AttnzooError, match="alpha_safeguard"):
        AdaKVPress(KeyNormScorer(), alpha_safeguard=1.5)
    with pytest.raises(AttnzooError, match="page_size"):
        AdaKVPress(KeyNormScorer(), page_size=0)
    with pytest.raises(AttnzooError, match="press"):
        AdaKVPress.for_budget(0.5)
