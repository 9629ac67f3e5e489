"""Partition predicates against brute force: MaxViT's windows (block) and grid cells on 1-D to 3-D layouts."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnzoo import masks
from attnzoo.masks.partitions import grid, window_partition


@pytest.mark.parametrize(("layout", "size"), [((12,), (4,)), ((6, 8), (3, 4)), ((4, 6, 2), (2, 3, 1))])
def test_maxvit_predicates_match_brute_force(layout, size):
    coords = list(itertools.product(*(range(n) for n in layout)))
    n = len(coords)
    same_window = torch.tensor([[all(a // p == b // p for a, b, p in zip(xq, xk, size, strict=True))
                                 for xk in coords] for xq in coords])
    # grid G: x = g·(L/G) + r, one group per r; checked as "the offsets differ by a multiple of L/G"
    same_cell = torch.tensor([[all((a - b) % (length // g) == 0 for a, b, length, g in zip(xq, xk, layout, size,
                                                                                          strict=True))
                               for xk in coords] for xq in coords])
    assert torch.equal(masks.dense(window_partition(layout, size), 1, 1, n, n, "cpu")[0, 0], same_window)
    assert torch.equal(masks.dense(grid(layout, size), 1, 1, n, n, "cpu")[0, 0], same_cell)
