from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import LazyEvictionPress
from tests.helpers import qkv
from tests.kv.presses.patterns import focused, kept_positions, prompt

# The window is rows 10..15. Slot 2 is attended at 10 and 14 (events 2, 10, 14: MRI 8, idle 1: score 7); slot 3 at
# 11 (events 3, 11: MRI 8, idle 4: score 4); rows 12, 13, 15 attend themselves; slot p never attended scores −(15 − p).
TARGETS = {10: [2], 11: [3], 12: [12], 13: [13], 14: [2], 15: [15]}


def test_keeps_what_is_due_to_recur_and_the_window() -> None:
    cache, context = prompt(*focused(16, TARGETS, heads=2))
    press = LazyEvictionPress(budget=9, window_size=6)
    assert kept_positions(press.compress(cache, context)) == [2, 3, 9, 10, 11, 12, 13, 14, 15]
    scores = press.score(cache, context)[0, 0]
    assert scores[2].item() == 7.0 and scores[3].item() == 4.0 and scores[9].item() == -6.0


def test_recurrence_is_recorded_in_slot_data() -> None:
    cache, context = prompt(*focused(16, TARGETS))
    out = LazyEvictionPress(budget=9, window_size=6).compress(cache, context)
    pos = out.positions[0, 0].tolist()
    assert out.slot_data["lazy_mri"][0, 0, pos.index(2)].item() == 8.0
    assert out.slot_data["lazy_last"][0, 0, pos.index(2)].item() == 12.0  # last event 14, stored as 14 − 2


def test_threshold() -> None:
    cache, context = prompt(*focused(16, {10: [2, 3], 11: [2]}))  # row 10 splits its attention between 2 and 3
    strict = LazyEvictionPress(budget=7, window_size=6, threshold=0.9).score(cache, context)[0, 0]
    assert strict[2].item() == 9.0 - 4.0 and strict[3].item() == -12.0  # only row 11's attention counts
    loose = LazyEvictionPress(budget=7, window_size=6, threshold=0.4).score(cache, context)[0, 0]
    assert loose[2].item() == 8.0 - 4.0 and loose[3].item() == 7.0 - 5.0


def test_eviction_is_lagged_to_every_window_while_decoding() -> None:
    q, k, v = qkv(2, 2, 1, 16, seed=0)
    _, state = az.prefill(q, k, v, method="softmax", lengths=torch.tensor([16, 11]),
                          press=LazyEvictionPress(budget=8, window_size=6))
    counts = []
    for t in range(8):
        _, state = az.step(state, *qkv(2, 2, 1, 1, seed=10 + t))
        counts.append(state.data.token_counts()[:, 0].tolist())
    # sequence 0: lengths 17..24, evicts at 18 and 24; sequence 1: lengths 12..19, evicts at 12 and 18
    assert counts == [[9, 8], [8, 9], [9, 10], [10, 11], [11, 12], [12, 13], [13, 8], [8, 9]]


def test_bad_arguments() -> None:
    with pytest.raises(AttnzooError, match="threshold"):
        LazyEvictionPress(threshold=0.0)
    with pytest.raises(AttnzooError, match="window_size"):
        LazyEvictionPress(window_size=0)
