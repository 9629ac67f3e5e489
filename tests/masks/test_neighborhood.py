"""Neighborhood predicates against brute force: NATTEN's window (P2) and GNA's strided window (P3), listed
coordinate by coordinate with explicit loops, independent of the tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnzoo import masks
from attnzoo.masks.neighborhood import generalized_neighborhood, neighborhood
from tests.helpers import dense_mask


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


def gna_window(x: int, length: int, kernel: int, stride: int, dilation: int, causal: bool) -> set[int]:
    """GNA's keys of coordinate ``x`` on one axis, by listing its dilation group and its stride group's leader."""
    members = list(range(x % dilation, length, dilation))
    u = members.index(x)
    first = (u // stride) * stride
    if causal:
        leader = min(first + stride - 1, len(members) - 1)
        return {members[w] for w in range(len(members)) if w <= u and leader - w < kernel}
    leader = min(first + stride // 2, len(members) - 1)
    start = max(0, min(leader - kernel // 2, len(members) - kernel))
    return set(members[start : start + kernel])


def brute_gna(layout, kernel, stride, dilation, causal) -> torch.Tensor:
    coords = list(itertools.product(*(range(n) for n in layout)))
    out = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, xq in enumerate(coords):
        windows = [gna_window(*a) for a in zip(xq, layout, kernel, stride, dilation, causal, strict=True)]
        for j, xk in enumerate(coords):
            out[i, j] = all(y in w for y, w in zip(xk, windows, strict=True))
    return out


GNA_CASES = [
    ((13,), (5,), (2,), (1,), (False,)),
    ((13,), (5,), (4,), (1,), (True,)),
    ((17,), (3,), (3,), (4,), (False,)),  # dilation not dividing the length, stride = kernel
    ((17,), (5,), (2,), (3,), (True,)),
    ((9,), (9,), (9,), (1,), (False,)),  # kernel equal to the length
    ((7, 10), (3, 5), (2, 5), (2, 1), (True, False)),
    ((4, 5, 6), (3, 3, 5), (3, 1, 2), (1, 2, 1), (False, True, False)),
]


@pytest.mark.parametrize(("layout", "kernel", "stride", "dilation", "causal"), GNA_CASES)
def test_gna_predicate_matches_brute_force(layout, kernel, stride, dilation, causal):
    n = math.prod(layout)
    got = dense_mask(generalized_neighborhood(layout, kernel, stride, dilation, causal), n)
    assert torch.equal(got, brute_gna(layout, kernel, stride, dilation, causal))
    if not any(causal):  # every query still sees exactly Π k keys
        assert bool((got.sum(-1) == math.prod(kernel)).all())
