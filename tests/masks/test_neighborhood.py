"""Brute-force coordinate checks of the local-family mask predicates (explicit loops, independent of the tensors)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnzoo import masks
from attnzoo.masks.layouts import axial
from attnzoo.masks.neighborhood import neighborhood
from attnzoo.masks.partitions import grid, window_partition
from attnzoo.masks.windows import dilated, halo, sliding_window


def natten_window(x: int, length: int, kernel: int, dilation: int, causal: bool) -> set[int]:
    """The keys NATTEN's definition gives coordinate ``x`` on one axis, by listing its dilation group."""
    members = list(range(x % dilation, length, dilation))
    u = members.index(x)
    if causal:
        return set(members[max(0, u - kernel + 1) : u + 1])
    start = u - kernel // 2
    start = max(0, min(start, len(members) - kernel))
    return set(members[start : start + kernel])


def brute_neighborhood(layout, kernel, dilation, causal) -> torch.Tensor:
    coords = list(itertools.product(*(range(n) for n in layout)))
    out = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, xq in enumerate(coords):
        axes = zip(xq, layout, kernel, dilation, causal, strict=True)
        windows = [natten_window(x, n, k, d, c) for x, n, k, d, c in axes]
        for j, xk in enumerate(coords):
            out[i, j] = all(y in w for y, w in zip(xk, windows, strict=True))
    return out


CASES = [
    ((13,), (5,), (1,), (False,)),
    ((17,), (3,), (4,), (False,)),  # dilation not dividing the length
    ((17,), (3,), (4,), (True,)),
    ((9,), (9,), (1,), (False,)),  # kernel equal to the length
    ((9,), (9,), (1,), (True,)),
    ((7, 10), (3, 5), (2, 1), (True, False)),
    ((7, 10), (7, 1), (1, 3), (False, True)),
    ((4, 5, 6), (3, 3, 5), (1, 2, 1), (False, True, False)),
    ((5, 3, 4), (5, 1, 3), (1, 3, 1), (True, True, True)),
]


@pytest.mark.parametrize(("layout", "kernel", "dilation", "causal"), CASES)
def test_neighborhood_predicate_matches_brute_force(layout, kernel, dilation, causal):
    n = math.prod(layout)
    got = masks.dense(neighborhood(layout, kernel, dilation, causal), 1, 1, n, n, "cpu")[0, 0]
    want = brute_neighborhood(layout, kernel, dilation, causal)
    assert torch.equal(got, want)
    if not any(causal):  # NATTEN's border shift: every query sees exactly Π k keys
        assert bool((got.sum(-1) == math.prod(kernel)).all())


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


@pytest.mark.parametrize(("layout", "axis", "causal"), [((4, 5), 0, False), ((4, 5), 1, True), ((2, 3, 4), 1, True)])
def test_axial_predicate_matches_brute_force(layout, axis, causal):
    coords = list(itertools.product(*(range(n) for n in layout)))
    want = torch.tensor([[all(a == b for i, (a, b) in enumerate(zip(xq, xk, strict=True)) if i != axis)
                          and (not causal or xk[axis] <= xq[axis]) for xk in coords] for xq in coords])
    n = len(coords)
    assert torch.equal(masks.dense(axial(layout, axis, causal), 1, 1, n, n, "cpu")[0, 0], want)


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
