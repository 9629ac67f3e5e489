from __future__ import annotations

import torch

from attnzoo.kv.presses import KnormPress
from tests.kv.presses.patterns import focused, kept_positions, prompt


def test_keeps_the_lowest_key_norms() -> None:
    q, k, v = focused(10, {}, kv_heads=2)
    k = k * 5.0
    k[:, 0, [0, 1, 7]] *= 0.1  # head 0: slots 0, 1, 7 have the smallest keys
    k[:, 1, [2, 3, 4]] *= 0.1  # head 1: slots 2, 3, 4
    cache, context = prompt(q.expand(1, 2, 10, 10), k, v)
    out = KnormPress(budget=3).compress(cache, context)
    assert kept_positions(out, 0, 0) == [0, 1, 7]
    assert kept_positions(out, 0, 1) == [2, 3, 4]


def test_padding_never_kept() -> None:
    q, k, v = focused(10, {}, batch=2)
    k = k.clone()
    k[1, :, 6:] = 0.0  # padding of sequence 1 has the smallest norms, but holds no token
    cache, context = prompt(q, k * 1.0, v, lengths=torch.tensor([10, 6]))
    out = KnormPress(compression_ratio=0.5).compress(cache, context)
    assert len(kept_positions(out, 1)) == 3 and max(kept_positions(out, 1)) < 6
