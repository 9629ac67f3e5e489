"""KVCache: slots with positions, value semantics of appends, rings, ragged prompts, keep(), nbytes."""

from __future__ import annotations

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.kv.cache import KVCache


def tokens(b: int, h: int, t: int, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d + 1, generator=g)


def test_prompt_cache_holds_positions_and_lengths() -> None:
    k, v = tokens(2, 3, 5)
    cache = KVCache.from_prompt(k, v)
    assert cache.slots == 5 and cache.length.tolist() == [5, 5]
    assert cache.positions[1, 2].tolist() == [0, 1, 2, 3, 4]
    assert cache.query_positions(2).view(2, 2).tolist() == [[3, 4], [3, 4]]


def test_stepping_twice_from_one_state_gives_independent_branches() -> None:
    k, v = tokens(2, 2, 6)
    base = KVCache.from_prompt(k[:, :, :4], v[:, :, :4])
    first = base.append(k[:, :, 4:5], v[:, :, 4:5])
    second = base.append(k[:, :, 5:6], v[:, :, 5:6])  # a second branch from the same state
    assert torch.equal(first.keys[:, :, 4], k[:, :, 4]) and torch.equal(second.keys[:, :, 4], k[:, :, 5])
    assert base.slots == 4 and torch.equal(base.keys, k[:, :, :4])
    again = first.append(k[:, :, 5:6], v[:, :, 5:6])  # the first branch continues, the second is untouched
    assert torch.equal(again.keys[:, :, :5], k[:, :, :5]) and torch.equal(second.keys[:, :, 4], k[:, :, 5])
    assert torch.equal(first.keys[:, :, 4], k[:, :, 4])


def test_append_in_place_reuses_the_storage() -> None:
    k, v = tokens(1, 2, 8)
    cache = KVCache.from_prompt(k[:, :, :2], v[:, :, :2]).append(k[:, :, 2:3], v[:, :, 2:3])
    storage, pointer = cache.storage, cache.keys.data_ptr()
    for t in range(3, 8):
        cache = cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert cache.storage is storage and cache.keys.data_ptr() == pointer  # no copy of the cache
    assert storage is not None and storage.capacity >= 8
    assert torch.equal(cache.keys, k) and cache.positions[0, 0].tolist() == list(range(8))


def test_appends_under_autograd_never_write_into_recorded_tensors() -> None:
    k, v = tokens(1, 1, 3)
    k.requires_grad_(True)
    cache = KVCache.from_prompt(k[:, :, :2], v[:, :, :2])
    grown = cache.append(k[:, :, 2:], v[:, :, 2:])
    grown.keys.sum().backward()
    assert k.grad is not None and torch.equal(k.grad, torch.ones_like(k))
    assert grown.storage is None and cache.slots == 2


@pytest.mark.parametrize("prompt", [0, 3, 9])
def test_ring_keeps_exactly_the_last_positions(prompt: int) -> None:
    ring = 4
    k, v = tokens(2, 2, 14)
    cache = KVCache.from_prompt(k[:, :, :prompt], v[:, :, :prompt], ring=ring)
    for t in range(prompt, 14):
        assert cache.slots == ring
        kept = sorted(p for p in cache.positions[0, 0].tolist() if p >= 0)
        assert kept == list(range(max(0, t - ring), t))
        for slot, p in enumerate(cache.positions[1, 1].tolist()):
            if p >= 0:
                assert slot == p % ring and torch.equal(cache.keys[1, 1, slot], k[1, 1, p])
        cache = cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert cache.nbytes == KVCache.from_prompt(k, v, ring=ring).nbytes  # memory O(ring), not O(tokens)


def test_a_continued_ring_state_cannot_be_continued_again_but_a_copy_can() -> None:
    k, v = tokens(1, 1, 7)
    base = KVCache.from_prompt(k[:, :, :5], v[:, :, :5], ring=3).append(k[:, :, 5:6], v[:, :, 5:6])
    branch = base.copy()
    left = base.append(k[:, :, 6:7], v[:, :, 6:7])
    with pytest.raises(AttnzooError, match="cache"):
        base.append(v[:, :, 6:7, :4], v[:, :, 6:7])
    right = branch.append(v[:, :, 6:7, :4], v[:, :, 6:7])
    assert torch.equal(left.positions, right.positions)
    assert torch.equal(left.keys[0, 0, 0], k[0, 0, 6]) and torch.equal(right.keys[0, 0, 0], v[0, 0, 6, :4])
    assert torch.equal(branch.keys[0, 0, 0], k[0, 0, 3])  # the copy itself is untouched


def test_an_append_after_a_press_replaced_the_tensors_does_not_write_into_the_old_storage() -> None:
    from dataclasses import replace
    k, v = tokens(1, 1, 4)
    cache = KVCache.from_prompt(k[:, :, :2], v[:, :, :2]).append(k[:, :, 2:3], v[:, :, 2:3])
    edited = replace(cache, keys=cache.keys * 2)  # a press rewriting the keys, same version
    grown = edited.append(k[:, :, 3:4], v[:, :, 3:4])
    assert torch.equal(grown.keys[:, :, :3], 2 * k[:, :, :3]) and torch.equal(cache.keys, k[:, :, :3])


def test_ring_resets_the_slot_data_of_overwritten_slots() -> None:
    k, v = tokens(1, 1, 4)
    cache = KVCache.from_prompt(k[:, :, :2], v[:, :, :2], ring=2)
    cache = KVCache(cache.keys, cache.values, cache.positions, cache.length, ring=2,
                    slot_data={"score": torch.ones(1, 1, 2)})
    cache = cache.append(k[:, :, 2:3], v[:, :, 2:3])  # position 2 overwrites slot 0
    assert cache.slot_data["score"].tolist() == [[[0.0, 1.0]]]


def test_ragged_prompts_continue_from_their_own_lengths() -> None:
    k, v = tokens(2, 2, 6)
    cache = KVCache.from_prompt(k[:, :, :5], v[:, :, :5], torch.tensor([5, 2]))
    assert cache.positions[1, 0].tolist() == [0, 1, -1, -1, -1]
    assert cache.token_counts().tolist() == [[5, 5], [2, 2]]
    cache = cache.append(k[:, :, 5:6], v[:, :, 5:6])
    assert cache.positions[:, 0, 5].tolist() == [5, 2] and cache.length.tolist() == [6, 3]
    assert cache.query_positions().view(-1).tolist() == [5, 2]
    seen = cache.visible_to(cache.query_positions(), 2)
    assert seen[1, 0, 0].tolist() == [True, True, False, False, False, True]


def test_ragged_ring_keeps_each_sequences_last_tokens() -> None:
    k, v = tokens(2, 1, 6)
    cache = KVCache.from_prompt(k, v, torch.tensor([6, 2]), ring=3)
    assert sorted(cache.positions[0, 0].tolist()) == [3, 4, 5]
    assert sorted(cache.positions[1, 0].tolist()) == [-1, 0, 1]


@pytest.mark.parametrize("lengths", [torch.tensor([1, 7]), torch.tensor([-1, 2]), torch.tensor([1.0, 2.0]),
                                     torch.tensor([1])])
def test_bad_lengths_are_refused(lengths: torch.Tensor) -> None:
    k, v = tokens(2, 1, 6)
    with pytest.raises(AttnzooError, match="lengths"):
        KVCache.from_prompt(k, v, lengths)


def test_keep_compacts_slots_and_empties_minus_one_entries() -> None:
    k, v = tokens(1, 2, 5)
    cache = KVCache.from_prompt(k, v)
    cache = KVCache(cache.keys, cache.values, cache.positions, cache.length, log_weight=torch.zeros(1, 2, 5),
                    slot_data={"score": torch.arange(10.0).view(1, 2, 5)})
    kept = cache.keep(torch.tensor([[[4, 1, -1], [0, -1, -1]]]))
    assert kept.slots == 3 and kept.length.tolist() == [5]
    assert kept.positions.tolist() == [[[4, 1, -1], [0, -1, -1]]]
    assert torch.equal(kept.keys[0, 0, 0], k[0, 0, 4]) and torch.equal(kept.values[0, 1, 0], v[0, 1, 0])
    assert kept.slot_data["score"].tolist() == [[[4.0, 1.0, 0.0], [5.0, 0.0, 0.0]]]
    assert kept.log_weight is not None and kept.log_weight.shape == (1, 2, 3)
    grown = kept.append(k[:, :, :1], v[:, :, :1])
    assert grown.positions[0, 1].tolist() == [0, -1, -1, 5] and grown.slot_data["score"][0, 0, 3] == 0


def test_keep_refuses_an_index_of_another_shape() -> None:
    k, v = tokens(2, 2, 3)
    with pytest.raises(AttnzooError, match="index"):
        KVCache.from_prompt(k, v).keep(torch.zeros(1, 2, 1, dtype=torch.long))


def test_nbytes_counts_the_storage_held() -> None:
    k, v = tokens(2, 3, 5)
    cache = KVCache.from_prompt(k, v)
    plain = (k.numel() + v.numel()) * 4 + cache.positions.numel() * 4
    assert cache.nbytes == plain
    grown = cache.append(k[:, :, :1], v[:, :, :1])
    storage = grown.storage
    assert storage is not None and grown.nbytes == storage.nbytes > plain
    per_slot = 2 * 3 * (4 + 5 + 1) * 4  # keys, values and positions of one slot, every (batch, head) row
    assert storage.nbytes == storage.capacity * per_slot
    extra = torch.zeros(2, 1, 1, 4)
    from dataclasses import replace
    assert replace(grown, extras={"previous": extra}).nbytes == grown.nbytes + extra.numel() * 4
