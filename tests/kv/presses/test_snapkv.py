from __future__ import annotations

import pytest
import torch

from attnzoo.errors import AttnzooError
from attnzoo.kv.presses import SnapKVPress
from tests.kv.presses.patterns import focused, kept_positions, prompt


def test_window_attention_picks_the_slots() -> None:
    q, k, v = focused(12, {10: [0, 1, 7], 11: [0, 1, 7]}, heads=2)  # the window (rows 10, 11) reads 0, 1, 7
    cache, context = prompt(q, k, v)
    out = SnapKVPress(budget=5, window_size=2, kernel_size=1).compress(cache, context)
    assert kept_positions(out) == [0, 1, 7, 10, 11]


def test_max_pooling_brings_the_neighbours() -> None:
    q, k, v = focused(16, {15: [7]})
    cache, context = prompt(q, k, v)
    out = SnapKVPress(budget=4, window_size=1, kernel_size=3).compress(cache, context)
    assert kept_positions(out) == [6, 7, 8, 15]


def test_window_always_kept_ragged() -> None:
    q, k, v = focused(12, {9: [0], 10: [0], 11: [0]}, batch=2)  # nothing in either window reads itself
    cache, context = prompt(q, k, v, lengths=torch.tensor([12, 8]))
    out = SnapKVPress(budget=4, window_size=3, kernel_size=1).compress(cache, context)
    assert kept_positions(out, 0) == [0, 9, 10, 11]
    assert kept_positions(out, 1)[-3:] == [5, 6, 7]  # sequence 1's window is its own last 3 tokens


def test_groups_share_one_choice() -> None:
    q, k, v = focused(12, {11: [2]}, heads=2)
    q[:, 1, 11] = 0.0
    q[:, 1, 11, 5] = 40.0  # the group's second head reads slot 5
    cache, context = prompt(q, k, v)
    out = SnapKVPress(budget=3, window_size=1, kernel_size=1).compress(cache, context)
    assert kept_positions(out) == [2, 5, 11]


@pytest.mark.parametrize(("name", "value"), [("window_size", 0), ("kernel_size", 0), ("pooling", "min")])
def test_bad_arguments(name: str, value: object) -> None:
    with pytest.raises(AttnzooError, match=name):
        SnapKVPress(**{name: value})
