"""Window predicates against brute force: sliding windows (causal, two-sided, inward), dilated keys, and halo blocks
on 1-D to 3-D layouts."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnzoo import masks
from attnzoo.masks.windows import dilated, halo, sliding_window


def brute_sliding_window(sq: int, skv: int, window: int, causal: bool, inward: bool) -> torch.Tensor:
    out = torch.zeros(sq, skv, dtype=torch.bool)
    for i in range(sq):
        c = i + skv - sq
        if causal:
            keys = range(c - window, c + 1)
        elif inward:
            span = min(2 * window + 1, skv)
            start = min(max(c - window, 0), skv - span)
            keys = range(start, start + span)
        else:
            keys = range(c - window, c + window + 1)
        for j in keys:
            if 0 <= j < skv:
                out[i, j] = True
    return out


@pytest.mark.parametrize(
    ("sq", "skv", "window", "causal", "inward"),
    [(20, 20, 3, False, False), (20, 20, 3, True, False), (20, 20, 3, False, True), (7, 20, 2, False, True),
     (20, 7, 2, True, False), (20, 7, 2, False, False), (9, 9, 30, False, True), (9, 9, 0, True, False)],
)
def test_sliding_window_predicate_matches_brute_force(sq, skv, window, causal, inward):
    got = masks.dense(sliding_window(sq, skv, window, causal, inward), 1, 1, sq, skv, "cpu")[0, 0]
    assert torch.equal(got, brute_sliding_window(sq, skv, window, causal, inward))


@pytest.mark.parametrize(
    ("n", "dilation", "window", "causal"),
    [(17, 3, 2, False), (17, 3, 2, True), (10, 4, None, False), (10, 4, None, True), (5, 7, 1, False)],
)
def test_dilated_predicate_matches_brute_force(n, dilation, window, causal):
    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        steps = range(-n, n + 1) if window is None else range(-window, window + 1)
        for m in steps:
            j = i - m * dilation
            if 0 <= j < n and (not causal or m >= 0):
                want[i, j] = True
    assert torch.equal(masks.dense(dilated(dilation, window, causal), 1, 1, n, n, "cpu")[0, 0], want)


@pytest.mark.parametrize(("layout", "block", "halo_size"), [((11,), (4,), (2,)), ((6, 7), (4, 3), (1, 0)),
                                                            ((3, 4, 5), (2, 3, 2), (0, 1, 1))])
def test_halo_predicate_matches_brute_force(layout, block, halo_size):
    coords = list(itertools.product(*(range(n) for n in layout)))

    def sees(xq, xk):
        for x, y, b, h in zip(xq, xk, block, halo_size, strict=True):
            first = (x // b) * b  # the query's block is [first, first + b), widened by h on each side
            if not first - h <= y < first + b + h:
                return False
        return True

    want = torch.tensor([[sees(xq, xk) for xk in coords] for xq in coords])
    n = len(coords)
    assert torch.equal(masks.dense(halo(layout, block, halo_size), 1, 1, n, n, "cpu")[0, 0], want)
