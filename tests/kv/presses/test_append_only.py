"""AppendOnlyPress: each token kept or skipped once; earlier entries never change; the budget band holds."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses import AppendOnlyPress, PressContext
from attnzoo.kv.ragged import RaggedKVCache
from tests.kv.presses.wrap_helpers import prompt, token

LENGTHS = torch.tensor([40, 23])


def rows(cache: RaggedKVCache) -> list[list[tuple[list[float], int]]]:
    """Each row's entries in slot order: (key, position)."""
    keys, positions = cache.keys, cache.positions
    return [[(keys[b, h, j].tolist(), int(positions[b, h, j])) for j in range(int(cache.counts[b, h]))]
            for b in range(keys.shape[0]) for h in range(keys.shape[1])]


def cap(n: torch.Tensor, ratio: float) -> torch.Tensor:
    return n - torch.floor(n * ratio).long()


@pytest.mark.parametrize("slack", [0, 3])
def test_earlier_entries_never_change_and_the_budget_band_holds(slack: int) -> None:
    q, k, v = prompt()
    press = AppendOnlyPress(0.6, slack=slack, page_size=4)
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=press)
    before = rows(state.data)
    for i in range(25):
        _, state = az.step(state, *token(seed=i))
        now = rows(state.data)
        for old, new in zip(before, now):
            assert new[: len(old)] == old and len(new) - len(old) in (0, 1)  # appended at most one, nothing moved
        n = cap(state.data.length, 0.6).view(2, 1)
        assert bool((state.data.counts <= n).all()) and bool((state.data.counts >= n - slack).all())
        before = now
    if slack == 0:  # the band is one value: exactly the scoring presses' budget
        assert state.data.counts.tolist() == [[26, 26], [20, 20]]


def test_prompt_tokens_are_decided_in_order_by_the_threshold() -> None:
    keys = torch.tensor([1.0, 1, 5, 1, 5, 1, 5, 5]).view(1, 1, 8, 1)  # low norms are kept first
    cache = KVCache.from_prompt(keys, keys.clone())
    kept = AppendOnlyPress(0.5, slack=4).compress(cache, PressContext(torch.zeros(1, 1, 8, 1), 1.0, "softmax"))
    # 0: the first token; 1: over the budget of 2 tokens (1); 2, 4, 6, 7: below the running mean; 3, 5: above it
    assert kept.positions[kept.occupied()].tolist() == [0, 3, 5]


def test_attention_over_the_kept_tokens() -> None:
    q, k, v = prompt()
    _, state = az.prefill(q, k, v, method="softmax", lengths=LENGTHS, press=AppendOnlyPress(0.5, slack=2))
    full = KVCache.from_prompt(k, v, LENGTHS)
    dense = full.keep(state.data.positions)
    tq, tk, tv = token(seed=3)
    out, _ = az.step(state, tq, tk, tv)
    torch.testing.assert_close(out, softmax_attention(dense.append(tk, tv), tq, state.scale))


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(AttnzooError, match="compression_ratio"):
        AppendOnlyPress(1.0)
    with pytest.raises(AttnzooError, match="slack"):
        AppendOnlyPress(slack=-1)
    with pytest.raises(AttnzooError, match="scorer"):
        AppendOnlyPress(scorer=3)  # type: ignore[arg-type]
    q, k, v = prompt()
    with pytest.raises(AttnzooError, match="scorer"):
        az.prefill(q, k, v, method="softmax", press=AppendOnlyPress(scorer=lambda k, v: k))
