"""Concentric position ids (P13) against the paper's ring-by-ring numbering, and the position-causal mask they give."""

from __future__ import annotations

import pytest
import torch

from attnzoo.masks import dense
from attnzoo.masks.positional import concentric_position_ids, position_causal


def brute_concentric_ids(seq: int, h: int, w: int, start: int) -> list[int]:
    """Peel the grid ring by ring (outermost first), as the paper's figure numbers it; text around it counts on."""
    ring = [[-1] * w for _ in range(h)]
    top, left, bottom, right, r = 0, 0, h - 1, w - 1, 0
    while top <= bottom and left <= right:
        for y in range(top, bottom + 1):
            for x in range(left, right + 1):
                if y in (top, bottom) or x in (left, right):
                    ring[y][x] = r
        top, left, bottom, right, r = top + 1, left + 1, bottom - 1, right - 1, r + 1
    ids = list(range(start)) + [start + ring[y][x] for y in range(h) for x in range(w)]
    return ids + [start + r + t for t in range(seq - start - h * w)]


@pytest.mark.parametrize(("seq", "h", "w", "start"), [(40, 6, 6, 2), (24, 24, 1, 0), (30, 3, 7, 5), (20, 5, 4, 0),
                                                      (9, 1, 1, 8)])
def test_concentric_ids_and_mask_match_loops(seq, h, w, start):
    ids = concentric_position_ids(seq, (h, w), start)
    assert ids.tolist() == brute_concentric_ids(seq, h, w, start)
    got = dense(position_causal(ids, ids), 1, 1, seq, seq, "cpu")[0, 0]
    want = torch.tensor([[ids[j] <= ids[i] for j in range(seq)] for i in range(seq)])
    assert torch.equal(got, want)


def test_concentric_ids_24x24_as_in_the_paper():
    ids = concentric_position_ids(576 + 10, (24, 24), 5)
    grid = ids[5:581].view(24, 24)
    assert grid[0].eq(5).all() and grid[11:13, 11:13].eq(5 + 11).all()
    assert ids[581:].tolist() == list(range(5 + 12, 5 + 12 + 5))
    assert torch.equal(concentric_position_ids(7, None), torch.arange(7))
